"""The soft Bellman loss and the update: fast paths against a straightforward evaluation of MEOW.md."""
import copy

import pytest
import torch

import ebflow_continuous_action as meow

from . import meow_reference as ref
from .test_flow_math import random_flow


def make_pair(obs_dim=6, act_dim=3, seed=0, dtype=torch.float64):
    """An online flow (dropout on) and a target flow (eval mode) with *different* random weights everywhere."""
    flow = random_flow(obs_dim, act_dim, sigma_min=-3.0, seed=seed).train()
    target = random_flow(obs_dim, act_dim, sigma_min=-3.0, seed=seed + 1)
    return flow.to(dtype), target.to(dtype)


def batch(obs_dim=6, act_dim=3, n=64, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, obs_dim, generator=g, dtype=dtype), torch.rand(n, act_dim, generator=g, dtype=dtype) * 1.9 - 0.95,
            torch.randn(n, generator=g, dtype=dtype), torch.randn(n, obs_dim, generator=g, dtype=dtype),
            (torch.rand(n, generator=g) < 0.3).to(dtype))


def test_fast_loss_and_gradients_equal_the_straightforward_evaluation():
    """Closed-form V + shared base Q terms == zero-action full pass + batch doubling.

    Dropout off (eval mode) so both see the same network; float64, tolerance 1e-10 relative.
    """
    flow, target = make_pair()
    flow.eval()
    data = batch()
    fast, _ = meow.soft_bellman_loss(flow, target, *data, 0.99)
    g_fast = torch.autograd.grad(fast, list(flow.parameters()), allow_unused=True)
    slow = ref.reference_loss(flow, target, *data, 0.99)
    g_slow = torch.autograd.grad(slow, list(flow.parameters()), allow_unused=True)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    for (name, _), a, b in zip(flow.named_parameters(), g_fast, g_slow):
        assert a is not None and b is not None, name
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), name


def test_fast_loss_equals_reference_in_float32_within_stated_tolerance():
    flow, target = make_pair(dtype=torch.float32)
    flow.eval()
    data = batch(dtype=torch.float32)
    fast, _ = meow.soft_bellman_loss(flow, target, *data, 0.99)
    assert fast.item() == pytest.approx(ref.reference_loss(flow, target, *data, 0.99).item(), rel=1e-5)


def test_q_and_v_equal_the_straightforward_evaluation():
    flow, _ = make_pair()
    obs, act = batch()[:2]
    q_ref, v_ref = ref.q_and_v_doubled(flow.eval(), obs, act)
    assert torch.allclose(flow.soft_q(obs, act), q_ref, atol=1e-10)
    assert torch.allclose(flow.soft_v(obs), v_ref, atol=1e-10)


