"""ebflow_isaacgym.py --backend isaaclab against a stand-in of Isaac Lab 3.0.0 (tests/fake_isaaclab)."""
import glob
import os
import subprocess
import sys

import pytest
import torch

import ebflow_isaacgym as isaac

from .conftest import ROOT, read_tensorboard

SCRIPT = "ebflow_isaacgym.py"
FAKE_DIR = os.path.join(os.path.dirname(__file__), "fake_isaaclab")
KIT_DIR = os.path.join(FAKE_DIR, "kit")  # a fake `isaacsim`: Isaac Sim installed
KIT_READY = "[ISAACLAB] KitLauncher initialization complete"  # on stderr once Kit runs
KIT_CLOSED = "[fake isaacsim] SimulationApp closed"  # the fake's last words: Kit ends the process there
# the stand-in's toy scene (tests/fake_isaaclab/isaaclab/envs): x += 0.5 * action per step, |x| > 1 terminates;
# observation [x, steps so far / max_episode_length]. (max_episode_length, steps at the time-out): Isaac-Ant
# (manager-based, mdp.time_out) and Isaac-Ant-Direct (the locomotion direct env's time-out), both at the limit
STEP_GAIN = 0.5
# reward 1 - |x| at the step's end: times step_dt = 0.25 in the manager-based env (RewardManager), as is for direct
REWARD_SCALE = {"Isaac-Ant": 0.25, "Isaac-Ant-Direct": 1.0}
EPISODE_STEPS = {"Isaac-Ant": (7, 7), "Isaac-Ant-Direct": (8, 8)}


def fake_isaaclab_env(monkeypatch, task, num_envs=6, seed=0, **kwargs):
    """make_env with the stand-in importable (Isaac Sim is not: Kit cannot start in this process)."""
    monkeypatch.syspath_prepend(FAKE_DIR)
    args = isaac.Args(**{"backend": "isaaclab", "env_id": task, "num_envs": num_envs, "sim_device": "cpu",
                         "seed": seed, **kwargs})
    return isaac.make_env(args, torch.device("cpu"))


def rollout(env, steps=40):
    """Random actions; returns the adapter's outputs and, recorded right after each step, the env's own
    terminated / time-out buffers (which the env rewrites in place) and whether extras held a final_obs."""
    obs, history, flags = env.reset(), [], []
    unwrapped = env.envs.unwrapped
    for _ in range(steps):
        actions = torch.rand(env.num_envs, env.act_dim) * 2 - 1
        out = env.step(actions)
        history.append((obs, actions, *out))
        flags.append((unwrapped.reset_terminated.clone(), unwrapped.reset_time_outs.clone(),
                      "final_obs" in unwrapped.extras))
        obs = out[0]
    return history, flags


@pytest.mark.parametrize("task", ["Isaac-Ant", "Isaac-Ant-Direct"])
def test_isaaclab_adapter_transitions(monkeypatch, task):
    env = fake_isaaclab_env(monkeypatch, task)
    from isaaclab.app import LAUNCHES, RUNNING
    from isaaclab.physics import NewtonCfg

    try:
        assert (env.obs_dim, env.act_dim, env.num_envs) == (2, 1, 6)
        # kit-less: the task's Newton preset, nothing started; the true final observation is asked for
        (kit, physics), = LAUNCHES[-1:]
        assert not kit and isinstance(physics, NewtonCfg) and RUNNING == []
        assert env.envs.unwrapped.cfg.compute_final_obs
        history, flags = rollout(env)
    finally:
        env.close()
    T = EPISODE_STEPS[task][0]
    saw = {"terminated": 0, "time-out": 0, "stale final_obs": 0}
    for (obs, actions, next_obs, real_next_obs, rewards, terminated, truncated, valid), (term, time_out, has_final) \
            in zip(history, flags):
        for t in [next_obs, real_next_obs]:
            assert t.shape == (6, 2) and t.dtype == torch.float32
        for t in [rewards, terminated, truncated, valid]:
            assert t.shape == (6,) and t.dtype == torch.float32
        # copies, not the env's buffers: each step's flags are still the ones the env had at that step
        assert torch.equal(terminated.bool(), term) and torch.equal(truncated.bool(), time_out & ~term)
        successor = torch.stack([obs[:, 0] + STEP_GAIN * actions[:, 0], obs[:, 1] + 1 / T], dim=1)
        # also a copy: a manager-based env returns its reward buffer itself
        assert torch.allclose(rewards, (1 - successor[:, 0].abs()) * REWARD_SCALE[task], atol=1e-6)
        running = (terminated + truncated) == 0
        assert torch.allclose(next_obs[running], successor[running], atol=1e-6)
        # a stale extras["final_obs"] (from an earlier step's resets) is not read for envs still running
        assert torch.allclose(real_next_obs[running], successor[running], atol=1e-6)
        ended = ~running
        assert torch.all(next_obs[ended, 1] == 0)  # reset inside step(): the new episode's first observation
        # every s' is the true successor, time-outs included: all learned from
        assert torch.allclose(real_next_obs[ended], successor[ended], atol=1e-6)
        assert torch.all(valid == 1)
        saw["terminated"] += int(terminated.sum())
        saw["time-out"] += int(truncated.sum())
        saw["stale final_obs"] += int(has_final and not ended.any())
    assert all(saw.values()), saw


