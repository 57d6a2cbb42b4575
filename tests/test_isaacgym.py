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
from .conftest import ROOT, documented_tags, kill_after_first_checkpoint, read_tensorboard
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
    assert torch.all(obs == 0)  # VecTask.reset() computes nothing
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
    # the transition right after an episode end spans IsaacGymEnvs' deferred reset: valid = 0, and so
    # does the first one (from reset()'s zeros: reset_buf starts at ones, the first step resets every env)
    done = (term + trunc) > 0
    assert torch.equal(valid[1:], (~done[:-1]).float())
    assert torch.all(valid[0] == 0)
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
    tags, texts = read_tensorboard(run_dir)
    scalar_tags, text_names = documented_tags()  # what docs/meow.md explains, no more and no less
    assert set(tags) == scalar_tags - {"eval/return_stochastic"} and all(tags.values())
    assert set(texts) == {f"{name}/text_summary" for name in text_names}
    assert texts["evaluation/text_summary"] == [(0, f"8 episodes, {isaac.EVAL_RULE}")]
    assert tags["charts/SPS"][-1][0] == 16 * 300  # global_step counts transitions over all envs
    lengths = [v for _, v in tags["charts/episodic_length"]]
    assert all(1 <= v <= 7 for v in lengths)
    buf = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["buffer"]
    assert buf["obs"].shape == (100, 16, 2) and buf["valid"].min() == 0 and buf["valid"].max() == 1


def test_stand_in_copies_vectask_buffer_semantics(monkeypatch):
    """The stand-in itself, against the facts read in IsaacGymEnvs' vec_task.py (see its docstring)."""
    task = fake_isaacgymenvs.make(seed=0, task="ClockAfter", num_envs=3, sim_device="cpu", rl_device="cpu")
    assert torch.all(task.reset()["obs"] == 0) and torch.all(task.reset_buf == 1)
    obs_dict, rew, reset, extras = task.step(torch.full((3, 1), 7.0))
    assert rew is task.rew_buf and reset is task.reset_buf  # the task's own buffers, updated in place
    assert torch.all(task.actions == 1.0)  # actions clamped by clipActions
    assert torch.all(obs_dict["obs"][:, 2] == 10.0)  # 20 * a, clamped by clipObservations
    assert obs_dict is task.reset()  # one dict, refilled


def test_isaacgym_adapter_returns_copies_not_the_tasks_buffers(monkeypatch):
    """step() returns tensors the task overwrites in place in the next step: the adapter copies them."""
    env = fake_isaac_env(monkeypatch)
    env.reset()
    first = env.step(torch.rand(env.num_envs, env.act_dim) * 2 - 1)
    kept = [t.clone() for t in first]
    for _ in range(10):  # enough for the Line task to end and reset episodes
        env.step(torch.rand(env.num_envs, env.act_dim) * 2 - 1)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    for t in first:
        assert t.data_ptr() not in {env.envs.rew_buf.data_ptr(), env.envs.reset_buf.data_ptr()}


def clock_episode(task, env_index):
    """By hand, from the stand-in's rules: the progress values one whole episode of env i returns
    (Ant style: the reset step returns progress 0; AllegroHand style: progress 0 is never observed),
    its return (reward 1 + progress at every step) and whether it ends by a fall (terminated)."""
    _, length, fall_at = fake_isaacgymenvs.TASKS[task]
    last = min(fall_at(env_index), length - 1)
    first = 0 if task.startswith("ClockAfter") else 1
    progress = list(range(first, last + 1))
    return progress, sum(1 + p for p in progress), fall_at(env_index) < length - 1


