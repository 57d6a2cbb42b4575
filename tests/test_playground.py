"""ebflow_isaacgym.py --backend playground: MuJoCo Playground's DM Control Suite tasks (MJX on JAX), against
the real simulator on the CPU. Skipped where JAX or Playground is not installed (the main test environment
has neither): `pip install -r tests/requirements-playground.txt` to run them."""
import glob
import math
import os
import re
import tempfile

# JAX's persistent compilation cache, set before JAX is imported; the scripts the tests run inherit it.
# Compiling CartpoleSwingup's reset and step takes ~40 s on a 2-core CPU; loading them, a few seconds.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "meow-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import ebflow_isaacgym as isaac  # noqa: E402

from .conftest import read_tensorboard  # noqa: E402

SCRIPT = "ebflow_isaacgym.py"
# One task and 8 envs in every test: one compiled reset and step serve them all (and the script's runs).
# CartpoleSwingup, not CartpoleBalance, for the learning check: on Balance zero actions score ~700 and
# random ones ~350, and MEow's policy stays below both for ~40k steps; on Swingup zero actions score 0
# and random ones ~30 (8-episode means of 21 to 43 on seeds 1-5), so learning shows within 32k steps.
TASK, N, OBS_DIM, EPISODE = "CartpoleSwingup", 8, 5, 20
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def jax():
    """Every test here is skipped without JAX and Playground; at setup, not at collection, so that a run
    which selects none of them (.ci/run's `-m render`) reports no skip."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("mujoco_playground")
    return jax


@pytest.fixture(scope="module")
def env():
    env = isaac.PlaygroundVecEnv(TASK, N, 0, None, CPU)
    env.limit = EPISODE  # the time limit is an argument of the compiled step, not part of it
    yield env
    env.close()


@pytest.fixture(scope="module")
def playground_step(env, jax):
    """Playground's own step (vmapped), from the state the adapter held before its step."""
    step = jax.jit(jax.vmap(env.env.step))
    return lambda state, actions: step(state, jax.numpy.asarray(actions.numpy()))


def as_torch(x):
    return torch.from_numpy(np.array(x))


def test_transitions_match_playgrounds_own_step_across_time_outs(env, playground_step):
    assert (env.num_envs, env.obs_dim, env.act_dim, env.one_per_process) == (N, OBS_DIM, 1, False)
    obs = env.reset(seed=0)
    assert obs.shape == (N, OBS_DIM) and obs.dtype == torch.float32 and obs.device == CPU
    for k in range(1, 2 * EPISODE + 3):  # two time-outs
        state, key = env.state, env.key
        actions = torch.rand(N, 1) * 2 - 1
        assert actions.shape == (N, 1) and actions.dtype == torch.float32 and actions.abs().max() <= 1
        out = env.step(actions)
        for x, shape in zip(out, [(N, OBS_DIM)] * 2 + [(N,)] * 4):
            assert x.shape == shape and x.dtype == torch.float32 and x.device == CPU
        next_obs, real_next_obs, rewards, terminated, truncated, valid = out
        ref = playground_step(state, actions)
        # the reward and the true successor are Playground's, at a time-out too (the final observation)
        assert torch.allclose(rewards, as_torch(ref.reward), rtol=1e-5, atol=1e-6)
        assert torch.allclose(real_next_obs, as_torch(ref.obs), rtol=1e-5, atol=1e-6)
        assert not ref.done.any()  # no NaN state: nothing terminates
        time_out = k % EPISODE == 0  # episode_length steps after the reset, and after each time-out
        assert torch.all(truncated == time_out) and torch.all(terminated == 0) and torch.all(valid == 1)
        if time_out:  # every env starts a new episode, reset with the key the adapter held
            fresh = as_torch(env.jit_reset(key)[0].obs)
            assert torch.allclose(next_obs, fresh, atol=1e-6) and not torch.allclose(next_obs, real_next_obs)
        else:
            assert torch.equal(next_obs, real_next_obs)


def test_nan_state_ends_its_episode_and_is_never_learned_from(env, playground_step):
    env.reset(seed=1)
    actions = torch.zeros(N, 1)
    actions[0] = math.nan  # a NaN control makes a NaN state: the only way a DM Control task ends
    state = env.state
    next_obs, real_next_obs, rewards, terminated, truncated, valid = env.step(actions)
    # how Playground marks it: done, in a state of NaNs (its reward NaN too)
    assert playground_step(state, actions).done.tolist() == [1.0] + [0.0] * (N - 1)
    assert (terminated[0], truncated[0], valid[0], rewards[0]) == (1, 0, 0, 0)
    assert torch.equal(real_next_obs[0], torch.zeros(OBS_DIM))  # finite: 0 x NaN would poison the loss
    assert torch.isfinite(next_obs).all() and torch.isfinite(rewards).all()
    assert torch.all(terminated[1:] == 0) and torch.all(valid[1:] == 1) and torch.all(truncated == 0)
    # env 0 began a whole new episode: it times out one step after the others
    for k in range(2, EPISODE + 2):
        _, _, _, terminated, truncated, valid = env.step(torch.zeros(N, 1))
        expected = [k == EPISODE + 1] + [k == EPISODE] * (N - 1)
        assert truncated.bool().tolist() == expected and not terminated.any() and valid.all()


