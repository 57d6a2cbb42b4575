"""docs/mujoco_versions.py, the tool behind docs/meow.md's "The MuJoCo version", in this installation."""
import ast
import os
import re
import subprocess
import sys

import mujoco
import numpy as np

from .conftest import ROOT

TOOL = os.path.join(ROOT, "docs", "mujoco_versions.py")


def tool(*args, cwd):
    out = subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MUJOCO_GL": "disable"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def first_steps_off(stdout):
    """{task: [first step off by >1e-9, >1e-3, >0.1]} from `compare`'s lines."""
    return {task: ast.literal_eval(first) for task, first in re.findall(r"^\s+(\S+-v4) .*: (\[.*\])$", stdout, re.M)}


def test_compare_finds_the_first_step_that_differs_and_half_margins_move_only_tasks_with_margins(tmp_path):
    tool("roll", "a.npz", cwd=tmp_path)
    tool("roll", "b.npz", cwd=tmp_path)
    tool("roll", "half.npz", "--half-margins", cwd=tmp_path)
    same = first_steps_off(tool("compare", "a.npz", "b.npz", cwd=tmp_path))
    assert same == {task: [None, None, None] for task in ["Hopper-v4", "HalfCheetah-v4", "Walker2d-v4", "Ant-v4",
                                                          "Humanoid-v4"]}
    # one observation entry of Hopper-v4 moved by 0.01 at step 7 (and nothing else)
    rolled = dict(np.load(tmp_path / "b.npz"))
    rolled["Hopper-v4"][7, 2] += 0.01
    np.savez(tmp_path / "c.npz", **rolled)
    moved = first_steps_off(tool("compare", "a.npz", "c.npz", cwd=tmp_path))
    assert moved["Hopper-v4"] == [7, 7, None] and moved["Ant-v4"] == [None, None, None]
    # every geom of HalfCheetah-v4 and Walker2d-v4 has margin 0, so halving margins changes nothing there;
    # Ant-v4's feet touch the floor within its margin of 0.01
    half = first_steps_off(tool("compare", "a.npz", "half.npz", cwd=tmp_path))
    assert half["HalfCheetah-v4"] == half["Walker2d-v4"] == [None, None, None]
    assert half["Ant-v4"][0] is not None


def test_margin_reports_the_rule_of_this_mujoco(tmp_path):
    # MuJoCo 3.5 changed how a contact combines its geoms' margins: the larger one before, the sum since
    version = tuple(int(x) for x in mujoco.__version__.split(".")[:2])
    rule = "the sum of margins" if version >= (3, 5) else "the larger margin"
    assert tool("margin", cwd=tmp_path).strip().endswith(rule)
