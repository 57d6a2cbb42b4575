"""Fake `isaaclab.envs`: ManagerBasedRLEnv and DirectRLEnv with the step contract of the 2.3.2.post1 wheel
(isaaclab/envs/manager_based_rl_env.py, direct_rl_env.py, manager_based_env.py; the managers' buffers from
isaaclab/managers/termination_manager.py and reward_manager.py; configure_seed from isaaclab/utils/seed.py).

step(action) -> (obs, rewards, terminated, truncated, extras):
- obs is a dict of observation groups, the policy's under "policy" (a new tensor each step);
- terminated and truncated are the env's own buffers, refilled in place each step and returned by
  reference; so is a manager-based env's reward buffer (a direct env returns a new reward tensor);
  both flags can be set at once;
- envs that finished are reset inside step(), before the observations are computed: the observation
  returned for them is their new episode's first one;
- 2.3.2 has no final observation. Later versions (FAKE_ISAACLAB_FINAL_OBS=1 here) have a cfg flag
  `compute_final_obs`: when set, a step that resets envs first stores all groups' observations in
  extras["final_obs"] (the dict stays there, stale, through steps without a reset).
The action space is unbounded; the task's action term scales the raw actions.
"""
import math
import os
import random
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from isaaclab.app import require_running_app

require_running_app("isaaclab.envs")
LATER_VERSION = os.environ.get("FAKE_ISAACLAB_FINAL_OBS") == "1"


def configure_seed(seed, torch_deterministic=False):
    """isaaclab.utils.seed.configure_seed: every global RNG, and cuDNN's flags."""
    if seed is None or seed == -1:
        seed = 42 if torch_deterministic else random.randint(0, 10000)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not torch_deterministic
    torch.backends.cudnn.deterministic = torch_deterministic
    return seed


@dataclass
class SimulationCfg:
    device: str = "cuda:0"
    dt: float = 0.125


@dataclass
class InteractiveSceneCfg:
    num_envs: int = 4096


@dataclass
class _RLEnvCfg:
    """The fields both real config classes have (the stand-in shares them; the package repeats them)."""
    sim: SimulationCfg = field(default_factory=SimulationCfg)
    scene: InteractiveSceneCfg = field(default_factory=InteractiveSceneCfg)
    seed: int = None
    decimation: int = 2
    is_finite_horizon: bool = False
    action_scale: float = 2.0  # the task's action term (Isaac-Ant-v0: JointEffortActionCfg(scale=7.5))


@dataclass
class ManagerBasedRLEnvCfg(_RLEnvCfg):
    episode_length_s: float = 1.75


@dataclass
class DirectRLEnvCfg(_RLEnvCfg):
    episode_length_s: float = 2.0
    action_space: int = 1
    observation_space: int = 2


if LATER_VERSION:  # the opt-in flag of later Isaac Lab versions; 2.3.2's configs have no such field
    ManagerBasedRLEnvCfg.compute_final_obs = False
    DirectRLEnvCfg.compute_final_obs = False


class LineScene:
    """The toy scene: a point x per env; an action moves it. x leaves [-1, 1]: terminated."""
    is_vector_env = True
    metadata = {"render_modes": [None, "human", "rgb_array"]}

    def setup_scene(self, cfg, render_mode):
        """What both env classes' __init__ do first: seed from the cfg (configure_seed), keep the cfg."""
        if cfg.seed is not None:
            cfg.seed = configure_seed(cfg.seed)
        self.cfg, self.render_mode = cfg, render_mode
        self.num_envs, self.device = cfg.scene.num_envs, torch.device(cfg.sim.device)
        self.physics_dt, self.step_dt = cfg.sim.dt, cfg.sim.dt * cfg.decimation
        self.max_episode_length = math.ceil(cfg.episode_length_s / self.step_dt)
        self.x = torch.zeros(self.num_envs, device=self.device)
        self.episode_length_buf = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.common_step_counter, self.extras, self._is_closed = 0, {}, False

    def physics(self, effort):
        for _ in range(self.cfg.decimation):
            self.x += self.physics_dt * effort

    def compute_obs(self):
        return {"policy": torch.stack([self.x, self.episode_length_buf / self.max_episode_length], dim=1)}

    def _reset_idx(self, env_ids):
        # reset events draw from torch's global RNG (isaaclab.utils.math.sample_uniform)
        self.x[env_ids] = torch.rand(len(env_ids), device=self.device) - 0.5
        self.episode_length_buf[env_ids] = 0
        self.extras["log"] = {"Episode_Termination/out_of_line": 0.0}

    def reset_finished(self, reset_buf):
        reset_env_ids = reset_buf.nonzero(as_tuple=False).squeeze(-1)
        if len(reset_env_ids) > 0:
            if getattr(self.cfg, "compute_final_obs", False):
                self.extras["final_obs"] = self.compute_obs()  # before the reset
            self._reset_idx(reset_env_ids)

    def reset(self, seed=None, options=None):
        if seed is not None:
            configure_seed(seed)
        self._reset_idx(torch.arange(self.num_envs, device=self.device))
        self.obs_buf = self.compute_obs()
        return self.obs_buf, self.extras

    def close(self):
        self._is_closed = True


