"""Resume (checkpoint.pt): kill -9 and continue, atomic writes, argument checks (bad files: test_bad_input.py)."""
import glob
import os
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import ebflow_continuous_action as meow
import ebflow_isaacgym as isaac

from .conftest import ROOT, hold_lock, kill_after_first_checkpoint, read_tensorboard

SCRIPT = "ebflow_continuous_action.py"
# Episodes of exactly 4 steps from a random start: every checkpoint (a multiple of 400 steps) is at a boundary.
RUN_ARGS = ["--env-id", "tests.scripted_env:RandomStart-v0", "--total-timesteps", 1600, "--learning-starts", 100,
            "--batch-size", 32, "--checkpoint-frequency", 400, "--log-frequency", 50, "--eval-frequency", 800,
            "--eval-episodes", 1, "--no-cuda", "--torch-deterministic", "--seed", 3]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b, path="ckpt"):
    """Recursive exact equality of two checkpoint trees (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a} != {b}"


def test_killed_run_resumes_and_matches_the_uninterrupted_run(tmp_path):
    # the uninterrupted run
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPT), *map(str, RUN_ARGS)], cwd=ref_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (ref_run,) = glob.glob(str(ref_dir / "runs" / "*"))

    # the same run, killed with SIGKILL once it has written a checkpoint
    work = tmp_path / "killed"
    work.mkdir()
    run_dir = kill_after_first_checkpoint([sys.executable, os.path.join(ROOT, SCRIPT), *map(str, RUN_ARGS)],
                                          str(work), env)
    saved = load(os.path.join(run_dir, "checkpoint.pt"))
    saved_step = saved["train_state"]["global_step"]
    assert saved_step % 400 == 0 and saved_step < 1600, "the kill came too late to test anything"

    # the checkpoint holds the complete state
    ts = saved["train_state"]
    for key in ["target_model", "optimizer", "buffer", "best_eval", "rng", "run_name", "args"]:
        assert key in ts
    assert ts["buffer"]["size"] == saved_step and ts["buffer"]["obs"].dtype == torch.float32
    for rng in ["torch", "env", "action_space"]:  # the streams training draws from
        assert rng in ts["rng"]

    # resume to the end
    out = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPT), *map(str, RUN_ARGS), "--resume", run_dir],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resumed" in out.stdout and f"at step {saved_step}" in out.stdout
    final, ref_final = load(os.path.join(run_dir, "checkpoint.pt")), load(os.path.join(ref_run, "checkpoint.pt"))
    assert final["train_state"]["global_step"] == 1600
    # checkpoints at multiples of 4 steps are episode boundaries: the resumed run is the uninterrupted
    # run, bit for bit: networks, target, optimizer moments, buffer, counters, RNG states
    ref_final["train_state"]["run_name"] = final["train_state"]["run_name"]
    ref_final["train_state"]["args"]["resume"] = final["train_state"]["args"]["resume"]
    assert_same_state(final, ref_final)
    # and the TensorBoard curve has every step once, with the uninterrupted run's losses
    losses = read_tensorboard(run_dir)[0]["losses/qf_loss"]
    ref_losses = read_tensorboard(ref_run)[0]["losses/qf_loss"]
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]
    assert losses == ref_losses
    # each start logs the versions it ran on: the killed run at step 0, the resumed one at its first step
    assert [s for s, _ in read_tensorboard(run_dir)[1]["versions/text_summary"]] == [0, saved_step]


def test_rng_state_round_trip_restarts_the_same_episode():
    env = meow.make_env("Hopper-v4")
    env.reset(seed=5)
    env.action_space.seed(5)
    state = meow.rng_state(env)
    first = (env.reset()[0], env.action_space.sample(), torch.rand(3), float(torch.randn(())))
    meow.set_rng_state(state, env)
    second = (env.reset()[0], env.action_space.sample(), torch.rand(3), float(torch.randn(())))
    assert (first[0] == second[0]).all() and (first[1] == second[1]).all()
    assert torch.equal(first[2], second[2]) and first[3] == second[3]


def test_dying_while_writing_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    code = f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
import ebflow_continuous_action as meow
meow.save_atomic({{"step": 1, "w": torch.arange(1000.)}}, {str(path)!r})
real_save = torch.save
def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os._exit(9)  # the process dies in the middle of writing
torch.save = dying_save
meow.save_atomic({{"step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 9
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("small")
    args = ["--env-id", "Hopper-v4", "--total-timesteps", 300, "--learning-starts", 200, "--batch-size", 16,
            "--checkpoint-frequency", 300, "--eval-frequency", 1000, "--eval-episodes", 1]
    out = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPT), *map(str, args)],
                         cwd=work, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(work / "runs" / "*"))
    return run_dir


@pytest.mark.parametrize("extra,message", [
    (["--env-id", "Walker2d-v4"], "--env-id Hopper-v4 (got Walker2d-v4)"),
    (["--flow-hidden", 32], "--flow-hidden 64 (got 32)"),
    (["--shift-hidden", 128], "--shift-hidden 256 (got 128)"),
    (["--alpha", 0.1], "--alpha 0.25 (got 0.1)"),
])
def test_resume_with_mismatched_arguments_fails_cleanly(run, small_checkpoint, extra, message):
    base = ["--total-timesteps", 600, "--learning-starts", 200, "--batch-size", 16, "--checkpoint-frequency", 300,
            "--eval-frequency", 1000, "--eval-episodes", 1]
    out = run(SCRIPT, *base, *extra, "--resume", small_checkpoint)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: cannot resume") and message in line


def tree(run_dir):
    """Every file under run_dir with its bytes: a refused process must leave all of them as they were."""
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(run_dir, "**"), recursive=True))
            if os.path.isfile(p)}


@pytest.mark.skipif(sys.platform == "win32", reason="flock: POSIX only (runs on Windows are not guarded)")
@pytest.mark.parametrize("script,args", [
    (SCRIPT, ["--env-id", "tests.scripted_env:RandomStart-v0", "--learning-starts", 50, "--batch-size", 16,
              "--eval-frequency", 10**6, "--eval-episodes", 1, "--no-cuda"]),
    ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--env-id", "tests.scripted_env:RandomStart-v0",
                            "--num-envs", 2, "--learning-starts", 25, "--batch-size", 16, "--buffer-size", 1000,
                            "--eval-frequency", 10**6, "--eval-episodes", 2, "--no-cuda"]),
])
def test_one_process_trains_a_run_at_a_time(tmp_path, script, args):
    # a sweep started again while its first run still trains, or --resume typed twice: the second
    # process must stop before it writes anything, naming the one that trains
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args), "--checkpoint-frequency", "200"]
    first = subprocess.run(cmd + ["--total-timesteps", "200"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    lock_file = os.path.join(run_dir, "train.lock")
    assert os.path.exists(lock_file)  # left behind by the finished run, no longer held
    resume = cmd + ["--total-timesteps", "400", "--resume", run_dir]

    # 1. the lock held by another process (here, this test): refused, and nothing written
    held = hold_lock(lock_file, "pid 4242 on elsewhere\n")
    before = tree(run_dir)
    refused = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = [s for s in refused.stderr.splitlines() if s.startswith("error:")]
    assert "is being trained by another process (pid 4242 on elsewhere)" in line, line
    assert tree(run_dir) == before
    held.close()  # releases the lock, as the end of a process does

    # 2. a real training process holds it while it trains; a second resume names its pid
    trainer = subprocess.Popen(cmd + ["--total-timesteps", "1000000", "--resume", run_dir], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while f"pid {trainer.pid} " not in open(lock_file).read() and time.time() < deadline:
            assert trainer.poll() is None, "the trainer ended early"
            time.sleep(0.05)
        second = subprocess.run(cmd + ["--total-timesteps", "2000000", "--resume", run_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"is being trained by another process (pid {trainer.pid} on " in second.stderr, second.stderr
        assert trainer.poll() is None  # the first one trains on
    finally:
        trainer.kill()
        trainer.wait()

    # 3. killed (kill -9), its lock is gone with it: the run resumes from its last checkpoint
    step = load(os.path.join(run_dir, "checkpoint.pt"))["train_state"]["global_step"]
    again = subprocess.run(cmd + ["--total-timesteps", str(step + 200), "--resume", run_dir], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert load(os.path.join(run_dir, "checkpoint.pt"))["train_state"]["global_step"] == step + 200


def test_vectorized_run_killed_and_resumed_continues_from_exactly_its_checkpoint(tmp_path):
    """ebflow_isaacgym.py killed after a checkpoint, resumed for one vector step. Its envs start fresh episodes
    (their state is not saved), so no later state equals the uninterrupted run's; instead the state after that
    one step must follow from the checkpoint's: normaliser, Adam moments, online and target weights, counters."""
    n, tau, lr, betas, eps = 4, 0.3, 1e-3, (0.9, 0.999), 1e-8  # Adam's defaults
    args = ["--backend", "gymnasium", "--env-id", "tests.scripted_env:RandomStart-v0", "--num-envs", n,
            "--learning-starts", 10, "--batch-size", 32, "--buffer-size", 1000, "--checkpoint-frequency", 30 * n,
            "--log-frequency", 1, "--eval-frequency", 10**6, "--eval-episodes", 2, "--tau", tau,
            "--learning-rate", lr, "--flow-hidden", 16, "--shift-hidden", 16, "--no-cuda"]
    cmd = [sys.executable, os.path.join(ROOT, "ebflow_isaacgym.py"), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run_dir = kill_after_first_checkpoint(cmd + ["--total-timesteps", str(1000 * n)], str(tmp_path), env)
    path = os.path.join(run_dir, "checkpoint.pt")
    saved = load(path)
    step = saved["train_state"]["global_step"]
    assert step % (30 * n) == 0 and step < 1000 * n
    # counters this run cannot reach by itself, so that one left at its initial value shows
    saved["train_state"].update(nonfinite_updates=3.0, best_eval=1e9, last_eval=-12.5)
    torch.save(saved, path)
    out = subprocess.run(cmd + ["--total-timesteps", str(step + n), "--resume", run_dir], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    end, ts0 = load(path), saved["train_state"]
    ts1 = end["train_state"]
    assert end["global_step"] == ts1["global_step"] == step + n
    assert ts1["nonfinite_updates"] == 3.0 and ts1["best_eval"] == 1e9
    assert "eval -12.5" in out.stdout  # the progress line before the run's final evaluation shows the restored one

    # the buffer: the saved rows, then the new vector step's transitions
    row = step // n
    assert ts1["buffer"]["size"] == row + 1
    for key, saved_rows in ts0["buffer"].items():
        if isinstance(saved_rows, torch.Tensor):
            assert torch.equal(ts1["buffer"][key][:row], saved_rows), key
    # its first s: the fresh episodes of env i begin from reset seed (seed 1 + vector steps done) + i, not
    # the seeds the run began with, whose episodes it has played
    starts = [gym.make("tests.scripted_env:RandomStart-v0").reset(seed=1 + row + i)[0] for i in range(n)]
    assert torch.equal(ts1["buffer"]["obs"][row], torch.tensor(np.stack(starts)))
    # the normaliser: the saved statistics and the N observations of that step (no episode ends in the first
    # step after a reset, so they are the buffer's s'), combined through the first and second moments
    new = ts1["buffer"]["next_obs"][row].double()
    norm0, norm1 = saved["obs_normalizer"], end["obs_normalizer"]
    count = norm0["count"] + n
    mean = (norm0["count"] * norm0["mean"] + new.sum(0)) / count
    second = (norm0["count"] * (norm0["var"] + norm0["mean"] ** 2) + (new**2).sum(0)) / count
    assert norm1["count"] == count
    assert torch.allclose(norm1["mean"], mean, rtol=1e-9) and torch.allclose(norm1["var"], second - mean**2, rtol=1e-6)

    # Adam: one more step on the saved moments, m <- b1 m + (1 - b1) g and v <- b2 v + (1 - b2) g^2 for one g,
    # and the saved weights moved by lr m_hat / (sqrt(v_hat) + eps)
    names = [name for name, _ in isaac.EBFlowPolicy(3, 2, 0.1, -5.0, -0.3).named_parameters()]
    for i, name in enumerate(names):
        st0, st1 = ts0["optimizer"]["state"][i], ts1["optimizer"]["state"][i]
        t = st1["step"].item()
        assert t == st0["step"].item() + 1, name
        g = (st1["exp_avg"] - betas[0] * st0["exp_avg"]) / (1 - betas[0])
        expected_v = betas[1] * st0["exp_avg_sq"] + (1 - betas[1]) * g**2
        assert torch.allclose(st1["exp_avg_sq"], expected_v, rtol=1e-4, atol=1e-12), name
        m_hat, v_hat = st1["exp_avg"] / (1 - betas[0] ** t), st1["exp_avg_sq"] / (1 - betas[1] ** t)
        expected = saved["model"][name] - lr * m_hat / (v_hat.sqrt() + eps)
        assert torch.allclose(end["model"][name], expected, rtol=0, atol=1e-6), name
        # the target: its V networks moved by tau from the saved target towards the new online weights
        target0, target1 = ts0["target_model"][name], ts1["target_model"][name]
        if name.startswith(("log_scale_net.", "shift_nets.")):
            assert torch.allclose(target1, target0 + tau * (end["model"][name] - target0), rtol=0, atol=1e-6), name
        else:
            assert torch.equal(target1, target0), name


def test_vectorized_resume_with_other_arguments_is_refused_and_writes_nothing(run, tmp_path):
    args = ["--backend", "gymnasium", "--env-id", "tests.scripted_env:RandomStart-v0", "--num-envs", 2,
            "--learning-starts", 25, "--batch-size", 16, "--buffer-size", 1000, "--checkpoint-frequency", 100,
            "--eval-frequency", 10**6, "--eval-episodes", 2, "--no-cuda"]
    assert run("ebflow_isaacgym.py", *args, "--total-timesteps", 200).returncode == 0
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    before = tree(run_dir)
    out = run("ebflow_isaacgym.py", *args, "--total-timesteps", 400, "--tau", 0.01, "--resume", run_dir)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line == "error: cannot resume: arguments differ from the checkpoint's: --tau 0.0005 (got 0.01)"
    assert tree(run_dir) == before
