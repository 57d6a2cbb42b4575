"""Replay buffer: ring wrap-around, sampling, and episode boundaries of the real training loop."""
import torch

import ebflow_continuous_action as meow

from .scripted_env import ScriptedEnv


def test_wraps_around_and_keeps_the_newest_transitions():
    rb = meow.ReplayBuffer(5, obs_dim=2, act_dim=1, device="cpu")
    for i in range(7):
        rb.add([i, i], [i / 10], i, [i + 1, i + 1], i % 2)
    assert rb.size == 5 and rb.pos == 2
    # slots 0, 1 were overwritten by transitions 5, 6; slots 2..4 hold 2..4
    assert rb.rewards.tolist() == [5, 6, 2, 3, 4]
    assert rb.obs[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert rb.next_obs[:, 0].tolist() == [6, 7, 3, 4, 5]
    assert rb.terminated.tolist() == [1, 0, 0, 1, 0]


def test_samples_only_filled_slots_and_keeps_fields_aligned():
    rb = meow.ReplayBuffer(100, obs_dim=2, act_dim=1, device="cpu")
    for i in range(10):
        rb.add([i, -i], [i / 100], 10 * i, [i + 0.5, 0], 0)
    torch.manual_seed(0)
    obs, act, rew, next_obs, term = rb.sample(4096)
    assert obs.shape == (4096, 2) and act.shape == (4096, 1) and rew.shape == term.shape == (4096,)
    i = obs[:, 0]
    assert set(i.long().tolist()) == set(range(10))  # every filled slot, none of the empty ones
    assert torch.equal(rew, 10 * i) and torch.equal(next_obs[:, 0], i + 0.5)
    assert torch.allclose(act[:, 0], i / 100) and torch.equal(obs[:, 1], -i)


def test_state_dict_round_trip_is_compact():
    rb = meow.ReplayBuffer(1000, obs_dim=3, act_dim=2, device="cpu")
    for i in range(10):
        rb.add([i] * 3, [0.1, 0.2], i, [i + 1] * 3, 0)
    state = rb.state_dict()
    assert state["obs"].shape == (10, 3) and state["obs"].untyped_storage().nbytes() == 10 * 3 * 4
    rb2 = meow.ReplayBuffer(1000, obs_dim=3, act_dim=2, device="cpu")
    rb2.load_state_dict(state)
    assert rb2.size == 10 and rb2.pos == 10 and torch.equal(rb2.obs, rb.obs) and torch.equal(rb2.rewards, rb.rewards)


def expected_transitions(n):
    """Replay ScriptedEnv by hand: the transitions a correct loop stores, in order."""
    env, out = ScriptedEnv(), []
    obs, _ = env.reset()
    t = 0
    while len(out) < n:
        next_obs, r, term, _, _ = env.step(None)
        t += 1
        trunc = t == 5
        out.append((obs.tolist(), r, next_obs.tolist(), float(term)))
        obs = next_obs
        if term or trunc:
            obs, _ = env.reset()
            t = 0
    return out


def test_training_loop_stores_episode_boundaries_exactly(run, tmp_path):
    """Run the real script on the scripted env and read back its buffer from the checkpoint.

    Even episodes terminate (terminated = 1), odd ones are truncated by the TimeLimit (terminated = 0,
    next_obs = the true final observation); no stored transition spans two episodes.
    """
    n = 20
    out = run("ebflow_continuous_action.py", "--env-id", "tests.scripted_env:Scripted-v0", "--total-timesteps", n,
              "--learning-starts", 1000, "--checkpoint-frequency", n, "--eval-frequency", 1000, "--eval-episodes", 1,
              "--batch-size", 4, "--buffer-size", 64)
    assert out.returncode == 0, out.stderr
    (ckpt_path,) = tmp_path.glob("runs/*/checkpoint.pt")
    buf = torch.load(ckpt_path, weights_only=True)["train_state"]["buffer"]
    assert buf["size"] == n
    for i, (obs, r, next_obs, term) in enumerate(expected_transitions(n)):
        assert buf["obs"][i].tolist() == obs, i
        assert buf["rewards"][i].item() == r, i
        assert buf["next_obs"][i].tolist() == next_obs, i
        assert buf["terminated"][i].item() == term, i
        assert buf["obs"][i][0] == buf["next_obs"][i][0], f"transition {i} spans two episodes"
    # the scripted schedule really exercised both kinds of episode end
    assert buf["terminated"].sum() > 0
    truncated_ends = [i for i in range(n) if buf["next_obs"][i][1] == 5]
    assert truncated_ends and all(buf["terminated"][i] == 0 for i in truncated_ends)
