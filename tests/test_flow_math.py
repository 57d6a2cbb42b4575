"""MEOW.md section 6: the EBFlow's math, checked against independent computation (float64)."""

import pytest
import torch

import ebflow_continuous_action as meow

from . import meow_reference as ref


def random_flow(obs_dim, act_dim, alpha=0.3, sigma_min=-2.0, sigma_max=-0.3, seed=0, module=meow):
    """A flow of `module` (either script) with *every* weight random (the published zero inits would make
    several checks trivial)."""
    torch.manual_seed(seed)
    flow = module.EBFlowPolicy(obs_dim, act_dim, alpha, sigma_min, sigma_max, flow_hidden=16, shift_hidden=16)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.5)
        for c in flow.couplings:  # moderate translations: keep samples away from tanh saturation
            c[-1].weight.mul_(0.2)
            c[-1].bias.mul_(0.2)
    return flow.double().eval()


@pytest.mark.parametrize("act_dim", [1, 2, 5])
def test_sampling_then_density_round_trips(act_dim):
    flow = random_flow(4, act_dim)
    obs = torch.randn(64, 4, dtype=torch.float64)
    u = torch.randn(64, act_dim, dtype=torch.float64)
    a = flow.u_to_action(obs, u)
    y, _ = flow.action_to_y(obs, a)
    u_back = y * torch.exp(-flow.log_sigma(obs))
    assert torch.allclose(u_back, u, atol=1e-8)
    # log pi of the sample = base log-density - log|det d a / d u| of the sampling direction:
    # y_0 = sigma u (log-det sum log sigma), couplings (0), a = tanh(y) (log-det sum log(1 - a^2)).
    base = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(1)
    expected = base - flow.log_sigma(obs).sum(1) - torch.log(1 - a**2).sum(1)
    assert torch.allclose(flow.log_prob(obs, a), expected, atol=1e-6)


def test_log_prob_equals_autograd_jacobian():
    flow = random_flow(3, 3)
    torch.manual_seed(1)
    for _ in range(5):
        s = torch.randn(1, 3, dtype=torch.float64)
        a = torch.rand(1, 3, dtype=torch.float64) * 1.8 - 0.9

        def a_to_u(x):
            y, _ = flow.action_to_y(s, x[None])
            return (y * torch.exp(-flow.log_sigma(s)))[0]

        J = torch.autograd.functional.jacobian(a_to_u, a[0])  # (d, d), d u / d a
        u = a_to_u(a[0])
        log_pi = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum() + torch.linalg.slogdet(J).logabsdet
        # EPS inside log(1 - a^2 + eps) is the only difference: relative 1e-7
        assert flow.log_prob(s, a)[0].item() == pytest.approx(log_pi.item(), abs=1e-5)


def test_q_minus_v_equals_alpha_log_pi_for_both_heads():
    flow = random_flow(5, 4, alpha=0.7)
    obs = torch.randn(128, 5, dtype=torch.float64)
    a = torch.rand(128, 4, dtype=torch.float64) * 1.98 - 0.99
    q, v = flow.soft_q(obs, a), flow.soft_v(obs)
    assert q.shape == v.shape == (128, 2)
    assert not torch.allclose(q[:, 0], q[:, 1])  # the two shift heads differ
    for k in range(2):
        assert torch.allclose(q[:, k] - v[:, k], 0.7 * flow.log_prob(obs, a), atol=1e-9)


