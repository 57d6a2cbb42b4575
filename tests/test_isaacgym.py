"""ebflow_isaacgym.py: the two env adapters' contract, episode boundaries, the normaliser, end-to-end runs."""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ebflow_isaacgym as isaac

from . import fake_isaac
from .conftest import ROOT, kill_after_first_checkpoint, read_tensorboard
from .fake_isaac import isaacgymenvs as fake_isaacgymenvs
from .test_buffer import expected_transitions
from .test_flow_math import random_flow
from .test_loss import batch

SCRIPT = "ebflow_isaacgym.py"
# the fake `isaacgym` and `isaacgymenvs` packages first on the path, as if Isaac Gym were installed
WITH_FAKE_ISAAC = {"PYTHONPATH": os.pathsep.join([os.path.dirname(fake_isaac.__file__), ROOT])}


def scalars(run_dir):
    return read_tensorboard(run_dir)[0]


def fake_isaac_env(monkeypatch, num_envs=4):
    monkeypatch.setattr(isaac, "isaacgymenvs", fake_isaacgymenvs)
    args = isaac.Args(env_id="Line", num_envs=num_envs, sim_device="cpu")
    return isaac.make_env(args, torch.device("cpu"))


def test_isaacgym_adapter_contract_with_fake_isaacgymenvs(monkeypatch):
    env = fake_isaac_env(monkeypatch)
    obs = env.reset()
    assert (env.obs_dim, env.act_dim, env.num_envs) == (2, 1, 4)
    assert obs.shape == (4, 2) and obs.dtype == torch.float32
    # env 0 pushes right until it terminates (|x| > 2); env 1 stands still until its time-out
    actions = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    history = [env.step(actions) for _ in range(12)]
    for next_obs, real_next_obs, rewards, terminated, truncated, valid in history:
        for t in [next_obs, real_next_obs]:
            assert t.shape == (4, 2) and t.dtype == torch.float32
        for t in [rewards, terminated, truncated, valid]:
            assert t.shape == (4,) and t.dtype == torch.float32
        assert torch.all(terminated * truncated == 0)
    term = torch.stack([h[3] for h in history])
    trunc = torch.stack([h[4] for h in history])
    valid = torch.stack([h[5] for h in history])
    assert term[:, 0].sum() >= 1 and trunc[:, 0].sum() == 0  # env 0 terminates, never times out
    assert trunc[:, 1].sum() >= 1 and term[:, 1].sum() == 0  # env 1 only times out
    # the transition right after an episode end spans IsaacGymEnvs' deferred reset: valid = 0
    done = (term + trunc) > 0
    assert torch.equal(valid[1:], (~done[:-1]).float())
    assert torch.all(valid[0] == 1)
    # at an end the observation returned is the true final one (the reset comes one step later)
    t_end = int(term[:, 0].nonzero()[0])
    assert history[t_end][1][0, 0].abs() > 2


def test_isaacgym_backend_runs_end_to_end_with_fake_isaacgymenvs(run, tmp_path):
    """The GPU-simulator path on a CPU: the fake IsaacGymEnvs, with --compile (the GPU option; this is
    where CI runs the Isaac script's compiled update and acting). The other tests run it eagerly."""
    out = run(SCRIPT, "--backend", "isaacgym", "--env-id", "Line", "--num-envs", 16, "--sim-device", "cpu",
              "--total-timesteps", 16 * 300, "--learning-starts", 50, "--batch-size", 128, "--buffer-size", 100,
              "--eval-frequency", 16 * 150, "--eval-episodes", 8, "--log-frequency", 50, "--checkpoint-frequency",
              16 * 300, "--compile", env=WITH_FAKE_ISAAC)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Line__*"))
    tags = scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf_loss", "eval/return"]:
        assert tags.get(tag), tag
    assert tags["charts/SPS"][-1][0] == 16 * 300  # global_step counts transitions over all envs
    lengths = [v for _, v in tags["charts/episodic_length"]]
    assert all(1 <= v <= 7 for v in lengths)
    buf = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["buffer"]
    assert buf["obs"].shape == (100, 16, 2) and buf["valid"].min() == 0 and buf["valid"].max() == 1