def test_isaaclab_finite_horizon_time_limit_is_a_termination(monkeypatch):
    env = fake_isaaclab_env(monkeypatch, "Isaac-Ant-Finite-Horizon")
    try:
        history, flags = rollout(env, steps=16)
    finally:
        env.close()
    time_outs = 0
    for (*_, terminated, truncated, valid), (term, time_out, _) in zip(history, flags):
        assert torch.equal(terminated.bool(), term | time_out) and torch.all(truncated == 0)
        assert torch.all(valid == 1)
        time_outs += int(time_out.sum())
    assert time_outs > 0


@pytest.mark.parametrize("task,kwargs,message", [
    ("Isaac-Nope", {}, "cannot make Isaac Lab task 'Isaac-Nope': Environment `Isaac-Nope` doesn't exist"),
    ("Isaac-Ant-v0", {}, "cannot make Isaac Lab task 'Isaac-Ant-v0'"),  # 2.3's ids are gone in 3.0
    ("CartPole-v1", {}, "Could not find configuration"),  # a gymnasium id that is not an Isaac Lab task
    ("Isaac-Ant", {"sim_device": "gpu"}, "--sim-device must be cpu, cuda or cuda:N"),
    ("Isaac-Ant", {"physics": "physx"}, 'Isaac Sim is not installed: pip install "isaaclab==3.0.0"'),
])
def test_isaaclab_bad_input_fails_in_one_line_before_any_launch(monkeypatch, capsys, task, kwargs, message):
    monkeypatch.syspath_prepend(FAKE_DIR)
    from isaaclab.app import LAUNCHES

    launches = len(LAUNCHES)
    with pytest.raises(SystemExit) as exit_info:
        fake_isaaclab_env(monkeypatch, task, **kwargs)
    assert exit_info.value.code == 2 and len(LAUNCHES) == launches
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    if task == "Isaac-Ant-v0":  # gymnasium points at the id without the version
        assert "Isaac-Ant" in line.split("'Isaac-Ant-v0'", 1)[1]


def replay_properties(buf, task):
    """The stored transitions of a run on the stand-in, checked against its dynamics (per env, per step)."""
    T, limit = EPISODE_STEPS[task]
    obs, next_obs, act = buf["obs"], buf["next_obs"], buf["actions"][..., 0]
    valid, terminated = buf["valid"].bool(), buf["terminated"].bool()
    successor_x, successor_t = obs[..., 0] + STEP_GAIN * act, obs[..., 1] + 1 / T
    # no valid transition spans a reset: unless terminated (s' weighted 0), s' is the successor of s
    keep = valid & ~terminated
    assert torch.allclose(next_obs[..., 0][keep], successor_x[keep], atol=1e-5)
    assert torch.allclose(next_obs[..., 1][keep], successor_t[keep], atol=1e-5)
    assert torch.all(successor_x[terminated].abs() > 1.0)
    # time-outs (the step that reaches the time limit), stored with their true final observation
    time_out = (successor_t >= limit / T - 1e-6) & ~terminated
    return time_out, valid