def rollout(env, seed, scribble=False):
    """Reset with `seed`, then EPISODE + 3 steps (across a time-out) of seeded random actions.
    Returns what reset and each step returned, and copies of it taken at once."""
    generator = torch.Generator().manual_seed(seed)
    returned = [(env.reset(seed=seed),)]
    for _ in range(EPISODE + 3):
        returned.append(env.step(torch.rand(N, 1, generator=generator) * 2 - 1))
    copies = [[x.clone() for x in out] for out in returned]
    if scribble:  # the caller owns what it got: writing into it must not reach the env
        for out in returned:
            for x in out:
                x.fill_(math.nan)
    return returned, copies


def test_returned_tensors_belong_to_the_caller_and_reset_seed_reproduces(env):
    returned, copies = rollout(env, seed=3)
    _, again = rollout(env, seed=3, scribble=True)  # the same seed; the caller writes into everything
    _, other = rollout(env, seed=4)
    # what a step returned is not overwritten by later steps
    for out, copy in zip(returned, copies):
        assert all(torch.equal(x, c) for x, c in zip(out, copy))
    # reset(seed) reproduces the rollout exactly, whatever the caller wrote into an earlier one's tensors
    for copy, same in zip(copies, again):
        assert all(torch.equal(x, y) for x, y in zip(copy, same))
    assert not torch.equal(copies[0][0], other[0][0])  # another seed, other initial states


def test_unknown_task_is_one_line(run, tmp_path):
    out = run(SCRIPT, "--backend", "playground", "--env-id", "Ant-v4", "--no-cuda")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --backend playground runs the DM Control Suite tasks")
    assert "CartpoleSwingup" in line
    assert not (tmp_path / "runs").exists()


def random_policy_returns(seed):
    """Returns of whole episodes (1,000 steps) under uniform random actions, one per env."""
    env = isaac.PlaygroundVecEnv(TASK, N, seed, None, CPU)
    env.reset(seed=seed)
    total, done = torch.zeros(N), torch.zeros(N, dtype=torch.bool)
    while not done.all():
        _, _, rewards, terminated, truncated, _ = env.step(torch.rand(N, 1) * 2 - 1)
        total += rewards * ~done
        done |= (terminated + truncated) > 0
    env.close()
    return total.tolist()


@pytest.mark.learning
@pytest.mark.parametrize("seed", [2, 4])  # tuned on seed 1 (best eval 291); 2-5 pass too: 188, 211, 215, 151
def test_cartpole_swingup_learns(run, tmp_path, seed):
    torch.manual_seed(seed)
    random_returns = random_policy_returns(seed)
    print(f"{TASK}: random-policy returns {[round(r) for r in random_returns]}")
    out = run(SCRIPT, "--backend", "playground", "--env-id", TASK, "--num-envs", N, "--seed", seed,
              "--total-timesteps", 32_000, "--learning-starts", 100, "--batch-size", 256, "--alpha", 0.05,
              "--tau", 0.02, "--sigma-max", -0.3, "--eval-frequency", 8000, "--eval-episodes", N, "--no-cuda",
              "--save-model", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{TASK}__*"))
    evals = [v for _, v in read_tensorboard(run_dir)[0]["eval/return"]]
    print(f"{TASK} (seed {seed}, {N} envs) deterministic eval returns:", [round(v) for v in evals])
    assert len(evals) == 4
    # a mean over 8 episodes that random actions never reach (their best single episode in 40: 141), and
    # three times the random policy's mean measured here
    assert max(evals) >= 120 and max(evals) >= 3 * np.mean(random_returns), (evals, random_returns)
    # the best model (with its observation normaliser) reloads and evaluates on fresh envs
    ev = run(SCRIPT, "--eval-checkpoint", os.path.join(run_dir, "ebflow_isaacgym_best.cleanrl_model"),
             "--eval-episodes", N, "--no-cuda")
    assert ev.returncode == 0, ev.stderr
    printed = float(re.search(r"deterministic return (-?[\d.]+) over 8 episodes", ev.stdout).group(1))
    assert printed >= 0.5 * max(evals), (printed, evals)