def trapezoid_weights(n, lo, hi):
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    w = torch.full((n,), (hi - lo) / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = w[0] / 2
    return x, w


@pytest.mark.parametrize("act_dim,n", [(1, 200_001), (2, 801)])
def test_v_is_alpha_log_integral_of_exp_q_by_quadrature(act_dim, n):
    """V_k(s) = alpha log int exp(Q_k(s,a)/alpha) da over a in (-1, 1)^d, by brute-force quadrature.

    The grid is uniform in a itself (no change of variables borrowed from the flow). With
    sigma_max = -1 the density is negligible where |a| > 1 - 1e-5 (the clamp).
    """
    flow = random_flow(3, act_dim, alpha=0.5, sigma_min=-1.5, sigma_max=-1.0, seed=act_dim)
    lo, hi = -1 + 1e-5, 1 - 1e-5
    x, w = trapezoid_weights(n, lo, hi)
    if act_dim == 1:
        grid, weights = x[:, None], w
    else:
        grid = torch.cartesian_prod(x, x)
        weights = torch.outer(w, w).reshape(-1)
    for seed in range(3):
        s = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            q = flow.soft_q(s.expand(grid.shape[0], 3), grid)  # (N, 2)
            v = flow.soft_v(s)[0]
        for k in range(2):
            integral = torch.logsumexp(q[:, k] / 0.5 + torch.log(weights), dim=0)
            assert (0.5 * integral).item() == pytest.approx(v[k].item(), abs=2e-4)


def test_v_depends_on_neither_the_action_nor_the_couplings():
    flow = random_flow(3, 2)
    obs = torch.randn(16, 3, dtype=torch.float64)
    v = flow.soft_v(obs)
    with torch.no_grad():
        for p in flow.couplings.parameters():
            p.add_(1.0)
    assert torch.equal(flow.soft_v(obs), v)


def test_deterministic_action_is_the_image_of_u_zero():
    flow = random_flow(4, 3)
    obs = torch.randn(32, 4, dtype=torch.float64)
    a = flow.deterministic_action(obs)
    u, _, _ = ref.flow_forward(flow, obs, a)  # the density direction, written out independently
    assert torch.allclose(u, torch.zeros_like(u), atol=1e-7)
    assert not torch.allclose(a, torch.zeros_like(a), atol=1e-2)  # not trivially zero


def test_deterministic_action_is_the_median_of_the_policy_in_one_dimension():
    """With d = 1 the flow is increasing in u, so the image of u = 0 is the median of pi(.|s)."""
    flow = random_flow(4, 1)
    obs = torch.randn(3, 4, dtype=torch.float64)
    torch.manual_seed(2)
    with torch.no_grad():
        samples = flow.sample(obs.repeat_interleave(40_000, 0)).view(3, 40_000)
        a = flow.deterministic_action(obs)[:, 0]
    # the sample median's standard error is about 0.004 here: 0.02 is five of them
    assert torch.allclose(samples.median(dim=1).values, a, atol=0.02)
    assert samples.std(dim=1).min() > 0.1  # a spread-out policy: the median is not trivially its only value


def test_log_sigma_stays_inside_its_bounds():
    flow = random_flow(4, 3, sigma_min=-5.0, sigma_max=-0.3)
    with torch.no_grad():
        flow.log_scale_net[-1].weight.mul_(100.0)  # saturate tanh both ways
    obs = torch.randn(4096, 4, dtype=torch.float64) * 10
    ls = flow.log_sigma(obs)
    assert ls.min().item() >= -5.0 - 1e-12 and ls.max().item() <= -0.3 + 1e-12  # float64 rounding only
    assert ls.min().item() < -4.9 and ls.max().item() > -0.4  # both ends reachable


def test_published_architecture_and_initialisation():
    torch.manual_seed(0)
    flow = meow.EBFlowPolicy(11, 3, 0.25, -5.0, -0.3)
    assert torch.equal(flow.masks[0], torch.tensor([1.0, 0.0, 1.0])) and torch.equal(flow.masks[1], 1 - flow.masks[0])
    assert torch.equal(flow.masks[2], flow.masks[0]) and torch.equal(flow.masks[3], flow.masks[1])
    for c in flow.couplings:
        linears = [m for m in c if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(14, 64), (64, 64), (64, 3)]
        assert sum(isinstance(m, torch.nn.LayerNorm) for m in c) == 2
        assert [m.p for m in c if isinstance(m, torch.nn.Dropout)] == [0.1, 0.1]
        w = linears[1].weight
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)  # orthogonal
    for net, width in [(flow.log_scale_net, 64), (flow.shift_nets[0], 256), (flow.shift_nets[1], 256)]:
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        assert linears[0].out_features == width and all(torch.all(m.weight == 0) for m in linears)
        assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.Dropout)) for m in net)
    for m in flow.modules():
        if isinstance(m, meow.Swish):
            assert torch.all(m.beta == 1.0)
    # zero weights: log sigma starts at the middle of its range whatever the state
    ls = flow.log_sigma(torch.randn(8, 11))
    assert torch.allclose(ls, ls[0].expand_as(ls))
    swish = meow.Swish(3)
    x = torch.randn(5, 3)
    with torch.no_grad():
        swish.beta.copy_(torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(swish(x), x * torch.sigmoid(torch.tensor([0.5, 1.0, 2.0]) * x))


def test_set_dropout_does_what_train_and_eval_do():
    """The loop switches dropout with set_dropout (cheap) instead of .train()/.eval(): same outputs."""
    flow = random_flow(4, 3)
    obs, act = torch.randn(32, 4, dtype=torch.float64), torch.rand(32, 3, dtype=torch.float64) * 1.8 - 0.9

    def outputs(seed):
        torch.manual_seed(seed)
        return torch.cat([flow.sample(obs), flow.soft_q(obs, act), flow.soft_v(obs)], dim=1)

    flow.eval()
    eval_out = outputs(1)
    flow.train()
    train_out = outputs(1)
    assert not torch.allclose(train_out, eval_out)  # dropout is active in train mode: the check can fail
    flow.set_dropout(False)  # still in train mode, dropout off
    assert torch.equal(outputs(1), eval_out)
    flow.eval()
    flow.set_dropout(True)  # in eval mode, dropout on
    assert torch.equal(outputs(1), train_out)