def run_isaaclab(tmp_path, *args, isaac_sim=False):
    path = [FAKE_DIR, ROOT] + ([KIT_DIR] if isaac_sim else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, SCRIPT), "--backend", "isaaclab", "--sim-device", "cpu",
                           "--no-cuda", *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_isaaclab_backend_end_to_end_and_resume(tmp_path):
    """Newton, kit-less (the default): train, checkpoint, resume, save; the buffer holds no transition across a
    reset, and learns from every time-out with its true final observation; Kit never starts."""
    common = ["--env-id", "Isaac-Ant", "--num-envs", 8, "--learning-starts", 100, "--batch-size", 64,
              "--buffer-size", 200, "--eval-frequency", 8 * 75, "--eval-episodes", 4, "--log-frequency", 25,
              "--checkpoint-frequency", 8 * 75]
    first = run_isaaclab(tmp_path, *common, "--total-timesteps", 8 * 75)
    assert first.returncode == 0, first.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Isaac-Ant__*"))
    second = run_isaaclab(tmp_path, *common, "--total-timesteps", 8 * 150, "--resume", run_dir, "--save-model")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout and f"at step {8 * 75}" in second.stdout
    for out in [first, second]:
        assert KIT_READY not in out.stderr and KIT_CLOSED not in out.stdout
    tags = read_tensorboard(run_dir)[0]
    for tag in ["charts/episodic_return", "charts/SPS", "losses/qf_loss", "eval/return"]:
        assert tags.get(tag), tag
    assert os.path.exists(os.path.join(run_dir, "ebflow_isaacgym.cleanrl_model"))
    buf = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["buffer"]
    assert buf["size"] == 150 and buf["obs"].shape == (150, 8, 2)
    time_out, valid = replay_properties(buf, "Isaac-Ant")
    assert time_out.sum() > 0 and valid.all()
    assert buf["terminated"].sum() > 0


def test_isaaclab_backend_physx_through_kit(tmp_path):
    """--physics physx, direct task: Kit starts once, headless, and closes last (ending the process), after
    training and after --eval-checkpoint has printed its result."""
    out = run_isaaclab(tmp_path, "--env-id", "Isaac-Ant-Direct", "--physics", "physx", "--num-envs", 8,
                       "--total-timesteps", 8 * 60, "--learning-starts", 30, "--batch-size", 64, "--buffer-size", 100,
                       "--eval-frequency", 8 * 60, "--eval-episodes", 2, "--checkpoint-frequency", 8 * 60,
                       "--save-model", isaac_sim=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(KIT_READY) == 1
    assert out.stdout.strip().splitlines()[-1] == KIT_CLOSED
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    buf = torch.load(ckpt, weights_only=True)["train_state"]["buffer"]
    time_out, valid = replay_properties(buf, "Isaac-Ant-Direct")
    assert time_out.sum() > 0 and valid.all()
    model = os.path.join(os.path.dirname(ckpt), "ebflow_isaacgym.cleanrl_model")
    out = run_isaaclab(tmp_path, "--physics", "physx", "--eval-checkpoint", model, "--eval-episodes", 2,
                       isaac_sim=True)
    assert out.returncode == 0, out.stderr
    *_, result, closed = out.stdout.strip().splitlines()
    assert result.startswith("Isaac-Ant-Direct: deterministic return") and closed == KIT_CLOSED


@pytest.mark.parametrize("isaac_sim", [False, True], ids=["newton", "physx-kit"])
def test_isaaclab_task_rejected_after_launch_exits_2_in_one_line(tmp_path, isaac_sim):
    """A task MEow cannot use (image observations) is found once the env exists: one line, exit status 2, also
    under Kit, which ends the process with the status it is closed with."""
    physics = ["--physics", "physx"] if isaac_sim else []
    out = run_isaaclab(tmp_path, "--env-id", "Isaac-Cartpole-Camera-Direct", *physics, isaac_sim=isaac_sim)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "MEow needs a flat 'policy' observation vector" in errors[0]
    assert (KIT_CLOSED in out.stdout) == isaac_sim
    assert not (tmp_path / "runs").exists()
