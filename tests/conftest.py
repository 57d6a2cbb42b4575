import os
import subprocess
import sys

import pytest

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
