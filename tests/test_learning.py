"""Learning checks: MEow's multi-modality on a one-step task, and InvertedPendulum-v4 within 10k steps."""
import glob
import re

import pytest
import torch

import ebflow_continuous_action as meow

from .conftest import read_tensorboard


def test_two_equally_good_actions_get_mass_on_both():
    """One-step task (gamma = 0, every transition terminal), reward -4 min(|a - m|^2, |a + m|^2):
    two optima, a = m and a = -m. The soft-optimal policy exp(Q/alpha) is bimodal; a Gaussian
    (SAC-style) policy would pick one mode. After training, samples must land near both."""
    torch.manual_seed(0)
    flow = meow.EBFlowPolicy(1, 2, 0.1, -5.0, -0.3)
    target = meow.EBFlowPolicy(1, 2, 0.1, -5.0, -0.3)
    target.load_state_dict(flow.state_dict())
    update, _, _ = meow.make_update(flow, target, meow.Args(gamma=0.0, tau=1.0))
    m = torch.tensor([0.6, 0.6])
    obs, done = torch.ones(256, 1), torch.ones(256)
    for _ in range(1500):
        a = torch.rand(256, 2) * 2 - 1  # off-policy data, uniform over the action box
        r = -4 * torch.minimum(((a - m) ** 2).sum(1), ((a + m) ** 2).sum(1))
        update((obs, a, r, obs, done))
    flow.eval()
    with torch.no_grad():
        s = flow.sample(torch.ones(4000, 1))
    near_pos = ((s - m).norm(dim=1) < 0.3).float().mean().item()
    near_neg = ((s + m).norm(dim=1) < 0.3).float().mean().item()
    # the exact soft-optimal policy puts 50% on each mode; a unimodal fit would leave one near 0
    assert near_pos > 0.15 and near_neg > 0.15, (near_pos, near_neg)
    assert near_pos + near_neg > 0.4


@pytest.mark.learning
@pytest.mark.parametrize("seed", [2, 3])  # tuned on seed 1; seeds 1 to 5 reach 1,000 (at 6k, 8k, 4k, 7k, 6k)
def test_inverted_pendulum_reaches_900_within_10k_steps(run, tmp_path, seed):
    out = run("ebflow_continuous_action.py", "--env-id", "InvertedPendulum-v4", "--seed", seed, "--total-timesteps", 10_000,
              "--learning-starts", 1000, "--alpha", 0.05, "--tau", 0.02, "--eval-frequency", 1000, "--eval-episodes", 5,
              env={"OMP_NUM_THREADS": "1"})  # one thread: the same float sums on every 2-core machine
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "InvertedPendulum-v4__*"))
    evals = [v for _, v in read_tensorboard(run_dir)[0]["eval/return"]]
    print("InvertedPendulum-v4 deterministic eval returns:", evals)
    assert len(evals) == 10 and max(evals) >= 900, evals
    assert re.search(r"step 10000/10000", out.stdout)
