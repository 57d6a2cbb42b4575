"""ebflow_isaacgym.py --backend isaaclab against a stand-in of Isaac Lab 2.3.2 (tests/fake_isaaclab)."""
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
# the stand-in's toy scene (tests/fake_isaaclab/isaaclab/envs): x += 0.5 * action per step, |x| > 1 terminates;
# observation [x, steps so far / max_episode_length]. (max_episode_length, steps at the time-out): Ant
# (manager-based, mdp.time_out) and Franka (direct, its _get_dones times out at max_episode_length - 1)
STEP_GAIN = 0.5
# reward 1 - |x| at the step's end: times step_dt = 0.25 in the manager-based env (RewardManager), as is for direct
REWARD_SCALE = {"Isaac-Ant-v0": 0.25, "Isaac-Franka-Cabinet-Direct-v0": 1.0}
EPISODE_STEPS = {"Isaac-Ant-v0": (7, 7), "Isaac-Franka-Cabinet-Direct-v0": (8, 7)}


def fake_isaaclab_env(monkeypatch, task, final_obs=False, num_envs=6, seed=0):
    """make_env with the stand-in importable; final_obs=True: a later Isaac Lab with `compute_final_obs`."""
    monkeypatch.syspath_prepend(FAKE_DIR)
    from isaaclab.app import AppLauncher

    app = AppLauncher(headless=True, device="cpu").app  # Isaac Lab's other modules import only while it runs
    import isaaclab.envs

    app.close()
    if final_obs:
        for cfg in (isaaclab.envs.ManagerBasedRLEnvCfg, isaaclab.envs.DirectRLEnvCfg):
            monkeypatch.setattr(cfg, "compute_final_obs", False, raising=False)
    args = isaac.Args(backend="isaaclab", env_id=task, num_envs=num_envs, sim_device="cpu", seed=seed)
    return isaac.make_env(args, torch.device("cpu"))


def rollout(env, steps=40):
    """Random actions; returns the adapter's outputs and, recorded right after each step, the env's own
    terminated / time-out buffers (which the env rewrites in place)."""
    obs, history, flags = env.reset(), [], []
    unwrapped = env.envs.unwrapped
    for _ in range(steps):
        actions = env.random_actions()
        out = env.step(actions)
        history.append((obs, actions, *out))
        flags.append((unwrapped.reset_terminated.clone(), unwrapped.reset_time_outs.clone()))
        obs = out[0]
    return history, flags


@pytest.mark.parametrize("task", ["Isaac-Ant-v0", "Isaac-Franka-Cabinet-Direct-v0"])
@pytest.mark.parametrize("final_obs", [False, True], ids=["isaaclab-2.3.2", "later-with-final-obs"])
def test_isaaclab_adapter_transitions(monkeypatch, task, final_obs):
    env = fake_isaaclab_env(monkeypatch, task, final_obs=final_obs)
    assert (env.obs_dim, env.act_dim, env.num_envs, env.has_final_obs) == (2, 1, 6, final_obs)
    history, flags = rollout(env)
    env.close()
    T = EPISODE_STEPS[task][0]
    saw = {"terminated": 0, "time-out": 0}
    for (obs, actions, next_obs, real_next_obs, rewards, terminated, truncated, valid), (term, time_out) in zip(
            history, flags):
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
        assert torch.allclose(real_next_obs[running], successor[running], atol=1e-6)
        ended = ~running
        assert torch.all(next_obs[ended, 1] == 0)  # reset inside step(): the new episode's first observation
        timed_out = truncated.bool()
        if final_obs:  # every s' is the true successor, time-outs included: all learned from
            assert torch.allclose(real_next_obs[ended], successor[ended], atol=1e-6)
            assert torch.all(valid == 1)
        else:  # no true s' for a time-out: it is not learned from; a termination is (its s' gets weight 0)
            assert torch.equal(valid, (~timed_out).float())
        saw["terminated"] += int(terminated.sum())
        saw["time-out"] += int(truncated.sum())
    assert saw["terminated"] > 0 and saw["time-out"] > 0, saw


def test_isaaclab_finite_horizon_time_limit_is_a_termination(monkeypatch):
    env = fake_isaaclab_env(monkeypatch, "Isaac-Ant-Finite-Horizon-v0")
    history, flags = rollout(env, steps=16)
    env.close()
    time_outs = 0
    for (*_, terminated, truncated, valid), (term, time_out) in zip(history, flags):
        assert torch.equal(terminated.bool(), term | time_out) and torch.all(truncated == 0)
        assert torch.all(valid == 1)
        time_outs += int(time_out.sum())
    assert time_outs > 0


