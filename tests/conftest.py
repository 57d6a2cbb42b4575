import glob
import os
import re
import signal
import subprocess
import sys
import time

# One thread for torch (and numpy's BLAS) in this process, in each pytest-xdist worker and in every script
# a test starts: set before either is imported. The tests' networks are small: on an idle machine a
# second thread changes nothing, and where other work shares the cores (a CI runner, the other worker, a
# training run) OpenMP's threads waiting on each other made updates 2.5 to 3.8 times slower
# (docs/speed.md, "The test suite").
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# This process never renders (tests that render run the scripts in subprocesses), so, like the scripts
# without --capture-video, it imports mujoco with no OpenGL backend: `import mujoco` loads the library
# MUJOCO_GL names and fails if it is missing. Subprocesses get the user's MUJOCO_GL back.
USER_MUJOCO_GL = os.environ.get("MUJOCO_GL")
os.environ["MUJOCO_GL"] = "disable"
import mujoco  # noqa: E402,F401

if USER_MUJOCO_GL is None:
    del os.environ["MUJOCO_GL"]
else:
    os.environ["MUJOCO_GL"] = USER_MUJOCO_GL

# One frame of a MuJoCo task, rendered off-screen: the probe for tests that record videos.
RENDER_PROBE = ("import gymnasium as gym; env = gym.make('InvertedPendulum-v4', render_mode='rgb_array'); "
                "env.reset(seed=0); assert env.render().std() > 0; env.close()")


@pytest.fixture(scope="session")
def mujoco_gl():
    """The MUJOCO_GL under which MuJoCo renders here (the user's, else the first of egl, osmesa, glfw that
    works), for the tests that record videos; they are skipped, with one line, where none works.
    Each backend is tried in its own subprocess: a missing OpenGL library can break or abort a process."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        pytest.skip("video tests need moviepy (pip install moviepy)")
    tried = [USER_MUJOCO_GL] if USER_MUJOCO_GL else ["egl", "osmesa", "glfw"]
    for gl in tried:
        try:
            probe = subprocess.run([sys.executable, "-c", RENDER_PROBE], env={**os.environ, "MUJOCO_GL": gl},
                                   capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode == 0:
            return gl
    pytest.skip(f"MuJoCo cannot render here (tried MUJOCO_GL={', '.join(tried)}): "
                "install libosmesa6 and set MUJOCO_GL=osmesa, or MUJOCO_GL=egl (GPU or Mesa's libEGL)")


def pytest_configure(config):
    config.addinivalue_line("markers", "render: renders MuJoCo (OpenGL); skipped where that does not work")
    config.addinivalue_line("markers", "learning: a learning check of minutes; CI runs them once, on the newest "
                                       "versions (-m 'not learning' leaves them out)")


def pytest_collection_modifyitems(items):
    # `-m render` selects exactly the tests that need rendering: those using the mujoco_gl fixture
    for item in items:
        if "mujoco_gl" in item.fixturenames:
            item.add_marker(pytest.mark.render)


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
    """A run's TensorBoard logs: {scalar tag: [(step, value), ...]} and {text tag: [(step, text), ...]}."""
    ea = EventAccumulator(run_dir)
    ea.Reload()
    tags = ea.Tags()
    scalars = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in tags["scalars"]}
    texts = {tag: [(e.step, b"".join(e.tensor_proto.string_val).decode()) for e in ea.Tensors(tag)]
             for tag in tags["tensors"]}
    return scalars, texts


def documented_tags():
    """The scalar tags and text names that docs/meow.md's "Explanation of the logged metrics" lists."""
    doc = open(os.path.join(ROOT, "docs", "meow.md")).read()
    section = doc.split("## Explanation of the logged metrics")[1].split("\n## ")[0]
    scalars = set(re.findall(r"`((?:charts|eval|losses)/\w+)`", section))
    texts_item = section[section.index("- the texts"):]
    return scalars, set(re.findall(r"`(\w+)`", texts_item.split("\n- ")[0]))


def hold_lock(path, text):
    """Take the lock as a training process does (flock on train.lock), from this test process. Returns the
    open file: `with` or close() releases the lock."""
    import fcntl

    lock = open(path, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.truncate(0)
    lock.write(text)
    lock.flush()
    return lock
