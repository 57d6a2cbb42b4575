"""A stand-in for IsaacGymEnvs (Isaac Gym Preview 4), for tests on a CPU.

It copies, from IsaacGymEnvs' source, the behaviour our adapter depends on, awkward parts included:
- isaacgymenvs/__init__.py `make(seed, task, num_envs, sim_device, rl_device, graphics_device_id,
  headless, ...)` builds the bare task. `seed` goes to utils/rlgames_utils.py
  `get_rlgames_env_creator`, whose `create_rlgpu_env` never uses it: nothing is seeded (IsaacGymEnvs'
  own train.py calls `set_seed` before building the env). The tasks draw their reset noise from
  torch's global RNG (`torch_rand_float`), so here too.
- tasks/base/vec_task.py `VecTask`: the buffers (`allocate_buffers`), `step()` and `reset()` below
  follow it line by line (domain randomisation, rendering and the states buffer left out).
- The two places a task resets its finished envs: tasks/ant.py `Ant.post_physics_step` (also
  Humanoid, Anymal, FrankaCabinet) after the physics step, and tasks/allegro_hand.py
  `AllegroHand.pre_physics_step` (also Ingenuity) before the actions are applied.
The physics (`gym.simulate`) is replaced by toy dynamics.

Tasks (`make(task=...)`):
- "Line" (Ant style): obs = [x, progress / T], x += 0.5 * a; reward 1 - |x|; falls (terminates)
  when |x| > 2; T = 7; reset x ~ U(-0.5, 0.5).
- "Clock*": deterministic episodes whatever the actions. obs = [progress, env index + 1,
  20 * last a[0]] (the last component clipped by clipObservations = 10, as VecTask clamps);
  reward 1 + progress (after the step's increment); env i falls when progress reaches
  fall_at[i], else times out at progress T - 1.
    "ClockAfter"  (Ant style)         T = 6, never falls: every episode returns progress 0..5
    "ClockBefore" (AllegroHand style) T = 8, falls at 4:  every episode returns progress 1..4
    "ClockAfterVaried", "ClockBeforeVaried": T = 10, fall_at[i] = 2 + i % 8 (so env i % 8 == 7
    times out): the episode length depends on the env index.
"""
import gymnasium as gym
import numpy as np
import torch


class VecTask:
    """tasks/base/vec_task.py `Env.__init__`, `VecTask.allocate_buffers`, `step`, `reset`."""

    def __init__(self, cfg, rl_device, sim_device):
        self.cfg = cfg
        self.device, self.rl_device = sim_device, rl_device
        self.num_envs = cfg["env"]["numEnvs"]
        self.num_obs, self.num_actions = cfg["env"]["numObservations"], cfg["env"]["numActions"]
        self.max_episode_length = cfg["env"]["episodeLength"]
        # Env.__init__: unbounded observation space, actions in [-1, 1]; no clipping unless configured
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.num_obs,))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.num_actions,))
        self.clip_obs = cfg["env"].get("clipObservations", np.inf)
        self.clip_actions = cfg["env"].get("clipActions", np.inf)
        self.control_steps = 0
        self.allocate_buffers()
        self.obs_dict = {}  # one dict, refilled by every reset() and step()

    def allocate_buffers(self):
        # the observations are zeros until the first step computes them; reset_buf starts at ones,
        # so the first step resets every env
        self.obs_buf = torch.zeros((self.num_envs, self.num_obs), device=self.device, dtype=torch.float)
        self.rew_buf = torch.zeros(self.num_envs, device=self.device, dtype=torch.float)
        self.reset_buf = torch.ones(self.num_envs, device=self.device, dtype=torch.long)
        self.timeout_buf = torch.zeros(self.num_envs, device=self.device, dtype=torch.long)
        self.progress_buf = torch.zeros(self.num_envs, device=self.device, dtype=torch.long)
        self.extras = {}

    def step(self, actions):
        action_tensor = torch.clamp(actions, -self.clip_actions, self.clip_actions)
        self.pre_physics_step(action_tensor)
        self.simulate()  # self.gym.simulate(self.sim) in Isaac Gym
        self.post_physics_step()
        self.control_steps += 1
        # "set to 1 if we reached the max episode length AND the reset buffer is 1"
        self.timeout_buf = (self.progress_buf >= self.max_episode_length - 1) & (self.reset_buf != 0)
        self.extras["time_outs"] = self.timeout_buf.to(self.rl_device)
        self.obs_dict["obs"] = torch.clamp(self.obs_buf, -self.clip_obs, self.clip_obs).to(self.rl_device)
        # the task's own rew_buf and reset_buf, updated in place by the next step (.to() on the same
        # device returns the tensor itself)
        return self.obs_dict, self.rew_buf.to(self.rl_device), self.reset_buf.to(self.rl_device), self.extras

    def reset(self):
        """"Is called only once when environment starts ... Doesn't calculate observations.\""""
        self.obs_dict["obs"] = torch.clamp(self.obs_buf, -self.clip_obs, self.clip_obs).to(self.rl_device)
        return self.obs_dict