@pytest.mark.parametrize("task,message", [
    ("Isaac-Nope-v0", "doesn't exist"),
    ("CartPole-v1", "Could not find configuration"),  # a gymnasium id that is not an Isaac Lab task
])
def test_isaaclab_unknown_task_closes_the_app_and_fails_in_one_line(monkeypatch, capsys, task, message):
    with pytest.raises(SystemExit) as exit_info:
        fake_isaaclab_env(monkeypatch, task)
    assert exit_info.value.code != 0
    from isaaclab.app import RUNNING

    assert RUNNING == []  # the app it launched was closed
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot make Isaac Lab task '{task}'") and message in line


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
    # time-outs (the step that reaches the time limit): valid only with the true final observation
    time_out = (successor_t >= limit / T - 1e-6) & ~terminated
    return time_out, valid


def run_isaaclab(tmp_path, *args, final_obs=False):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([FAKE_DIR, ROOT]), "OMP_NUM_THREADS": "1",
           "FAKE_ISAACLAB_FINAL_OBS": "1" if final_obs else "0"}
    return subprocess.run([sys.executable, os.path.join(ROOT, SCRIPT), "--backend", "isaaclab", "--sim-device", "cpu",
                           "--no-cuda", *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_isaaclab_backend_end_to_end_and_resume(tmp_path):
    """Isaac Lab 2.3.2 (no final observation): train, checkpoint, resume, save; the buffer holds no transition
    across a reset and learns from no time-out; the app is launched once per run and closed last."""
    common = ["--env-id", "Isaac-Ant-v0", "--num-envs", 8, "--learning-starts", 100, "--batch-size", 64,
              "--buffer-size", 200, "--eval-frequency", 8 * 75, "--eval-episodes", 4, "--log-frequency", 25,
              "--checkpoint-frequency", 8 * 75]
    first = run_isaaclab(tmp_path, *common, "--total-timesteps", 8 * 75)
    assert first.returncode == 0, first.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Isaac-Ant-v0__*"))
    second = run_isaaclab(tmp_path, *common, "--total-timesteps", 8 * 150, "--resume", run_dir, "--save-model")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout and f"at step {8 * 75}" in second.stdout
    for out in [first, second]:
        lines = out.stdout.strip().splitlines()
        assert sum("[INFO][AppLauncher]" in line for line in lines) == 1
        assert lines[-1] == "Simulation App Shutdown Complete"
    tags = read_tensorboard(run_dir)[0]
    for tag in ["charts/episodic_return", "charts/SPS", "losses/qf_loss", "eval/return"]:
        assert tags.get(tag), tag
    assert os.path.exists(os.path.join(run_dir, "ebflow_isaacgym.cleanrl_model"))
    buf = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["train_state"]["buffer"]
    assert buf["size"] == 150 and buf["obs"].shape == (150, 8, 2)
    time_out, valid = replay_properties(buf, "Isaac-Ant-v0")
    assert time_out.sum() > 0 and not valid[time_out].any()
    assert buf["terminated"].sum() > 0


def test_isaaclab_backend_bootstraps_time_outs_from_the_final_observation(tmp_path):
    """A later Isaac Lab (compute_final_obs), direct task: time-outs are stored with their true s'."""
    out = run_isaaclab(tmp_path, "--env-id", "Isaac-Franka-Cabinet-Direct-v0", "--num-envs", 8, "--total-timesteps",
                       8 * 60, "--learning-starts", 30, "--batch-size", 64, "--buffer-size", 100,
                       "--eval-frequency", 8 * 60, "--eval-episodes", 2, "--checkpoint-frequency", 8 * 60,
                       final_obs=True)
    assert out.returncode == 0, out.stderr
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    buf = torch.load(ckpt, weights_only=True)["train_state"]["buffer"]
    time_out, valid = replay_properties(buf, "Isaac-Franka-Cabinet-Direct-v0")
    assert time_out.sum() > 0 and valid[time_out].all() and valid.all()


def test_missing_isaaclab_is_one_clear_line(run, tmp_path):
    out = run(SCRIPT, "--backend", "isaaclab", "--env-id", "Isaac-Ant-v0")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "Isaac Lab is not installed" in line and "isaaclab[isaacsim]==2.3.2.post1" in line
    assert "--backend gymnasium" in line
    assert not (tmp_path / "runs").exists()
