"""Bad input to either script is refused in one line, with a non-zero exit, before anything is written:
every numeric flag, and every kind of file handed to --eval-checkpoint or --resume. Most cases call
check_args / load_checkpoint in-process; a few real runs show that nothing lands in runs/ or videos/.
Last, --max-nonfinite-updates N stops a run once N updates were skipped."""
import contextlib
import glob
import importlib.util
import io
import os
import pickle
import random
import runpy
import sys
import tempfile
import zipfile
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
import tyro
from gymnasium.utils.seeding import np_random
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ebflow_continuous_action as cont
import ebflow_isaacgym as isaac

from .conftest import ROOT
from .test_loss import batch

SCRIPTS = {cont: "ebflow_continuous_action.py", isaac: "ebflow_isaacgym.py"}
NAN, INF = float("nan"), float("inf")


def refusal(fn, *args):
    """Call fn, which must refuse: a non-zero exit and one line on stderr, returned."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit:
        fn(*args)
    assert exit.value.code != 0
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], err.getvalue()
    return lines[0]


def numeric_flags(mod):
    return [f.name for f in fields(mod.Args) if f.type in (int, float)]


def dashed(name):
    return "--" + name.replace("_", "-")


# ---- Numeric flags -------------------------------------------------------------------------------
# Bad values per flag, written here independently of the scripts' rule table. Every int and float
# flag of both scripts must be listed (test_every_numeric_flag_has_bad_values_here).
NOT_POSITIVE_INT = [0, -1]
NOT_POSITIVE_FLOAT = [0.0, -1e-3, NAN, INF, -INF]
BAD_VALUES = {
    "seed": [-1, 2**32],  # numpy's seeds are 32-bit, Gymnasium's non-negative
    "checkpoint_frequency": [-1],
    "log_frequency": NOT_POSITIVE_INT,
    "num_envs": NOT_POSITIVE_INT,
    "total_timesteps": NOT_POSITIVE_INT,
    "buffer_size": NOT_POSITIVE_INT,
    "gamma": [-0.01, 1.01, NAN, INF],
    "tau": [0.0, -0.5, 1.5, NAN, -INF],
    "batch_size": NOT_POSITIVE_INT,
    "learning_starts": [-1],
    "learning_rate": NOT_POSITIVE_FLOAT,
    "max_grad_norm": NOT_POSITIVE_FLOAT,
    "alpha": NOT_POSITIVE_FLOAT,
    "sigma_max": [NAN, INF, -INF, 1e39],  # beyond float32
    "sigma_min": [NAN, INF, -INF],
    "flow_hidden": NOT_POSITIVE_INT,
    "shift_hidden": NOT_POSITIVE_INT,
    "obs_clip": NOT_POSITIVE_FLOAT + [3.5e38],
    "eval_frequency": NOT_POSITIVE_INT,
    "eval_episodes": NOT_POSITIVE_INT,
    "max_nonfinite_updates": NOT_POSITIVE_INT,
}
# Edge values that are fine, so the checks are not simply stricter than the flags' meaning
GOOD_EDGES = {"seed": [0, 2**32 - 1], "checkpoint_frequency": [0], "learning_starts": [0], "gamma": [0.0, 1.0],
              "tau": [1.0], "sigma_min": [-1e6]}
FLAG_CASES = [(mod, name, value) for mod in SCRIPTS for name in numeric_flags(mod)
              for value in BAD_VALUES.get(name, [])]


@pytest.mark.parametrize("mod", SCRIPTS, ids=SCRIPTS.values())
def test_every_numeric_flag_has_bad_values_here_and_one_rule_in_the_script(mod):
    assert set(numeric_flags(mod)) <= set(BAD_VALUES), "a new numeric flag: add its bad values above"
    assert set(mod.RULE_OF) <= set(numeric_flags(mod)), "a rule for a flag Args does not have"
    assert set(mod.RULE_OF.values()) | {"positive"} == set(mod.RULES), "a rule no flag uses, or one not defined"


@pytest.mark.parametrize("mod,name,value", FLAG_CASES,
                         ids=[f"{SCRIPTS[m][:-3]}-{dashed(n)}={v}" for m, n, v in FLAG_CASES])
def test_bad_value_of_a_numeric_flag_is_refused_in_one_line(mod, name, value):
    # parsed as the command line parses it; "--flag=value", since argparse in older tyro takes "-inf" for a flag
    args = tyro.cli(mod.Args, args=[f"{dashed(name)}={value}"])
    assert refusal(mod.check_args, args).startswith(f"error: {dashed(name)} must be")


@pytest.mark.parametrize("mod", SCRIPTS, ids=SCRIPTS.values())
def test_edge_values_of_numeric_flags_are_accepted(mod):
    for name, values in GOOD_EDGES.items():
        if name in numeric_flags(mod):
            for value in values:
                mod.check_args(tyro.cli(mod.Args, args=[f"{dashed(name)}={value}"]))


CROSS_FIELD = [
    (cont, ["--sigma-min", "-0.3", "--sigma-max", "-1"], "--sigma-min (-0.3) must be smaller than --sigma-max"),
    (cont, ["--batch-size", "512", "--buffer-size", "256"], "--batch-size (512) cannot exceed --buffer-size (256)"),
    (isaac, ["--sigma-min", "3.0"], "--sigma-min (3.0) must be smaller than --sigma-max"),
    (isaac, ["--batch-size", "2000", "--buffer-size", "10", "--num-envs", "100"], "cannot exceed the replay capacity"),
    (isaac, ["--total-timesteps", "100", "--num-envs", "128"], "less than one vector step"),
    (cont, ["--run-name", "../elsewhere"], "--run-name must be a plain directory name"),
    (cont, ["--run-name", ".."], "--run-name must be a plain directory name"),
]


@pytest.mark.parametrize("mod,argv,message", CROSS_FIELD, ids=[" ".join(a) for _, a, _ in CROSS_FIELD])
def test_inconsistent_flags_are_refused_in_one_line(mod, argv, message):
    assert message in refusal(mod.check_args, tyro.cli(mod.Args, args=argv))


@pytest.mark.parametrize("mod,flag,package", [(cont, "--track", "wandb"), (cont, "--capture-video", "moviepy"),
                                              (isaac, "--track", "wandb")])
def test_flag_whose_package_is_missing_is_refused_in_one_line(monkeypatch, mod, flag, package):
    find_spec = importlib.util.find_spec  # as if the package were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    message = refusal(mod.check_args, tyro.cli(mod.Args, args=[flag]))
    assert f"{flag} needs {package}: pip install {package}" in message


def build_and_update(mod, args):
    """What a run builds from the flags, and one update and one action: must not raise."""
    obs_dim, act_dim = 3, 2
    flow, target = (mod.EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min, args.sigma_max, 8, 8)
                    for _ in range(2))
    update, _, _ = mod.make_update(flow, target, args)
    data = batch(obs_dim, act_dim, n=16, dtype=torch.float32)
    if mod is isaac:
        data = (*data, torch.ones(16))  # valid
        isaac.RunningMeanStd(obs_dim, args.obs_clip)(data[0])
    update(data)
    with torch.no_grad():
        flow.sample(data[0])


@pytest.mark.parametrize("mod", SCRIPTS, ids=SCRIPTS.values())
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_property_any_float_flag_value_is_refused_in_one_line_or_builds_and_updates(mod, data):
    name = data.draw(st.sampled_from([f.name for f in fields(mod.Args) if f.type is float]))
    value = data.draw(st.floats())  # every double: NaN, the infinities, subnormals, huge values
    args = mod.Args(**{name: value})
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            mod.check_args(args)
    except SystemExit:
        assert dashed(name) in refusal(mod.check_args, args)
        return
    build_and_update(mod, args)


@pytest.mark.parametrize("mod", SCRIPTS, ids=SCRIPTS.values())
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(-2**70, 2**70))
def test_property_any_seed_is_refused_in_one_line_or_seeds_every_generator(mod, seed):
    args = mod.Args(seed=seed)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            mod.check_args(args)
    except SystemExit:
        assert refusal(mod.check_args, args).startswith("error: --seed")
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    np_random(seed + 1_000_000)  # Gymnasium's reset(seed=...), as the evaluation seeds it


# ---- Files handed to --eval-checkpoint and --resume -----------------------------------------------
class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this calls open(path, "w"): code execution
        return (open, (self.path, "w"))


def checkpoint(mod, training=False, **train_state):
    """A saved model of mod's script, built by its own model_checkpoint; with training=True a training
    checkpoint (what load_checkpoint reads: train_state's entries with their types; the large ones are
    empty here, their contents are read by --resume: test_resume_from_a_damaged_real_checkpoint...).
    train_state: entries to replace (None: remove)."""
    args = mod.Args(flow_hidden=8, shift_hidden=8)
    flow = mod.EBFlowPolicy(3, 2, args.alpha, args.sigma_min, args.sigma_max, 8, 8)
    normalizer = [isaac.RunningMeanStd(3, args.obs_clip)] if mod is isaac else []
    ckpt = mod.model_checkpoint(flow, *normalizer, args, 3, 2, 100)
    if training:
        ckpt["train_state"] = {"args": asdict(args), "run_name": "run", "global_step": 100, "best_eval": -INF,
                               "last_eval": NAN, "nonfinite_updates": 0.0, "target_model": {}, "optimizer": {},
                               "buffer": {}, "rng": {}}
        for key, value in train_state.items():
            if value is None:
                del ckpt["train_state"][key]
            else:
                ckpt["train_state"][key] = value
    return ckpt


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.txt", "a zip archive, not torch's layout")
    return buf.getvalue()


def other(mod):
    return isaac if mod is cont else cont


NOT_OURS = "not a usable checkpoint of"
# name -> (the file's bytes for a script's module, message for --eval-checkpoint, message for --resume);
# a message None: the file is accepted. Every refusal also names the file and says NOT_OURS.
FILES = {
    "text (an /etc/passwd)": (lambda mod: b"root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:/usr/sbin/nologin\n",
                              NOT_OURS, NOT_OURS),
    "empty": (lambda mod: b"", NOT_OURS, NOT_OURS),
    **{f"random bytes {n}": (lambda mod, n=n: random.Random(n).randbytes(n), NOT_OURS, NOT_OURS)
       for n in [1, 7, 100, 4096]},
    "a zip that is not torch's": (lambda mod: zip_bytes(), NOT_OURS, NOT_OURS),
    "a plain pickle of data": (lambda mod: pickle.dumps({"format": mod.CHECKPOINT_FORMAT}), NOT_OURS, NOT_OURS),
    "a real checkpoint cut in half": (lambda mod: (lambda b: b[: len(b) // 2])(torch_bytes(checkpoint(mod, True))),
                                      NOT_OURS, NOT_OURS),
    "a real checkpoint's first 10 bytes": (lambda mod: torch_bytes(checkpoint(mod, True))[:10], NOT_OURS, NOT_OURS),
    "a tensor": (lambda mod: torch_bytes(torch.zeros(3)), "format 'a Tensor'", "format 'a Tensor'"),
    "a dict without format": (lambda mod: torch_bytes({"model": {}}), "format 'None'", "format 'None'"),
    "the other script's saved model": (lambda mod: torch_bytes(checkpoint(other(mod))), "format 'meow-",
                                       "format 'meow-"),
    "the other script's checkpoint": (lambda mod: torch_bytes(checkpoint(other(mod), True)), "format 'meow-",
                                      "format 'meow-"),
    "a saved model": (lambda mod: torch_bytes(checkpoint(mod)), None, "a saved model, not a training checkpoint"),
    "a training checkpoint": (lambda mod: torch_bytes(checkpoint(mod, True)), None, None),
    "this format, other network shapes": (
        lambda mod: torch_bytes({**checkpoint(mod, True), "act_dim": 5}), "RuntimeError: Error(s) in loading",
        "RuntimeError: Error(s) in loading"),
    "this format, entries missing": (lambda mod: torch_bytes({"format": mod.CHECKPOINT_FORMAT, "train_state": {}}),
                                     "KeyError", "KeyError"),
    # a usable model with a damaged training state: --eval-checkpoint reads only the model
    **{f"train_state {what}": (lambda mod, change=change: torch_bytes(change(mod)), None, message)
       for what, change, message in [
           ("a list", lambda mod: {**checkpoint(mod, True), "train_state": [1, 2]}, "TypeError"),
           ("without global_step", lambda mod: checkpoint(mod, True, global_step=None), "KeyError: 'global_step'"),
           ("with a text step", lambda mod: checkpoint(mod, True, global_step="100"), "step '100' is not an int"),
           ("with a negative step", lambda mod: checkpoint(mod, True, global_step=-5), "step -5 is not an int in"),
           ("with a run name leading out of runs/", lambda mod: checkpoint(mod, True, run_name="../../etc"),
            "run name '../../etc' is not a plain directory name")]},
}
FILE_CASES = [(mod, name, flag) for mod in SCRIPTS for name in FILES for flag in ["--eval-checkpoint", "--resume"]]


def load(mod, path, flag):
    """load_checkpoint as --eval-checkpoint or --resume calls it (resume: the arguments of checkpoint())."""
    return mod.load_checkpoint(path, *[mod.Args(flow_hidden=8, shift_hidden=8)] if flag == "--resume" else [])


@pytest.mark.parametrize("mod,name,flag", FILE_CASES, ids=[f"{SCRIPTS[m][:-3]}-{f}-{n}" for m, n, f in FILE_CASES])
def test_file_that_is_not_a_checkpoint_of_this_script_is_refused_in_one_line(mod, name, flag, tmp_path):
    contents, eval_message, resume_message = FILES[name]
    path = tmp_path / "file.pt"
    path.write_bytes(contents(mod))
    message = eval_message if flag == "--eval-checkpoint" else resume_message
    if message is None:  # accepted: the script's own files
        ckpt = load(mod, str(path), flag)[0]
        assert ckpt["format"] == mod.CHECKPOINT_FORMAT and ckpt["global_step"] == 100
    else:
        line = refusal(load, mod, str(path), flag)
        verb = "resume from" if flag == "--resume" else "load"
        assert line.startswith(f"error: cannot {verb} {path}: {NOT_OURS}") and message in line


@pytest.mark.parametrize("mod", SCRIPTS, ids=SCRIPTS.values())
def test_missing_file_directory_and_pickle_that_runs_code_are_refused_in_one_line(mod, tmp_path):
    missing = str(tmp_path / "missing.pt")
    for flag in ["--eval-checkpoint", "--resume"]:
        assert "FileNotFoundError" in refusal(load, mod, missing, flag)
    # a name with a line break is still one line
    assert refusal(mod.load_checkpoint, "a\nb.pt").startswith("error: cannot load a\\nb.pt: ")
    # a directory stands for the checkpoint.pt it holds
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for flag in ["--eval-checkpoint", "--resume"]:
        assert f"{os.path.join(tmp_path, 'checkpoint.pt')}: {NOT_OURS}" in refusal(load, mod, str(tmp_path), flag)
    (tmp_path / "checkpoint.pt").write_bytes(torch_bytes(checkpoint(mod, True)))
    for flag in ["--eval-checkpoint", "--resume"]:
        assert "train_state" in load(mod, str(tmp_path), flag)[0]
    # a pickle that would run code: refused, and the code did not run (torch's protocol 2 and Python's default)
    victim, evil = tmp_path / "pwned.txt", tmp_path / "evil.pt"
    for protocol in [2, pickle.DEFAULT_PROTOCOL]:
        with open(evil, "wb") as f:
            pickle.dump({"format": mod.CHECKPOINT_FORMAT, "model": CreatesAFile(str(victim))}, f, protocol)
        for flag in ["--eval-checkpoint", "--resume"]:
            assert f"{evil}: {NOT_OURS}" in refusal(load, mod, str(evil), flag)
    assert not victim.exists()


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02}q\x00(X"]), body=st.binary(max_size=3000))
@example(prefix=b"", body=b"c\x0b\x00")  # a GLOBAL opcode naming "\x0b": torch's message then spans two lines
def test_property_any_bytes_are_refused_in_one_line(prefix, body):
    """Fuzzing the loader: any bytes (some starting like a zip or a pickle, to reach deeper) are refused."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.pt")
        with open(path, "wb") as f:
            f.write(prefix + body)
        for mod in SCRIPTS:
            assert path in refusal(mod.load_checkpoint, path)