def test_target_uses_target_network_min_over_heads_and_cuts_terminal_bootstrap():
    flow, target = make_pair()
    flow.eval()
    obs, act, rew, next_obs, term = batch()
    gamma = 0.9
    loss, q = meow.soft_bellman_loss(flow, target, obs, act, rew, next_obs, term, gamma)
    # by hand: V from the *target* flow, min over its two heads, masked by (1 - terminated)
    v_next = target.soft_v(next_obs)
    y = rew + gamma * (1 - term) * torch.minimum(v_next[:, 0], v_next[:, 1])
    expected = 0.5 * ((q[:, 0] - y) ** 2).mean() + 0.5 * ((q[:, 1] - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # the online flow's V would give another number: the target really is the target network's
    y_online = rew + gamma * (1 - term) * flow.soft_v(next_obs).min(1).values
    wrong = 0.5 * ((q[:, 0] - y_online) ** 2).mean() + 0.5 * ((q[:, 1] - y_online) ** 2).mean()
    assert abs(wrong.item() - loss.item()) > 1e-3
    # terminated transitions: the target is the reward alone, whatever the next state
    term1 = torch.ones_like(term)
    loss_t, q_t = meow.soft_bellman_loss(flow, target, obs, act, rew, next_obs * 100, term1, gamma)
    assert loss_t.item() == pytest.approx((0.5 * ((q_t - rew[:, None]) ** 2).mean(0).sum()).item(), rel=1e-12)
    # no gradient flows into the target network
    loss.backward()
    assert all(p.grad is None for p in target.parameters())


def test_one_update_changes_every_parameter_group_and_moves_target_towards_online():
    flow, target = make_pair(dtype=torch.float32)
    flow.train()
    target.load_state_dict(flow.state_dict())
    args = meow.Args(learning_rate=1e-3, tau=0.5)
    update, optimizer, skipped = meow.make_update(flow, target, args)
    before = copy.deepcopy(flow.state_dict())
    target_before = copy.deepcopy(target.state_dict())
    update(batch(dtype=torch.float32))
    groups = {"couplings": flow.couplings, "log_scale_net": flow.log_scale_net,
              "shift_nets.0": flow.shift_nets[0], "shift_nets.1": flow.shift_nets[1]}
    for group, module in groups.items():
        for name, p in module.named_parameters():
            key = f"{group}.{name}"
            assert not torch.equal(p.detach(), before[key]), f"{key} did not change"
    # Polyak: the parts of the target that V reads moved halfway (tau = 0.5) to the new online weights
    for name, p in target.named_parameters():
        if name.startswith(("log_scale_net", "shift_nets")):
            expected = target_before[name] + 0.5 * (flow.state_dict()[name] - target_before[name])
            assert torch.allclose(p.detach(), expected, atol=1e-7), name
    assert skipped.item() == 0


def test_nonfinite_loss_skips_the_update_and_is_counted():
    flow, target = make_pair(dtype=torch.float32)
    update, optimizer, skipped = meow.make_update(flow, target, meow.Args())
    update(batch(dtype=torch.float32))  # one good step so the optimizer has moments
    params = copy.deepcopy(flow.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    obs, act, rew, next_obs, term = batch(dtype=torch.float32)
    rew[3] = float("nan")
    loss, _, grad_norm = update((obs, act, rew, next_obs, term))
    assert not torch.isfinite(loss) and skipped.item() == 1
    for k, v in flow.state_dict().items():
        assert torch.equal(v, params[k]), k  # not zeroed, not moved: skipped
    for i, st in optimizer.state_dict()["state"].items():
        for k in st:
            assert torch.equal(st[k], moments[i][k]), (i, k)
    for k, v in target.state_dict().items():  # target is averaged towards unchanged online weights
        assert torch.isfinite(v).all(), k
    update(batch(dtype=torch.float32, seed=5))
    assert skipped.item() == 1 and all(torch.isfinite(v).all() for v in flow.state_dict().values())


def test_compiled_loss_gradients_and_actions_equal_eager_for_the_same_seed():
    """--compile (compile_fn, inductor on CPU) against eager, float32, dropout on: with the same seed
    the compiled loss draws the same dropout masks and the compiled policy the same noise u (ATen's
    random numbers in both). Loss within 1e-5 relative, each gradient tensor within 1e-4 relative in
    norm, actions within 1e-5 (fused kernels sum in another order)."""
    cpu = torch.device("cpu")
    flow, target = make_pair(dtype=torch.float32)
    data = batch(dtype=torch.float32)
    compiled_loss_fn = meow.compile_fn(meow.soft_bellman_loss, cpu)
    losses, grads = {}, {}
    for name, loss_fn in [("eager", meow.soft_bellman_loss), ("compiled", compiled_loss_fn)]:
        torch.manual_seed(3)
        losses[name], _ = loss_fn(flow, target, *data, 0.99)
        grads[name] = torch.autograd.grad(losses[name], list(flow.parameters()))
    assert losses["compiled"].item() == pytest.approx(losses["eager"].item(), rel=1e-5)
    for (name, _), a, b in zip(flow.named_parameters(), grads["eager"], grads["compiled"]):
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-7, name
    torch.manual_seed(4)  # dropout is on: other masks, another loss
    assert compiled_loss_fn(flow, target, *data, 0.99)[0].item() != pytest.approx(losses["eager"].item(), rel=1e-3)

    obs = data[0]
    flow.set_dropout(False)
    torch.manual_seed(5)
    eager_actions = flow.sample(obs)
    torch.manual_seed(5)
    compiled_actions = meow.compile_fn(flow.sample, cpu)(obs)
    assert torch.allclose(compiled_actions, eager_actions, atol=1e-5)
    assert not torch.allclose(flow.sample(obs), eager_actions, atol=1e-2)  # fresh noise differs


@pytest.mark.parametrize("script", ["ebflow_continuous_action", "ebflow_isaacgym"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_fn_builds_both_device_branches_without_a_gpu(script, device, monkeypatch):
    """compile_fn's CUDA branch (CUDA graphs: mode="reduce-overhead") never runs on a CPU-only CI, so it
    is built here with torch.compile stubbed. On the first GPU run (an H200) --compile failed in both
    scripts: an `import torch._inductor.config` in the CPU branch made `torch` a local name of the
    whole function, unbound on the CUDA branch (UnboundLocalError)."""
    module = __import__(script)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: seen.append(mode) or fn)
    assert module.compile_fn(module.soft_bellman_loss, torch.device(device)) is module.soft_bellman_loss
    assert seen == ["reduce-overhead" if device == "cuda" else None]


def test_compile_flag_runs_end_to_end(run, tmp_path):
    out = run("ebflow_continuous_action.py", "--env-id", "Hopper-v4", "--total-timesteps", 400, "--learning-starts", 200,
              "--batch-size", 64, "--compile", "--eval-frequency", 400, "--eval-episodes", 1, "--log-frequency", 100)
    assert out.returncode == 0, out.stderr
    assert "step 400/400" in out.stdout