@pytest.mark.parametrize("task", ["ClockAfter", "ClockBefore"])
def test_isaacgym_training_keeps_no_stale_or_cross_reset_transition_and_logs_whole_episodes(run, tmp_path, task):
    """A run on the stand-in, evaluated twice on its training envs, then resumed (a fresh env: stale
    zeros again). In the replay buffer, a transition is valid exactly when it is not the first after
    reset() and does not start from an episode's final observation; every valid one is one step of
    one episode. Every logged training and evaluation return is the return of a whole episode."""
    n, n_vec = 4, 60
    progress, ep_return, falls = clock_episode(task, 0)
    args = ["--backend", "isaacgym", "--env-id", task, "--num-envs", n, "--sim-device", "cpu", "--no-cuda",
            "--learning-starts", 20, "--batch-size", 16, "--buffer-size", 2 * n_vec, "--log-frequency", 5,
            "--eval-frequency", n * 25, "--eval-episodes", 3, "--checkpoint-frequency", n * n_vec]
    out = run(SCRIPT, *args, "--total-timesteps", n * n_vec, env=WITH_FAKE_ISAAC)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{task}__*"))
    out = run(SCRIPT, *args, "--total-timesteps", 2 * n * n_vec, "--resume", run_dir, env=WITH_FAKE_ISAAC)
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    buf = ckpt["train_state"]["buffer"]
    assert buf["size"] == 2 * n_vec
    obs_p, next_p = buf["obs"][..., 0], buf["next_obs"][..., 0]  # observation 0 is the progress counter
    after_reset = torch.zeros(2 * n_vec, n, dtype=torch.bool)
    after_reset[[0, n_vec]] = True  # the first transition of each of the two processes
    assert torch.all(buf["obs"][after_reset] == 0)  # reset()'s stale zeros
    assert torch.equal(buf["valid"] == 1, ~after_reset & (obs_p != progress[-1]))
    v = buf["valid"] == 1
    assert torch.all(buf["obs"][v][:, 1] > 0)  # never the stale zeros
    assert torch.equal(next_p[v], obs_p[v] + 1)  # one step inside one episode
    assert torch.equal(buf["rewards"][v], 1 + next_p[v])
    assert torch.equal(buf["terminated"][v] == 1, (next_p[v] == progress[-1]) & falls)
    # the normaliser saw every observation step() returned (observation 1 is env index + 1), no zeros
    norm = ckpt["obs_normalizer"]
    assert norm["count"].item() == 2 * n_vec * n and norm["mean"][1].item() == pytest.approx((n + 1) / 2)
    tags = scalars(run_dir)
    # evaluations at 100, 200, 300, 400, 480 (the first run's last one, at 240, is where the resumed run
    # purges the log from)
    assert [step for step, _ in tags["eval/return"]] == [100, 200, 300, 400, 480]
    assert len(tags["charts/episodic_return"]) >= 10
    for tag, expected in [("charts/episodic_return", ep_return), ("charts/episodic_length", len(progress)),
                          ("eval/return", ep_return)]:
        assert all(value == pytest.approx(expected) for _, value in tags[tag]), (tag, tags[tag])
    assert "evaluation: 3 episodes" in out.stdout and "one complete episode from each" in out.stdout


@pytest.mark.parametrize("task", ["ClockAfterVaried", "ClockBeforeVaried"])
@pytest.mark.parametrize("episodes", [5, 8, 19])
def test_evaluation_mean_is_exact_over_the_episodes_its_rule_selects(monkeypatch, task, episodes):
    """Episode length depends on the env index (3 to 10 steps). The rule counts, in env i, its episodes
    j = 0, 1, ... begun during the evaluation for which j * N + i < episodes, whatever their lengths;
    "the first episodes to finish" would favour the short ones."""
    monkeypatch.setattr(isaac, "isaacgymenvs", fake_isaacgymenvs)
    n = 8
    args = isaac.Args(env_id=task, num_envs=n, sim_device="cpu")
    counts = [len([j for j in range(episodes) if j * n + i < episodes]) for i in range(n)]
    expected = sum(c * clock_episode(task, i)[1] for i, c in enumerate(counts)) / episodes
    flow, normalizer = isaac.EBFlowPolicy(3, 1, 0.1, -5.0, 2.0), isaac.RunningMeanStd(3)
    # training envs in mid-episode (the episodes in progress must not count) ...
    env = isaac.make_env(args, torch.device("cpu"))
    obs = env.reset()
    for _ in range(13):
        obs = env.step(torch.rand(env.num_envs, env.act_dim) * 2 - 1)[0]
    mean, counted, _ = isaac.evaluate(flow, normalizer, env, episodes, obs=obs)
    assert counted == episodes and mean == pytest.approx(expected, rel=1e-6)
    # ... and fresh envs
    mean, counted, _ = isaac.evaluate(flow, normalizer, isaac.make_env(args, torch.device("cpu")), episodes)
    assert counted == episodes and mean == pytest.approx(expected, rel=1e-6)