# ---- A few real runs: non-zero exit, one line, nothing written ------------------------------------
RUNS = [
    ("ebflow_continuous_action.py", ["--learning-rate", "nan", "--capture-video", "--save-model"], "--learning-rate"),
    ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--env-id", "Pendulum-v1", "--alpha", "inf", "--save-model"],
     "--alpha"),
    ("ebflow_continuous_action.py", ["--eval-checkpoint", "passwd", "--capture-video"], "cannot load passwd"),
    ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--env-id", "Pendulum-v1", "--resume", "evil.pt"],
     "cannot resume from evil.pt: not a usable"),
    # sizes no machine holds: refused where the tensors are allocated, still before anything is written
    ("ebflow_continuous_action.py", ["--env-id", "Pendulum-v1", "--buffer-size", "10000000000000"],
     "cannot allocate the networks and the replay buffer"),
    ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--env-id", "Pendulum-v1", "--num-envs", "2",
                            "--buffer-size", "10000000000000"], "cannot allocate the networks and the replay buffer"),
]


@pytest.mark.parametrize("script,argv,message", RUNS, ids=[f"{s[:-3]} {' '.join(a)}" for s, a, _ in RUNS])
def test_bad_input_run_exits_nonzero_with_one_line_and_writes_nothing(run, tmp_path, script, argv, message):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": CreatesAFile(str(tmp_path / "pwned.txt"))}, f, protocol=2)
    out = run(script, *argv)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert sorted(os.listdir(tmp_path)) == ["evil.pt", "passwd"]  # no runs/, no videos/, no pwned.txt


