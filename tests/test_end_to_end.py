"""ebflow_continuous_action.py run as a user runs it: logs, checkpoints, reload, bad input, determinism."""
import glob
import os
import re
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import ebflow_continuous_action as meow

from .conftest import documented_tags, read_tensorboard

SCRIPT = "ebflow_continuous_action.py"
SHORT = ["--total-timesteps", 1200, "--learning-starts", 600, "--eval-frequency", 600, "--eval-episodes", 2,
         "--log-frequency", 200, "--batch-size", 64]


def test_short_hopper_run_logs_tags_saves_and_reloads(run, tmp_path):
    out = run(SCRIPT, "--env-id", "Hopper-v4", *SHORT, "--save-model")
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Hopper-v4__*"))
    tags, text_tags = read_tensorboard(run_dir)
    scalar_tags, texts = documented_tags()  # what docs/meow.md explains, no more and no less
    assert set(tags) == scalar_tags - {"eval/return_stochastic"} and all(tags.values())
    assert set(text_tags) == {f"{name}/text_summary" for name in texts - {"evaluation"}}
    assert [s for s, _ in tags["eval/return"]] == [599, 1199]
    # the versions the run used, as this (the same) interpreter sees them, printed and logged at step 0
    import mujoco
    versions = (f"python {sys.version.split()[0]}, torch {torch.__version__}, gymnasium {gym.__version__}, "
                f"numpy {np.__version__}, mujoco {mujoco.__version__}")
    assert f"versions: {versions}\n" in out.stdout
    assert text_tags["versions/text_summary"] == [(0, versions)]
    assert re.search(r"step 1200/1200 \| SPS \d+ \| left 0\.0h", out.stdout)
    model = os.path.join(run_dir, "ebflow_continuous_action.cleanrl_model")
    assert os.path.exists(model) and os.path.exists(model.replace(".cleanrl_model", "_best.cleanrl_model"))
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))

    # reload through the CLI and evaluate
    ev = run(SCRIPT, "--eval-checkpoint", model, "--eval-episodes", 2, "--seed", 7)
    assert ev.returncode == 0, ev.stderr
    printed = float(re.search(r"deterministic return (-?[\d.]+)", ev.stdout).group(1))
    # independently: rebuild the policy from the state_dict and roll it out by hand
    assert printed == pytest.approx(np.mean(rollouts(hopper_flow(model), seeds=[7, 8])), abs=0.06)


def hopper_flow(path):
    """A Hopper-v4 policy rebuilt by hand from a saved model's state_dict, in eval mode."""
    flow = meow.EBFlowPolicy(11, 3, 0.25, -5.0, -0.3)
    flow.load_state_dict(torch.load(path, weights_only=True)["model"])
    return flow.eval()