def test_eval_checkpoint_seeds_before_building_the_env(run, tmp_path):
    """isaacgymenvs.make(seed=) seeds nothing and the tasks draw reset noise from torch's global RNG:
    two evaluations of one checkpoint with the same --seed must agree."""
    torch.manual_seed(0)
    args = isaac.Args(backend="isaacgym", env_id="Line")
    model = tmp_path / "line.cleanrl_model"
    torch.save(isaac.model_checkpoint(isaac.EBFlowPolicy(2, 1, args.alpha, args.sigma_min, args.sigma_max),
                                      isaac.RunningMeanStd(2), args, 2, 1, 0), model)
    printed = []
    for _ in range(2):
        out = run(SCRIPT, "--eval-checkpoint", model, "--eval-episodes", 1, "--seed", 5, "--sim-device", "cpu",
                  "--no-cuda", env=WITH_FAKE_ISAAC)
        assert out.returncode == 0, out.stderr
        printed.append(re.search(r"deterministic return (-?[\d.]+) over 1 episodes", out.stdout).group(1))
    assert printed[0] == printed[1]


def test_gymnasium_adapter_contract_with_ant():
    env = isaac.GymnasiumVecEnv("Ant-v4", 3, 0, None, torch.device("cpu"))
    obs = env.reset(seed=0)
    assert obs.shape == (3, env.obs_dim) and env.act_dim == 8
    saw_end = False
    for _ in range(200):
        actions = torch.rand(env.num_envs, env.act_dim) * 2 - 1
        next_obs, real_next_obs, rewards, terminated, truncated, valid = env.step(actions)
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


@pytest.mark.parametrize("backend,env_id,expected", [
    ("isaacgym", "Ant", ["Isaac Gym is not installed", "--backend gymnasium"]),
    ("isaaclab", "Isaac-Ant", ["Isaac Lab 3.0 is not installed", "isaaclab==3.0.0", "--backend gymnasium"]),
    ("playground", "CartpoleSwingup", ["MuJoCo Playground is not installed", "requirements-playground.txt"]),
])
def test_missing_simulator_is_one_clear_line(run, tmp_path, backend, env_id, expected):
    blocked = tmp_path / "blocked"  # each simulator package first on the path, failing to import as if absent
    for package in ("isaacgym", "isaacgymenvs", "isaaclab", "mujoco_playground"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f'raise ImportError("No module named {package!r}")\n')
    out = run(SCRIPT, "--backend", backend, "--env-id", env_id, "--no-cuda",
              env={"PYTHONPATH": os.pathsep.join([str(blocked), ROOT])})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and all(text in line for text in expected), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--env-id", "CartPole-v1"], "bounded continuous (Box) action space"),
    (["--env-id", "tests.scripted_env:UnboundedAction-v0"], "bounded continuous (Box) action space"),
    (["--env-id", "tests.scripted_env:DictObs-v0"], "needs a flat Box observation space"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make environment"),
])
def test_bad_input_exits_nonzero_with_one_line(run, tmp_path, args, message):
    out = run(SCRIPT, "--backend", "gymnasium", *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and message in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.learning
@pytest.mark.parametrize("seed", [2])  # tuned on seed 1; seeds 1 to 3 reach 1,000 within 48k transitions
def test_gymnasium_backend_learns_inverted_pendulum(run, tmp_path, seed):
    out = run(SCRIPT, "--backend", "gymnasium", "--env-id", "InvertedPendulum-v4", "--num-envs", 8, "--seed", seed,
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
    # each start logs the versions it ran on, the resumed one at its first transition
    logged = read_tensorboard(run_dir)[1]["versions/text_summary"]
    assert [s for s, _ in logged] == [0, step] and logged[0][1] == logged[1][1]
    assert logged[1][1].startswith(f"python {sys.version.split()[0]}, torch {torch.__version__}, ")
    assert f"versions: {logged[1][1]}\n" in out.stdout


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