def test_gymnasium_adapter_contract_with_ant():
    env = isaac.GymnasiumVecEnv("Ant-v4", 3, seed=0, device=torch.device("cpu"))
    obs = env.reset(seed=0)
    assert obs.shape == (3, env.obs_dim) and env.act_dim == 8
    saw_end = False
    for _ in range(200):
        next_obs, real_next_obs, rewards, terminated, truncated, valid = env.step(env.random_actions())
        assert next_obs.shape == real_next_obs.shape == (3, env.obs_dim) and rewards.shape == (3,)
        assert torch.all(valid == 1)
        ended = (terminated + truncated) > 0
        # envs that did not end: the next observation is the successor; ended ones: reset obs != final obs
        assert torch.equal(next_obs[~ended], real_next_obs[~ended])
        if ended.any():
            saw_end = True
            assert not torch.equal(next_obs[ended], real_next_obs[ended])
    env.close()
    assert saw_end


def test_gymnasium_backend_buffer_keeps_episode_boundaries(run, tmp_path):
    """Two scripted envs in a vector env: per env, the stored transitions are exactly the scripted ones."""
    n_vec = 20
    out = run(SCRIPT, "--backend", "gymnasium", "--env-id", "tests.scripted_env:Scripted-v0", "--num-envs", 2,
              "--total-timesteps", 2 * n_vec, "--learning-starts", 1000, "--checkpoint-frequency", 2 * n_vec,
              "--eval-frequency", 10_000, "--eval-episodes", 1, "--batch-size", 4, "--buffer-size", 64)
    assert out.returncode == 0, out.stderr
    (ckpt,) = tmp_path.glob("runs/*/checkpoint.pt")
    buf = torch.load(ckpt, weights_only=True)["train_state"]["buffer"]
    assert buf["size"] == n_vec
    for e in range(2):
        for i, (obs, r, next_obs, term) in enumerate(expected_transitions(n_vec)):
            assert buf["obs"][i, e].tolist() == obs and buf["next_obs"][i, e].tolist() == next_obs, (i, e)
            assert buf["rewards"][i, e].item() == r and buf["terminated"][i, e].item() == term, (i, e)
            assert buf["valid"][i, e].item() == 1


def test_running_normaliser_matches_numpy_and_clips():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) * np.array([1, 10, 0.1, 1]) for n in [1, 7, 64, 300]]
    norm = isaac.RunningMeanStd(4, clip=5.0)
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
    data = np.concatenate(batches).astype(np.float32).astype(np.float64)
    assert np.allclose(norm.mean.numpy(), data.mean(0), rtol=1e-9, atol=1e-9)
    assert np.allclose(norm.var.numpy(), data.var(0), rtol=1e-9, atol=1e-9)
    assert norm.count.item() == len(data)
    x = torch.tensor(data[:5], dtype=torch.float32)
    expected = (data[:5] - data.mean(0)) / np.sqrt(data.var(0) + 1e-8)
    assert np.allclose(norm(x).numpy(), expected, atol=1e-4)
    far = torch.tensor(data.mean(0) + 100 * data.std(0), dtype=torch.float32)[None]
    assert torch.allclose(norm(far), torch.full((1, 4), 5.0)) and torch.allclose(norm(-far * 3), torch.full((1, 4), -5.0))


def test_missing_isaacgym_is_one_clear_line(run, tmp_path):
    out = run(SCRIPT, "--env-id", "Ant")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "Isaac Gym is not installed" in line and "--backend gymnasium" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--env-id", "CartPole-v1"], "continuous (Box) action space"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make environment"),
])
def test_bad_input_exits_nonzero_with_one_line(run, tmp_path, args, message):
    out = run(SCRIPT, "--backend", "gymnasium", *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and message in line
    assert not (tmp_path / "runs").exists()


def test_gymnasium_backend_learns_inverted_pendulum(run, tmp_path):
    out = run(SCRIPT, "--backend", "gymnasium", "--env-id", "InvertedPendulum-v4", "--num-envs", 8, "--seed", 1,
              "--total-timesteps", 48_000, "--learning-starts", 100, "--batch-size", 256, "--alpha", 0.05,
              "--tau", 0.02, "--sigma-max", -0.3, "--eval-frequency", 8000, "--eval-episodes", 5,
              "--save-model", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "InvertedPendulum-v4__*"))
    evals = [v for _, v in scalars(run_dir)["eval/return"]]
    print("InvertedPendulum-v4 (8 envs) deterministic eval returns:", evals)
    assert len(evals) == 6 and max(evals) >= 900, evals
    # the saved model (with its observation normaliser) reloads and evaluates
    model = os.path.join(run_dir, "ebflow_isaacgym_best.cleanrl_model")
    ev = run(SCRIPT, "--eval-checkpoint", model, "--eval-episodes", 5)
    assert ev.returncode == 0, ev.stderr
    printed = float(re.search(r"deterministic return (-?[\d.]+)", ev.stdout).group(1))
    assert printed >= 0.5 * max(evals)


