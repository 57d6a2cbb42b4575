"""A tiny deterministic env whose every transition is known, for buffer / episode-boundary tests.

obs = [episode, t, 1]; reward = 100 * episode + t + 1 (the step being taken). Even episodes
terminate after 3 steps; odd episodes run until the TimeLimit truncates them at 5 steps.
Use from a script as  --env-id tests.scripted_env:Scripted-v0
"""
import gymnasium as gym
import numpy as np


class ScriptedEnv(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self):
        self.episode, self.t = -1, 0

    def obs(self):
        return np.array([self.episode, self.t, 1.0], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self.obs(), {}

    def step(self, action):
        reward = 100.0 * self.episode + self.t + 1
        self.t += 1
        terminated = self.episode % 2 == 0 and self.t == 3
        return self.obs(), reward, terminated, False, {}


gym.register("Scripted-v0", entry_point=ScriptedEnv, max_episode_steps=5)


class NanRewardEnv(ScriptedEnv):
    """Same dynamics, but every reward is NaN: every update's loss is non-finite."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, float("nan"), terminated, truncated, info


gym.register("NanReward-v0", entry_point=NanRewardEnv, max_episode_steps=5)


class UnboundedActionEnv(ScriptedEnv):
    """Same dynamics, one action dimension unbounded: no tanh flow can cover it."""

    action_space = gym.spaces.Box(np.array([-1.0, -np.inf], np.float32), np.array([1.0, np.inf], np.float32))


gym.register("UnboundedAction-v0", entry_point=UnboundedActionEnv, max_episode_steps=5)


class DictObsEnv(ScriptedEnv):
    """Same dynamics, the observation in a dict: not the flat vector the scripts need."""

    observation_space = gym.spaces.Dict({"x": ScriptedEnv.observation_space})

    def obs(self):
        return {"x": super().obs()}


gym.register("DictObs-v0", entry_point=DictObsEnv, max_episode_steps=5)


class RandomStartEnv(gym.Env):
    """Episodes of exactly 4 steps from a random start x ~ U(-1, 1) drawn from the env's own RNG.

    Its only state across episodes is that RNG, which checkpoints save: a run resumed at a
    multiple of 4 steps can reproduce the uninterrupted run exactly.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = float(self.np_random.uniform(-1, 1)), 0
        return np.array([self.x, self.t, 1.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        reward = self.x + self.t - float(np.sum(np.square(action)))
        return np.array([self.x, self.t, 1.0], dtype=np.float32), reward, self.t == 4, False, {}


gym.register("RandomStart-v0", entry_point=RandomStartEnv, max_episode_steps=100)