def batch_spaces(env, obs_dim, act_dim):
    # observation and action spaces are unbounded (no limits imposed)
    env.single_observation_space = gym.spaces.Dict({"policy": gym.spaces.Box(-np.inf, np.inf, (obs_dim,))})
    env.single_action_space = gym.spaces.Box(-np.inf, np.inf, (act_dim,))
    env.observation_space = gym.vector.utils.batch_space(env.single_observation_space, env.num_envs)
    env.action_space = gym.vector.utils.batch_space(env.single_action_space, env.num_envs)


class ManagerBasedRLEnv(LineScene, gym.Env):
    def __init__(self, cfg, render_mode=None, **kwargs):
        self.setup_scene(cfg, render_mode)
        # TerminationManager's two buffers and RewardManager's buffer
        self._truncated_buf = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self._terminated_buf = torch.zeros_like(self._truncated_buf)
        self._reward_buf = torch.zeros(self.num_envs, device=self.device)
        batch_spaces(self, 2, 1)

    def step(self, action):
        # JointAction.process_actions: raw * scale + offset, no clip
        effort = action.to(self.device)[:, 0] * self.cfg.action_scale
        self.physics(effort)
        self.episode_length_buf += 1
        self.common_step_counter += 1
        # TerminationManager.compute(): clear, then OR every term in; mdp.time_out is a time-out term
        self._truncated_buf[:] = False
        self._terminated_buf[:] = False
        self._truncated_buf |= self.episode_length_buf >= self.max_episode_length
        self._terminated_buf |= self.x.abs() > 1.0
        self.reset_buf = self._truncated_buf | self._terminated_buf
        self.reset_terminated, self.reset_time_outs = self._terminated_buf, self._truncated_buf
        # RewardManager.compute(dt): sum of weight * term * dt into its own buffer
        self._reward_buf[:] = 0.0
        self._reward_buf += 1.0 * (1.0 - self.x.abs()) * self.step_dt
        self.reward_buf = self._reward_buf
        self.reset_finished(self.reset_buf)
        self.obs_buf = self.compute_obs()
        return self.obs_buf, self.reward_buf, self.reset_terminated, self.reset_time_outs, self.extras


class DirectRLEnv(LineScene, gym.Env):
    def __init__(self, cfg, render_mode=None, **kwargs):
        self.setup_scene(cfg, render_mode)
        self.reset_terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.reset_time_outs = torch.zeros_like(self.reset_terminated)
        batch_spaces(self, cfg.observation_space, cfg.action_space)

    def step(self, action):
        action = action.to(self.device)
        self._pre_physics_step(action)
        self.physics(self.effort)
        self.episode_length_buf += 1
        self.common_step_counter += 1
        self.reset_terminated[:], self.reset_time_outs[:] = self._get_dones()
        self.reset_buf = self.reset_terminated | self.reset_time_outs
        self.reward_buf = self._get_rewards()
        self.reset_finished(self.reset_buf)
        self.obs_buf = self._get_observations()
        return self.obs_buf, self.reward_buf, self.reset_terminated, self.reset_time_outs, self.extras

    # the task's own methods, as in direct/franka_cabinet/franka_cabinet_env.py
    def _pre_physics_step(self, actions):
        self.actions = actions.clone().clamp(-1.0, 1.0)
        self.effort = self.cfg.action_scale * self.actions[:, 0]

    def _get_dones(self):
        return self.x.abs() > 1.0, self.episode_length_buf >= self.max_episode_length - 1

    def _get_rewards(self):
        return 1.0 - self.x.abs()

    def _get_observations(self):
        return {"policy": torch.clamp(self.compute_obs()["policy"], -5.0, 5.0)}
