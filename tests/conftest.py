import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "osmesa")


def run_script(script, *args, cwd, timeout=600, env=None):
    """Run one of the scripts as a user would, in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def run(tmp_path):
    """run(script, *args) executes in a fresh directory, so runs/ and videos/ land in tmp_path."""
    return lambda script, *args, **kw: run_script(script, *args, cwd=tmp_path, **kw)


def kill_after_first_checkpoint(cmd, cwd, env, timeout=300):
    """Start `cmd` in `cwd`, SIGKILL it as soon as runs/*/checkpoint.pt exists; returns the run directory."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not glob.glob(os.path.join(cwd, "runs", "*", "checkpoint.pt")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def read_tensorboard(run_dir):
    """A run's TensorBoard logs: {scalar tag: [(step, value), ...]} and the set of tensor (text) tags."""
    ea = EventAccumulator(run_dir)
    ea.Reload()
    tags = ea.Tags()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in tags["scalars"]}, set(tags["tensors"])