def test_killed_run_resumes_with_its_state_and_finishes(tmp_path):
    args = ["--backend", "gymnasium", "--env-id", "tests.scripted_env:RandomStart-v0", "--num-envs", 4,
            "--total-timesteps", 4 * 600, "--learning-starts", 20, "--batch-size", 32, "--buffer-size", 1000,
            "--checkpoint-frequency", 4 * 150, "--log-frequency", 25, "--eval-frequency", 4 * 300,
            "--eval-episodes", 2, "--no-cuda"]
    cmd = [sys.executable, os.path.join(ROOT, SCRIPT), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run_dir = kill_after_first_checkpoint(cmd, str(tmp_path), env)
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    step = saved["train_state"]["global_step"]
    assert step % 600 == 0 and step < 2400
    out = subprocess.run(cmd + ["--resume", run_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"at step {step}" in out.stdout
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert final["train_state"]["global_step"] == 2400
    # the buffer continued from the saved one: its first rows are the saved rows, untouched
    n = saved["train_state"]["buffer"]["size"]
    assert final["train_state"]["buffer"]["size"] == 600
    for key in ["obs", "actions", "rewards", "next_obs", "terminated"]:
        assert torch.equal(final["train_state"]["buffer"][key][:n], saved["train_state"]["buffer"][key])
    # the normaliser kept counting from the saved statistics (one reset + 4 per vector step)
    assert final["obs_normalizer"]["count"].item() > saved["obs_normalizer"]["count"].item()
    # the Adam step count went on from the saved one: one update per vector step after learning_starts
    adam_steps = [s["step"].item() for s in final["train_state"]["optimizer"]["state"].values()]
    assert set(adam_steps) == {600 - 20}
    # TensorBoard: every logged step exactly once
    qf = scalars(run_dir)["losses/qf_loss"]
    steps = [s for s, _ in qf]
    assert steps == sorted(set(steps)) and steps[-1] == 2400


def test_isaac_flow_and_loss_match_the_single_env_script():
    """The Isaac script carries its own copy of the network and loss (CleanRL style): same weights in,
    same Q, V, log pi, actions (same RNG) and loss out; `valid` masks transitions out of the mean."""
    import ebflow_continuous_action as meow

    ours = random_flow(5, 3)  # float64, eval mode, every weight random
    theirs = isaac.EBFlowPolicy(5, 3, ours.alpha, ours.sigma_min, ours.sigma_max, flow_hidden=16, shift_hidden=16)
    theirs.double().eval().load_state_dict(ours.state_dict())
    obs, act, rew, next_obs, term = batch(obs_dim=5, act_dim=3, n=40)
    assert torch.equal(theirs.soft_q(obs, act), ours.soft_q(obs, act))
    assert torch.equal(theirs.soft_v(obs), ours.soft_v(obs))
    assert torch.equal(theirs.log_prob(obs, act), ours.log_prob(obs, act))
    assert torch.equal(theirs.deterministic_action(obs), ours.deterministic_action(obs))
    torch.manual_seed(2)
    a1 = ours.sample(obs)
    torch.manual_seed(2)
    assert torch.equal(theirs.sample(obs), a1)
    # loss: all valid = the single-env loss; valid masks rows out of the mean
    valid = torch.ones(40, dtype=torch.float64)
    loss_ours, _ = meow.soft_bellman_loss(ours, ours, obs, act, rew, next_obs, term, 0.99)
    loss_theirs, _ = isaac.soft_bellman_loss(theirs, theirs, obs, act, rew, next_obs, term, valid, 0.99)
    assert torch.allclose(loss_theirs, loss_ours, rtol=1e-12)
    valid[::2] = 0.0
    keep = valid.bool()
    loss_masked, _ = isaac.soft_bellman_loss(theirs, theirs, obs, act, rew, next_obs, term, valid, 0.99)
    loss_kept, _ = meow.soft_bellman_loss(ours, ours, obs[keep], act[keep], rew[keep], next_obs[keep], term[keep], 0.99)
    assert torch.allclose(loss_masked, loss_kept, rtol=1e-12)
