"""A straightforward evaluation of MEOW.md's formulas, written independently of the scripts' fast paths.

It reads only the sub-networks of an EBFlowPolicy (couplings, log-scale net, shift nets, masks) and
does what the authors' code does:
  * every layer of the flow is run and its log-determinant collected, as a generic flow library would;
  * log pi(a|s) comes from the change-of-variables formula over all layers;
  * V / alpha = log Z(s) is obtained by pushing a zero action through the *whole* flow and reading the
    log-determinants of the linear layer from that pass;
  * shifting-based clipped double Q doubles the batch: head k sees the k-th copy.
Used by the equivalence tests and, as the slow baseline, by tests/benchmark_speed.py.
"""
import math

import torch

EPS = torch.finfo(torch.float32).eps


def flow_forward(flow, obs, actions):
    """Density direction through all layers. Returns u and the log-dets of the non-linear and linear layers."""
    a = actions.clamp(-1 + 1e-5, 1 - 1e-5)
    z = 0.5 * (torch.log1p(a) - torch.log1p(-a))  # atanh, written out
    logdet_nonlinear = -torch.log(1 - a**2 + EPS).sum(-1)
    for k in [3, 2, 1, 0]:
        m = flow.masks[k]
        t = flow.couplings[k](torch.cat([m * z, obs], dim=-1))
        z = m * z + (1 - m) * (z - t)  # additive coupling, log|det| = 0
    h = flow.log_scale_net(obs)
    log_sigma = flow.sigma_min + (flow.sigma_max - flow.sigma_min) * (torch.tanh(h) + 1) / 2
    u = z / torch.exp(log_sigma)
    logdet_linear = -log_sigma.sum(-1)
    return u, logdet_nonlinear, logdet_linear


def log_prob(flow, obs, actions):
    u, ld_nl, ld_l = flow_forward(flow, obs, actions)
    d = u.shape[-1]
    return -0.5 * (u**2).sum(-1) - 0.5 * d * math.log(2 * math.pi) + ld_nl + ld_l


def log_z(flow, obs):
    """log Z(s) from a zero action pushed through the whole flow (only the linear log-det is kept)."""
    zero = torch.zeros(obs.shape[0], flow.act_dim, dtype=obs.dtype, device=obs.device)
    _, _, ld_l = flow_forward(flow, obs, zero)
    return -ld_l + 0.5 * flow.act_dim * math.log(2 * math.pi)


def q_and_v_doubled(flow, obs, actions):
    """SCDQ by batch doubling: returns Q (B, 2) and V (B, 2), head k evaluated on the k-th copy."""
    B = obs.shape[0]
    obs2, act2 = torch.cat([obs, obs]), torch.cat([actions, actions])
    shift = torch.cat([flow.shift_nets[0](obs), flow.shift_nets[1](obs)]).squeeze(-1)  # (2B,)
    lz = log_z(flow, obs2)
    q = flow.alpha * (log_prob(flow, obs2, act2) + lz + shift)
    v = flow.alpha * (lz + shift)
    return q.view(2, B).T, v.view(2, B).T


def v_doubled(flow, obs):
    shift = torch.cat([flow.shift_nets[0](obs), flow.shift_nets[1](obs)]).squeeze(-1)
    return (flow.alpha * (log_z(flow, torch.cat([obs, obs])) + shift)).view(2, -1).T


def reference_loss(flow, target_flow, obs, actions, rewards, next_obs, terminated, gamma):
    with torch.no_grad():
        next_v = v_doubled(target_flow, next_obs)
        y = rewards + gamma * (1 - terminated) * torch.min(next_v[:, 0], next_v[:, 1])
    q, _ = q_and_v_doubled(flow, obs, actions)
    return 0.5 * ((q[:, 0] - y) ** 2).mean() + 0.5 * ((q[:, 1] - y) ** 2).mean()