class ResetAfterPhysics(VecTask):
    """tasks/ant.py `Ant.pre_physics_step` / `post_physics_step`: the flagged envs are reset after the
    physics step, so this step's observation and reward are those of the fresh state (progress 0)."""

    def pre_physics_step(self, actions):
        self.actions = actions.clone().to(self.device)

    def post_physics_step(self):
        self.progress_buf += 1
        env_ids = self.reset_buf.nonzero(as_tuple=False).flatten()
        if len(env_ids) > 0:
            self.reset_idx(env_ids)
        self.compute_observations()
        self.compute_reward(self.actions)


class ResetBeforePhysics(VecTask):
    """tasks/allegro_hand.py `AllegroHand.pre_physics_step` / `post_physics_step`: the flagged envs are
    reset before the actions are applied, so the fresh state (progress 0) is never observed."""

    def pre_physics_step(self, actions):
        env_ids = self.reset_buf.nonzero(as_tuple=False).squeeze(-1)
        if len(env_ids) > 0:
            self.reset_idx(env_ids)
        self.actions = actions.clone().to(self.device)

    def post_physics_step(self):
        self.progress_buf += 1
        self.compute_observations()
        self.compute_reward(self.actions)


def update_resets(task, fell):
    """compute_ant_reward's reset rule: fallen or progress >= max_episode_length - 1 (reset_buf kept)."""
    reset = torch.where(fell, torch.ones_like(task.reset_buf), task.reset_buf)
    return torch.where(task.progress_buf >= task.max_episode_length - 1, torch.ones_like(task.reset_buf), reset)


class Line(ResetAfterPhysics):
    def __init__(self, cfg, rl_device, sim_device):
        super().__init__(cfg, rl_device, sim_device)
        self.x = torch.zeros(self.num_envs, device=self.device)

    def reset_idx(self, env_ids):
        self.x[env_ids] = torch.rand(len(env_ids), device=self.device) - 0.5  # torch's global RNG
        self.progress_buf[env_ids] = 0
        self.reset_buf[env_ids] = 0

    def simulate(self):
        self.x += 0.5 * self.actions[:, 0]

    def compute_observations(self):
        self.obs_buf[:] = torch.stack([self.x, self.progress_buf.float() / self.max_episode_length], dim=1)

    def compute_reward(self, actions):
        # in place, as every task does: self.rew_buf[:], self.reset_buf[:] = compute_..._reward(...)
        self.rew_buf[:], self.reset_buf[:] = 1.0 - self.x.abs(), update_resets(self, self.x.abs() > 2)


class Clock:
    """Deterministic episodes (see the module docstring); mixed into either reset style."""

    def reset_idx(self, env_ids):
        self.progress_buf[env_ids] = 0
        self.reset_buf[env_ids] = 0

    def simulate(self):
        pass

    def compute_observations(self):
        index = torch.arange(self.num_envs, device=self.device)
        self.obs_buf[:] = torch.stack([self.progress_buf.float(), index + 1.0, 20 * self.actions[:, 0]], dim=1)

    def compute_reward(self, actions):
        fell = self.progress_buf >= torch.as_tensor(self.cfg["env"]["fallAt"], device=self.device)
        self.rew_buf[:], self.reset_buf[:] = 1.0 + self.progress_buf, update_resets(self, fell)


class ClockAfter(Clock, ResetAfterPhysics):
    pass


class ClockBefore(Clock, ResetBeforePhysics):
    pass


NEVER = 10**6
TASKS = {  # name: (class, episodeLength, fall_at(env index))
    "Line": (Line, 7, None),
    "ClockAfter": (ClockAfter, 6, lambda i: NEVER),
    "ClockBefore": (ClockBefore, 8, lambda i: 4),
    "ClockAfterVaried": (ClockAfter, 10, lambda i: 2 + i % 8),
    "ClockBeforeVaried": (ClockBefore, 10, lambda i: 2 + i % 8),
}


def make(seed, task, num_envs, sim_device, rl_device, graphics_device_id=-1, headless=False, **kwargs):
    if task not in TASKS:
        raise ValueError(f"unknown task {task}")
    cls, length, fall_at = TASKS[task]
    env_cfg = {"numEnvs": num_envs, "episodeLength": length, "numActions": 1, "clipActions": 1.0,
               "numObservations": 2 if cls is Line else 3, "clipObservations": 5.0 if cls is Line else 10.0}
    if fall_at is not None:
        env_cfg["fallAt"] = [fall_at(i) for i in range(num_envs)]
    return cls({"env": env_cfg}, rl_device=str(rl_device), sim_device=str(sim_device))
