"""Fake `isaaclab.envs`: ManagerBasedRLEnv and DirectRLEnv with the step contract of the 3.0.0 wheel
(isaaclab/envs/manager_based_rl_env.py, direct_rl_env.py, manager_based_env.py, the *_cfg.py beside them; the
managers' buffers from isaaclab/managers/termination_manager.py, reward_manager.py and observation_manager.py;
configure_seed from isaaclab/utils/seed.py). Importable before any launch, as in 3.0.

step(action) -> (obs, rewards, terminated, truncated, extras):
- obs is a dict of observation groups, the policy's under "policy" (new tensors each step);
- terminated and truncated are the env's own buffers, refilled in place each step and returned by
  reference; so is a manager-based env's reward buffer (a direct env returns a new reward tensor);
  both flags can be set at once;
- envs that finished are reset inside step(), before the observations are computed: the observation
  returned for them is their new episode's first one;
- cfg.compute_final_obs (default False): a step that resets envs first stores every group's observation in
  extras["final_obs"]; nothing removes it, so it stays there, stale, through the steps without a reset.
The action space is unbounded. One simulation per process: a second env while one is open is a RuntimeError.
"""
import math
import random
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from isaaclab.app import RUNNING
from isaaclab.physics import NewtonCfg, OvPhysxCfg, PhysicsCfg, PhysxCfg


def configure_seed(seed, torch_deterministic=False):
    """isaaclab.utils.seed.configure_seed: every global RNG (and Warp's), and cuDNN's flags."""
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
    physics: PhysicsCfg = None  # None: Isaac Sim PhysX (isaaclab/sim/simulation_cfg.py)


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
    compute_final_obs: bool = False
    action_scale: float = 2.0  # the task's action term (Isaac-Ant: JointEffortActionCfg(scale=7.5))


@dataclass
class ManagerBasedRLEnvCfg(_RLEnvCfg):
    episode_length_s: float = 1.75


@dataclass
class DirectRLEnvCfg(_RLEnvCfg):
    episode_length_s: float = 2.0
    action_space: int = 1
    observation_space: int = 2


class SimulationContext:
    _instance = None


def start_physics(cfg):
    """The physics backend the resolved config names, as far as a stand-in can tell it apart."""
    physics = cfg.sim.physics
    if not isinstance(physics, (type(None), NewtonCfg, PhysxCfg, OvPhysxCfg)):  # e.g. an unresolved preset
        raise TypeError(f"stand-in: cfg.sim.physics is a {type(physics).__name__}, not a concrete physics config")
    if (physics is None or isinstance(physics, PhysxCfg)) and not RUNNING:
        raise ModuleNotFoundError("stand-in: Isaac Sim PhysX without a running Kit (launch_simulation starts it)")
    if isinstance(physics, OvPhysxCfg):
        raise ModuleNotFoundError("No module named 'ovphysx'")


class LineScene:
    """The toy scene: a point x per env; an action moves it. x leaves [-1, 1]: terminated."""
    is_vector_env = True
    metadata = {"render_modes": [None, "human", "rgb_array"], "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def setup_scene(self, cfg, render_mode):
        """What both env classes' __init__ do first: seed from the cfg, then the simulation context."""
        if cfg.seed is not None:
            cfg.seed = configure_seed(cfg.seed)
        if SimulationContext._instance is not None:
            raise RuntimeError("Simulation context already exists. Cannot create a new one.")
        start_physics(cfg)
        SimulationContext._instance = self
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
        reset_env_ids = reset_buf.nonzero(as_tuple=False).squeeze(-1).int()
        if len(reset_env_ids) > 0:
            if self.cfg.compute_final_obs:  # the terminal observation, before the reset
                self.extras["final_obs"] = self.compute_obs()
            self._reset_idx(reset_env_ids)

    def reset(self, seed=None, options=None):
        if seed is not None:
            configure_seed(seed)
        self._reset_idx(torch.arange(self.num_envs, device=self.device))
        self.obs_buf = self.compute_obs()
        return self.obs_buf, self.extras

    def close(self):
        if not self._is_closed:
            self._is_closed = True
            SimulationContext._instance = None


def batch_spaces(env, obs_dim, act_dim):
    # observation and action spaces are unbounded (no limits imposed); an int is a vector, a list a shape
    shape = tuple(obs_dim) if isinstance(obs_dim, list) else (obs_dim,)
    env.single_observation_space = gym.spaces.Dict({"policy": gym.spaces.Box(-np.inf, np.inf, shape)})
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
        # JointEffortAction: raw * scale, clipped to +-scale (Isaac-Ant: clip={".*": (-7.5, 7.5)})
        effort = (action.to(self.device)[:, 0] * self.cfg.action_scale).clamp(-self.cfg.action_scale,
                                                                               self.cfg.action_scale)
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
        # RewardManager.compute(dt): sum of weight * term into its own buffer, times dt
        self._reward_buf[:] = 1.0 * (1.0 - self.x.abs())
        self._reward_buf.mul_(self.step_dt)
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
        self.reset_finished(self.reset_buf)  # _reset_envs_from_buffer()
        self.obs_buf = self._get_observations()
        return self.obs_buf, self.reward_buf, self.reset_terminated, self.reset_time_outs, self.extras

    # the task's own methods, as in isaaclab_tasks/core/locomotion/locomotion_direct_env.py (Isaac-Ant-Direct)
    def _pre_physics_step(self, actions):
        self.actions = actions.clone()
        # the action is clamped before scaling
        self.effort = self.cfg.action_scale * torch.clamp(self.actions, -1.0, 1.0)[:, 0]

    def _get_dones(self):
        return self.x.abs() > 1.0, self.episode_length_buf >= self.max_episode_length

    def _get_rewards(self):
        return 1.0 - self.x.abs()

    def _get_observations(self):
        return self.compute_obs()