TINY = ["--env-id", "tests.scripted_env:RandomStart-v0", "--learning-starts", 10, "--batch-size", 8,
        "--buffer-size", 100, "--flow-hidden", 8, "--shift-hidden", 8, "--eval-episodes", 1, "--no-cuda"]
STOP_RUNS = {  # script -> (its arguments, the global step of update k)
    "ebflow_continuous_action.py": (TINY + ["--total-timesteps", 200, "--eval-frequency", 1000], lambda k: 10 + k),
    "ebflow_isaacgym.py": (TINY + ["--backend", "gymnasium", "--num-envs", 2, "--total-timesteps", 400,
                                   "--eval-frequency", 2000], lambda k: 2 * (10 + k)),
}


def run_in_process(script, argv, monkeypatch, tmp_path):
    """Run a script's __main__ in this process (in tmp_path), so torch functions can be patched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


def drop_a_feature(train_state):
    buffer = train_state["buffer"]
    buffer["obs"] = buffer["obs"][..., :1]  # would broadcast into the stored width if shapes were not checked


# name -> how it damages a real checkpoint's train_state, and the words of the refusal
DAMAGES = {
    "buffer observations one feature wide": (drop_a_feature, "ValueError: buffer obs has shape"),
    "buffer position past its size": (lambda ts: ts["buffer"].update(pos=ts["buffer"]["size"] + 3),
                                      "are no state of a ring"),
    "buffer without rewards": (lambda ts: ts["buffer"].pop("rewards"), "KeyError: 'rewards'"),
    "optimizer state of fewer parameters": (lambda ts: ts["optimizer"]["param_groups"][0]["params"].pop(),
                                            "ValueError: loaded state dict contains a parameter group"),
    "target network without a layer": (lambda ts: ts["target_model"].popitem(), "RuntimeError: Error(s) in loading"),
    "torch RNG state of 3 bytes": (lambda ts: ts["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                                   "RuntimeError"),
}


@pytest.mark.parametrize("script", STOP_RUNS)
def test_resume_from_a_damaged_real_checkpoint_is_refused_in_one_line_and_writes_nothing(script, monkeypatch,
                                                                                       tmp_path, capsys):
    args = STOP_RUNS[script][0] + ["--checkpoint-frequency", 100]
    run_in_process(script, args, monkeypatch, tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    total = 2 * torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["global_step"]
    capsys.readouterr()
    for name, (damage, message) in DAMAGES.items():
        ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
        damage(ckpt["train_state"])
        torch.save(ckpt, tmp_path / "damaged.pt")
        before = {f: os.path.getmtime(f) for f in glob.glob(str(tmp_path / "**"), recursive=True)}
        with pytest.raises(SystemExit) as exit:
            run_in_process(script, args + ["--total-timesteps", total, "--resume", tmp_path / "damaged.pt"],
                           monkeypatch, tmp_path)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1, (name, err)
        assert err[0].startswith("error: checkpoint does not fit this run (") and message in err[0], (name, err)
        assert {f: os.path.getmtime(f) for f in glob.glob(str(tmp_path / "**"), recursive=True)} == before, name
    # the undamaged checkpoint resumes (so each refusal above is the damage's doing)
    run_in_process(script, args + ["--total-timesteps", total, "--resume", run_dir], monkeypatch, tmp_path)
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["global_step"] == total


# ---- --max-nonfinite-updates N: the run stops at the first logging step that counts N skipped updates ----
@pytest.mark.parametrize("script", STOP_RUNS)
def test_run_stops_at_the_logging_step_that_counts_max_nonfinite_updates(script, monkeypatch, tmp_path, capsys):
    """Updates 2, 9, 10, 17 and 18 are made non-finite (the gradient norm the update computes is NaN, so
    the fused Adam skips them); the counter is read every 12 steps, at updates 2, 14 and 26: with
    --max-nonfinite-updates 4 the run stops at update 26, having counted 5."""
    args, step_of_update = STOP_RUNS[script]
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_nan_on_schedule(*a, **kw):
        calls.append(None)
        norm = clip(*a, **kw)
        return norm * NAN if len(calls) in {2, 9, 10, 17, 18} else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_nan_on_schedule)
    with pytest.raises(SystemExit) as exit:
        run_in_process(script, args + ["--max-nonfinite-updates", 4, "--log-frequency", 12], monkeypatch, tmp_path)
    assert exit.value.code != 0 and len(calls) == 26
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: 5 updates had a non-finite loss or gradient (each skipped); stopping at step "
                           f"{step_of_update(26)}.")