def rollouts(flow, seeds, noise=None):
    """Hopper-v4 returns of one episode per reset seed: deterministic actions (u = 0), or with `noise`
    (a torch.Generator) u ~ N(0, I) drawn from it, one draw per step."""
    env = gym.wrappers.RescaleAction(gym.make("Hopper-v4"), -np.ones(3, np.float32), np.ones(3, np.float32))
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            u = torch.zeros(1, 3) if noise is None else torch.randn(1, 3, generator=noise)
            with torch.no_grad():
                a = flow.u_to_action(torch.tensor(obs, dtype=torch.float32)[None], u)[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            total, done = total + r, term or trunc
        returns.append(total)
    return returns


BAD_INPUTS = [
    (["--env-id", "Pendulumm-v1"], "cannot make environment"),
    (["--env-id", "CartPole-v1"], "bounded continuous (Box) action space"),
    (["--env-id", "tests.scripted_env:UnboundedAction-v0"], "bounded continuous (Box) action space"),
    (["--env-id", "tests.scripted_env:DictObs-v0"], "needs a flat Box observation space"),
    (["--total-timesteps", "ten"], None),  # tyro's own parse error
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(map(str, a)) for a, _ in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(run, tmp_path, args, message):
    out = run(SCRIPT, *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    if message is not None:
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "videos").exists()


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(run, tmp_path):
    out = run(SCRIPT, "--env-id", "tests.scripted_env:NanReward-v0", "--total-timesteps", 400, "--learning-starts", 50,
              "--batch-size", 8, "--log-frequency", 100, "--max-nonfinite-updates", 20, "--eval-frequency", 1000)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    # every reward is NaN, so every update (steps 51 to 100) is skipped: the first logging step counts 50
    assert out.stderr.strip().splitlines()[-1].startswith("error: 50 updates had a non-finite loss or gradient "
                                                          "(each skipped); stopping at step 100.")
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    tags, _ = read_tensorboard(run_dir)
    assert tags["losses/nonfinite_updates"] == [(100, 50)]


def test_same_seed_gives_the_same_numbers_and_stochastic_evaluation_leaves_training_alone(run, tmp_path):
    args = ["--env-id", "Hopper-v4", "--total-timesteps", 700, "--learning-starts", 400, "--eval-frequency", 350,
            "--eval-episodes", 2, "--batch-size", 32, "--save-model", "--no-cuda", "--torch-deterministic"]
    paths, tags = [], []
    for name, extra in [("a", []), ("b", ["--eval-stochastic"])]:
        out = run(SCRIPT, *args, *extra, "--exp-name", name)
        assert out.returncode == 0, out.stderr
        (path,) = glob.glob(str(tmp_path / "runs" / f"*__{name}__*" / f"{name}.cleanrl_model"))
        paths.append(path)
        tags.append(read_tensorboard(os.path.dirname(path))[0])
    # b also evaluated with sampled actions (at step 349, mid-training, and at the end): its training is
    # a's to the bit, so those evaluations drew nothing from training's random stream
    models = [torch.load(path, weights_only=True)["model"] for path in paths]
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k
    init = meow.EBFlowPolicy(11, 3, 0.25, -5.0, -0.3).state_dict()
    assert not torch.equal(models[0]["shift_nets.0.4.weight"], init["shift_nets.0.4.weight"])  # it did train
    assert tags[0]["eval/return"] == tags[1]["eval/return"] and "eval/return_stochastic" not in tags[0]
    assert [s for s, _ in tags[1]["eval/return_stochastic"]] == [349, 699]
    # the last stochastic evaluation, recomputed by hand: the deterministic evaluation's initial states,
    # noise from a generator seeded with the same evaluation seed (seed 1 + 1,000,000 + step 699)
    flow, eval_seed = hopper_flow(paths[1]), 1 + 1_000_000 + 699
    stochastic = np.mean(rollouts(flow, [eval_seed, eval_seed + 1], torch.Generator().manual_seed(eval_seed)))
    assert tags[1]["eval/return_stochastic"][-1][1] == pytest.approx(stochastic, abs=0.06)
    deterministic = np.mean(rollouts(flow, [eval_seed, eval_seed + 1]))
    assert tags[1]["eval/return"][-1][1] == pytest.approx(deterministic, abs=0.06)
    assert abs(stochastic - deterministic) > 0.5  # the two modes are told apart at this tolerance
    # --eval-checkpoint --eval-stochastic: both modes of the saved model, episodes seeded 5 and 6
    out = run(SCRIPT, "--eval-checkpoint", paths[1], "--eval-stochastic", "--eval-episodes", 2, "--seed", 5)
    assert out.returncode == 0, out.stderr
    printed = dict(re.findall(r"Hopper-v4: (\w+) return (-?[\d.]+) \+- [\d.]+ over 2 episodes "
                              r"\(checkpoint step 700\)", out.stdout))
    assert float(printed["deterministic"]) == pytest.approx(np.mean(rollouts(flow, [5, 6])), abs=0.06)
    sampled = np.mean(rollouts(flow, [5, 6], torch.Generator().manual_seed(5)))
    assert float(printed["stochastic"]) == pytest.approx(sampled, abs=0.06)


def test_capture_video_records_evaluation_episodes(run, tmp_path, mujoco_gl):
    out = run(SCRIPT, "--env-id", "InvertedPendulum-v4", "--total-timesteps", 300, "--learning-starts", 100,
              "--eval-frequency", 300, "--eval-episodes", 2, "--capture-video", "--batch-size", 32,
              env={"MUJOCO_GL": mujoco_gl})
    assert out.returncode == 0, out.stderr
    videos = glob.glob(str(tmp_path / "videos" / "InvertedPendulum-v4__*" / "*.mp4"))
    assert len(videos) == 2 and all(os.path.getsize(v) > 1000 for v in videos)
    assert "Exception ignored" not in out.stderr  # render envs are closed before exit
