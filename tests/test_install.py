"""Where users install the scripts: Python 3.8 (Isaac Gym's), and machines where no OpenGL library loads."""
import ast
import os
import sys

import pytest
import vermin

from .conftest import ROOT

SCRIPTS = ["ebflow_continuous_action.py", "ebflow_isaacgym.py"]
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="hides OpenGL libraries with LD_LIBRARY_PATH (Linux)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_need_no_python_newer_than_3_8(script):
    """Isaac Gym Preview 4 and IsaacGymEnvs run on Python 3.8 at most, so both scripts must too."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    config = vermin.Config()
    config.set_eval_annotations(True)  # tyro and dataclasses evaluate annotations at run time
    config.set_verbose(3)  # the failure message lists each rule with its line
    visitor = vermin.visit(source, config, script)
    assert visitor.minimum_versions()[1] <= (3, 8), visitor.output_text()
    # vermin leaves `X | Y` alone (it cannot tell it from a bitwise or); in an annotation it needs Python 3.10
    tree = ast.parse(source)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
    unions = [a.lineno for a in annotations for n in ast.walk(a) if isinstance(n, ast.BinOp)
              and isinstance(n.op, ast.BitOr)]
    assert not unions, f"X | Y annotations (Python 3.10) at lines {unions}: use Optional or Union"


def no_opengl(tmp_path, backend):
    """Environment of a machine where no OpenGL library loads, whatever this one has installed: empty files
    named like the libraries come first on the library path, so loading any of them fails."""
    hidden = tmp_path / "no_opengl"
    hidden.mkdir()
    for lib in ["OSMesa", "EGL", "GL", "GLX", "OpenGL", "GLESv2"]:
        for suffix in ["", *(f".{i}" for i in range(10))]:
            (hidden / f"lib{lib}.so{suffix}").touch()
    library_path = os.pathsep.join([str(hidden), os.environ.get("LD_LIBRARY_PATH", "")])
    return {"MUJOCO_GL": backend, "LD_LIBRARY_PATH": library_path}


@linux_only
@pytest.mark.parametrize("script,args", [
    ("ebflow_continuous_action.py", ["--total-timesteps", 50]),
    ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--num-envs", 2, "--total-timesteps", 40, "--buffer-size", 64]),
])
def test_training_loads_no_opengl(run, tmp_path, script, args):
    """MUJOCO_GL=osmesa without OSMesa (a common shell setting) makes `import mujoco` fail; training renders
    nothing and must not care."""
    out = run(script, "--env-id", "InvertedPendulum-v4", *args, "--learning-starts", 1000, "--eval-frequency", 10_000,
              "--eval-episodes", 1, "--batch-size", 4, env=no_opengl(tmp_path, "osmesa"))
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob("runs/*/events.out.tfevents.*"))) == 1


@linux_only
@pytest.mark.parametrize("backend", ["osmesa", "glfw"])  # `import mujoco` fails / making the context fails
def test_capture_video_without_opengl_is_one_line(run, tmp_path, backend):
    pytest.importorskip("moviepy", reason="--capture-video needs moviepy (tests/requirements.txt)")
    out = run("ebflow_continuous_action.py", "--env-id", "InvertedPendulum-v4", "--capture-video",
              "--total-timesteps", 200, "--learning-starts", 1000, "--eval-frequency", 200, "--eval-episodes", 1,
              env=no_opengl(tmp_path, backend))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --capture-video: MuJoCo cannot render here") and "MUJOCO_GL=egl" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "videos").exists()
