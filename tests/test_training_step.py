"""Both scripts' training loop, run in this process on a tiny task: when it acts randomly, acts with the policy
and updates, dropout in each, the observations the vectorized networks see; and a soft Bellman fixed point."""
import copy
import math
import os
import runpy
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ebflow_isaacgym as isaac

from . import scripted_env
from .conftest import ROOT
from .test_loss import BOTH_SCRIPTS, with_valid

# RandomStart-v0: observations [x, t, 1], episodes of 4 steps. The update's batch, the acting batch (1 or
# NUM_ENVS) and the evaluation batch (1 or 2) have different sizes, so a network call tells which it is.
STEPS, LEARNING_STARTS, BATCH, NUM_ENVS, OBS_DIM = 40, 20, 16, 3, 3
COMMON = ["--env-id", "tests.scripted_env:RandomStart-v0", "--learning-starts", LEARNING_STARTS, "--batch-size", BATCH,
          "--eval-frequency", 10**6, "--flow-hidden", 16, "--shift-hidden", 16, "--no-cuda"]
RUNS = {
    "single_env": ("ebflow_continuous_action.py", ["--total-timesteps", STEPS, "--eval-episodes", 1]),
    "isaacgym": ("ebflow_isaacgym.py", ["--backend", "gymnasium", "--num-envs", NUM_ENVS, "--total-timesteps",
                                        NUM_ENVS * STEPS, "--buffer-size", 100, "--eval-episodes", 2]),
}


def recording(method, kind, events):
    """`method` of an env class, also appending (kind, the observation it returns) to events."""
    def recorded(env, *args, **kwargs):
        out = method(env, *args, **kwargs)
        if kind != "vector_step" or env.num_envs == NUM_ENVS:  # the training vector env, not the evaluation's
            events.append((kind, np.array(out[0], dtype=np.float64)))
        return out
    return recorded


@pytest.fixture(scope="module", params=list(RUNS))
def trace(request, tmp_path_factory):
    """Runs the script as `python SCRIPT ...` would, in this process, and returns (name, events): in order, every
    observation an env returned (reset, step; the training vector env's steps), every dropout call (batch size,
    on or off), every input of a network's first layer fed the observation (h(s), b_k(s)) and every Adam step."""
    script, args = RUNS[request.param]
    events = []

    def on_module_call(module, inputs):
        if isinstance(module, torch.nn.Dropout):
            events.append(("dropout", inputs[0].shape[0], module.training))
        elif isinstance(module, torch.nn.Linear) and module.in_features == OBS_DIM:
            events.append(("net_input", inputs[0].detach().double().numpy().copy()))

    hooks = [register_module_forward_pre_hook(on_module_call),
             register_optimizer_step_pre_hook(lambda *_: events.append(("update",)))]
    env_class = scripted_env.RandomStartEnv
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.chdir(tmp_path_factory.mktemp(request.param))
        mp.setattr(sys, "argv", [script, *map(str, COMMON + args)])
        mp.setenv("MUJOCO_GL", "disable")  # the script sets it; the test process gets its own back
        mp.setattr(env_class, "reset", recording(env_class.reset, "reset", events))
        mp.setattr(env_class, "step", recording(env_class.step, "step", events))
        mp.setattr(gym.vector.SyncVectorEnv, "step", recording(gym.vector.SyncVectorEnv.step, "vector_step", events))
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        finally:
            for hook in hooks:
                hook.remove()
    return request.param, events


def test_dropout_is_off_while_acting_and_evaluating_and_on_in_every_update(trace):
    _, events = trace
    calls = [event[1:] for event in events if event[0] == "dropout"]  # (batch size, dropout on)
    in_updates = [on for size, on in calls if size == BATCH]
    elsewhere = [on for size, on in calls if size != BATCH]
    assert in_updates and elsewhere
    assert all(in_updates), "dropout was off in an update"
    assert not any(elsewhere), "dropout was on while acting or evaluating"


def test_random_actions_then_one_update_per_step_from_the_documented_step(trace):
    """Single env: uniform random actions while global_step < learning_starts (global_step counts from 0), the
    policy from then on, an update at every step with global_step > learning_starts. Vectorized: the same in
    vector steps, but the first update comes at iteration learning_starts, right after its first policy step."""
    name, events = trace
    step_kind = "vector_step" if name == "isaacgym" else "step"
    steps, first_policy_step, updates_after = 0, None, []  # updates_after: training steps done before each update
    for kind, *rest in events:
        if kind == step_kind:
            steps += 1
        elif kind == "update":
            updates_after.append(steps)
        elif kind == "dropout" and rest[0] != BATCH and first_policy_step is None:
            first_policy_step = steps
    assert first_policy_step == LEARNING_STARTS
    first_update_after = LEARNING_STARTS + (1 if name == "isaacgym" else 2)
    assert updates_after == list(range(first_update_after, STEPS + 1))


