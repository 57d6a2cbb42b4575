"""The soft Bellman loss and the update: fast paths against a straightforward evaluation of MEOW.md."""
import copy
import glob
import re

import pytest
import torch

import ebflow_continuous_action as meow
import ebflow_isaacgym as isaac

from . import meow_reference as ref
from .test_end_to_end import hopper_flow, rollouts
from .test_flow_math import random_flow


# the tests of the target, the update and the clipping run on both scripts' copies of the flow and loss
BOTH_SCRIPTS = pytest.mark.parametrize("module", [meow, isaac], ids=["single_env", "isaacgym"])


def make_pair(obs_dim=6, act_dim=3, seed=0, dtype=torch.float64, module=meow):
    """An online flow (dropout on) and a target flow (eval mode) with *different* random weights everywhere."""
    flow = random_flow(obs_dim, act_dim, sigma_min=-3.0, seed=seed, module=module).train()
    target = random_flow(obs_dim, act_dim, sigma_min=-3.0, seed=seed + 1, module=module)
    return flow.to(dtype), target.to(dtype)


def with_valid(module, data, valid=None):
    """The vectorized script's loss and update take one more field, `valid` (all ones unless given)."""
    if module is not isaac:
        return data
    return (*data, torch.ones_like(data[2]) if valid is None else valid)


def script_loss(module, flow, target, data, gamma, valid=None):
    return module.soft_bellman_loss(flow, target, *with_valid(module, data, valid), gamma)


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


@BOTH_SCRIPTS
def test_target_is_the_target_networks_min_over_heads_cut_by_termination(module):
    """y = r + gamma (1 - terminated) min_k Vbar_k(s'), Vbar from the target network: the loss equals the one
    computed from the straightforward evaluation, and each wrong target gives another number."""
    flow, target = make_pair(module=module)
    flow.eval()  # dropout off: the script and the reference see the same network
    obs, act, rew, next_obs, term = data = batch()
    gamma = 0.9
    q, _ = ref.q_and_v_doubled(flow, obs, act)

    def loss_with_target(v_next, pick=torch.minimum, cut=term):
        y = rew + gamma * (1 - cut) * pick(v_next[:, 0], v_next[:, 1])
        return (0.5 * ((q - y[:, None]) ** 2).mean(0).sum()).item()

    loss, _ = script_loss(module, flow, target, data, gamma)
    v_target, v_online = ref.v_doubled(target, next_obs), ref.v_doubled(flow, next_obs)
    assert loss.item() == pytest.approx(loss_with_target(v_target), rel=1e-10)
    wrong = {"the online network's V": loss_with_target(v_online),
             "the max over heads": loss_with_target(v_target, torch.maximum),
             "a bootstrap after termination": loss_with_target(v_target, cut=torch.zeros_like(term))}
    for mistake, value in wrong.items():
        assert value != pytest.approx(loss.item(), rel=1e-3), mistake
    loss.backward()  # no gradient flows into the target network
    assert all(p.grad is None for p in target.parameters())


def test_valid_masks_transitions_out_of_the_vectorized_loss():
    """A transition across a reset (valid = 0) carries any numbers: the loss is the mean over the others."""
    flow, target = make_pair(module=isaac)
    flow.eval()
    obs, act, rew, next_obs, term = batch()
    valid = (torch.arange(64) % 3 != 0).double()
    garbage = torch.where(valid == 1, rew, torch.full_like(rew, 1e3))
    loss, _ = isaac.soft_bellman_loss(flow, target, obs, act, garbage, next_obs, term, valid, 0.9)
    keep = valid == 1
    expected = ref.reference_loss(flow, target, obs[keep], act[keep], rew[keep], next_obs[keep], term[keep], 0.9)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


@BOTH_SCRIPTS
def test_one_update_moves_every_parameter_and_the_targets_v_networks_by_exactly_tau(module):
    """Polyak averaging: the target's h(s) and b_k(s) (all that V reads) move by tau towards the updated
    online weights, target <- target + tau (online - target); the rest of the target stays as it was."""
    flow, target = make_pair(dtype=torch.float32, module=module)
    tau = 0.3  # not 0.5: a weight of 1 - tau would pass too
    update, _, skipped = module.make_update(flow, target, module.Args(tau=tau))
    before, target_before = copy.deepcopy(flow.state_dict()), copy.deepcopy(target.state_dict())
    update(with_valid(module, batch(dtype=torch.float32)))
    after = flow.state_dict()
    for name, p in flow.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
    for name, t in target.state_dict().items():
        if name.startswith(("log_scale_net.", "shift_nets.")):
            expected = target_before[name] + tau * (after[name] - target_before[name])
            assert torch.allclose(t, expected, rtol=0, atol=1e-6), name
        else:
            assert torch.equal(t, target_before[name]), f"the target's {name} changed"
    assert skipped.item() == 0


@BOTH_SCRIPTS
def test_the_gradient_adam_applies_is_clipped_to_max_grad_norm(module):
    """The gradient handed to Adam is the loss gradient (computed here) scaled to norm --max-grad-norm."""
    flow, target = make_pair(dtype=torch.float32, module=module)
    flow.eval()  # no dropout: the gradient is a deterministic function of the weights
    data = batch(dtype=torch.float32)
    grads = torch.autograd.grad(script_loss(module, flow, target, data, 0.99)[0], list(flow.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    max_norm = norm / 10
    update, optimizer, _ = module.make_update(flow, target, module.Args(max_grad_norm=max_norm))
    seen = []  # the gradients when Adam steps
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in flow.parameters()]))
    update(with_valid(module, data))
    (applied,) = seen
    for (name, _), g, g_applied in zip(flow.named_parameters(), grads, applied):
        assert torch.allclose(g_applied, g * max_norm / norm, rtol=1e-4, atol=1e-9), name


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


def test_compiled_run_trains_and_its_model_reloads_eagerly(run, tmp_path):
    out = run("ebflow_continuous_action.py", "--env-id", "Hopper-v4", "--total-timesteps", 400, "--learning-starts", 200,
              "--batch-size", 64, "--compile", "--eval-frequency", 400, "--eval-episodes", 1, "--log-frequency", 100,
              "--save-model")
    assert out.returncode == 0, out.stderr
    (model,) = glob.glob(str(tmp_path / "runs" / "*" / "ebflow_continuous_action.cleanrl_model"))
    flow = hopper_flow(model)  # plain parameter names: no torch.compile wrapper in the state_dict
    init = meow.EBFlowPolicy(11, 3, 0.25, -5.0, -0.3).state_dict()
    assert not torch.equal(flow.state_dict()["shift_nets.0.4.weight"], init["shift_nets.0.4.weight"])  # it trained
    # the compiled run's model, evaluated by the eager script, scores what a hand-written rollout scores
    out = run("ebflow_continuous_action.py", "--eval-checkpoint", model, "--eval-episodes", 1, "--seed", 3)
    assert out.returncode == 0, out.stderr
    (printed,) = re.findall(r"deterministic return (-?[\d.]+)", out.stdout)
    assert float(printed) == pytest.approx(rollouts(flow, [3])[0], abs=0.06)
