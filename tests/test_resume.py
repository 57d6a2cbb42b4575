"""Resume (checkpoint.pt): kill -9 and continue, atomic writes, argument checks (bad files: test_bad_input.py)."""
import glob
import os
import subprocess
import sys
import time

import pytest
import torch

import ebflow_continuous_action as meow

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
    for rng in ["python", "numpy", "torch", "env", "action_space"]:
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
