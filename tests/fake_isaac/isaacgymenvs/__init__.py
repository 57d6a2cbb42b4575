"""A fake of the IsaacGymEnvs API (`isaacgymenvs.make`), for tests on a CPU.

Like IsaacGymEnvs' VecTask: batched torch tensors on rl_device; step() returns
(obs_dict, rewards, dones, infos) with infos["time_outs"]; a finished env is reset during the
*next* step (so the observation returned with done is the true final one, and the next transition
spans the reset). Task "Line": obs = [x, t / T], x += 0.5 * a; reward = 1 - |x|; terminated when
|x| > 2; time-out after T = 7 steps.
"""
import gymnasium as gym
import numpy as np
import torch

T = 7


class LineTask:
    def __init__(self, num_envs, device, seed):
        self.num_envs, self.device, self.max_episode_length = num_envs, device, T
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.x = torch.zeros(num_envs, device=device)
        self.progress = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.reset_buf = torch.ones(num_envs, dtype=torch.long, device=device)
        self.steps_taken = 0

    def obs(self):
        return {"obs": torch.stack([self.x, self.progress.float() / T], dim=1)}

    def reset_idx(self, ids):
        self.x[ids] = (torch.rand(len(ids), generator=self.gen) - 0.5).to(self.device)
        self.progress[ids] = 0
        self.reset_buf[ids] = 0

    def reset(self):
        self.reset_idx(torch.arange(self.num_envs, device=self.device))
        return self.obs()

    def step(self, actions):
        assert actions.shape == (self.num_envs, 1) and actions.abs().max() <= 1
        self.steps_taken += 1
        self.x += 0.5 * actions[:, 0].to(self.device)
        self.progress += 1
        ids = self.reset_buf.nonzero().flatten()  # deferred reset, as in IsaacGymEnvs' post_physics_step
        if len(ids) > 0:
            self.reset_idx(ids)
        rewards = 1.0 - self.x.abs()
        terminated = self.x.abs() > 2
        self.reset_buf = (terminated | (self.progress >= T - 1)).long()
        time_outs = (self.progress >= T - 1) & (self.reset_buf != 0)
        return self.obs(), rewards, self.reset_buf.clone(), {"time_outs": time_outs}


def make(seed, task, num_envs, sim_device, rl_device, graphics_device_id, headless, **kwargs):
    if task != "Line":
        raise ValueError(f"unknown task {task}")
    return LineTask(num_envs, torch.device(rl_device), seed)