@pytest.mark.parametrize("trace", ["isaacgym"], indirect=True)
def test_vectorized_networks_see_observations_standardised_by_the_running_statistics(trace):
    """Every observation reaching h(s) or b_k(s) (acting, the update's s and s', evaluation) is one the envs
    produced, standardised by the mean and variance of all observations the training envs' step() returned
    so far (computed here) and clipped to --obs-clip."""
    _, events = trace
    clip, returned, produced, rows = isaac.Args().obs_clip, [], [], 0
    for kind, *rest in events:
        if kind == "vector_step":
            returned.append(rest[0])
        elif kind in ("reset", "step"):
            produced.append(rest[0])
        elif kind == "net_input":
            seen = np.concatenate(returned) if returned else np.zeros((0, OBS_DIM))
            mean, var = (seen.mean(0), seen.var(0)) if returned else (0.0, 1.0)
            standardised = np.clip((np.stack(produced) - mean) / np.sqrt(var + 1e-8), -clip, clip)
            distance = np.abs(rest[0][:, None, :] - standardised[None]).max(axis=2).min(axis=1)
            assert distance.max() < 1e-4, f"an input that is no standardised observation, after {len(returned)} steps"
            rows += len(distance)
    assert rows > BATCH * (STEPS - LEARNING_STARTS)


@BOTH_SCRIPTS
def test_updates_reach_the_soft_bellman_fixed_point_of_a_state_that_loops_on_itself(module):
    """One state s with s' = s, never terminated, one action dimension, and a reward the flow can represent:
    r(a) = alpha (log N(atanh a; mu, sig^2) - log(1 - a^2)) + r0. The soft Bellman fixed point (paper Eq. 10 at
    its minimum) is Q*(s, a) = r(a) + gamma V* with V* = alpha log int exp(Q*(s, a) / alpha) da over (-1, 1),
    so V* = alpha log int exp(r(a) / alpha) da / (1 - gamma): quadrature here (= (r0 + alpha log(sig
    sqrt(2 pi))) / (1 - gamma) in closed form). After 400 updates V and Q must be there."""
    alpha, gamma, mu, sig, r0 = 0.5, 0.5, 0.3, 0.4, 1.0

    def reward(a):
        return alpha * (-0.5 * ((torch.atanh(a) - mu) / sig) ** 2 - torch.log(1 - a**2)) + r0

    grid = torch.linspace(-1, 1, 200_001, dtype=torch.float64)[1:-1]
    v_star = alpha * (torch.logsumexp(reward(grid) / alpha, 0) + math.log(grid[1] - grid[0])).item() / (1 - gamma)
    torch.manual_seed(0)
    flow = module.EBFlowPolicy(1, 1, alpha, -5.0, -0.3, flow_hidden=16, shift_hidden=32)
    target = copy.deepcopy(flow).eval()
    lr = 3e-3
    update, optimizer, _ = module.make_update(flow, target, module.Args(gamma=gamma, tau=0.1, learning_rate=lr))
    s, a = torch.ones(64, 1), torch.linspace(-0.95, 0.95, 64)[:, None]
    data = with_valid(module, (s, a, reward(a)[:, 0], s, torch.zeros(64)))
    for i in range(400):
        if i == 300:  # a smaller step for the last 100 updates: less of Adam's jitter around the fixed point
            for group in optimizer.param_groups:
                group["lr"] = lr / 10
        update(data)
    flow.eval()
    with torch.no_grad():
        v = flow.soft_v(s[:1])[0]
        a_test = torch.linspace(-0.8, 0.8, 17)[:, None]
        q_error = (flow.soft_q(torch.ones(17, 1), a_test) - (reward(a_test) + gamma * v_star)).abs().max().item()
    # without the bootstrap V would be near r0 + 0.0013 = 1.0013, half of V* = 2.0026
    assert torch.allclose(v, torch.full_like(v, v_star), atol=0.02 * v_star), (v.tolist(), v_star)
    assert q_error < 0.1, q_error
