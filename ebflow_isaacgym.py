# MEow on vectorized simulators (Isaac Gym), in one file: Chao et al., NeurIPS 2024
# paper: https://arxiv.org/abs/2405.13629
# The same EBFlow policy and soft Bellman loss as ebflow_continuous_action.py (duplicated on purpose:
# each script stands alone); what changes is vectorization: N environments step at once, every tensor
# lives on the device, the replay buffer holds N transitions per vector step, observations are
# standardised by running statistics, and one gradient step is taken per vector step.
# Backends: `isaacgym` (Isaac Gym Preview 4 + IsaacGymEnvs, GPU), `isaaclab` (Isaac Lab 2.3.2 on Isaac Sim 5.1,
# GPU) or `gymnasium` (any Gymnasium continuous-control task as a vector env; runs on a CPU, and is what the
# tests use).
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

try:  # Isaac Gym must be imported before torch
    import isaacgym  # noqa: F401
    import isaacgymenvs
except ImportError:
    isaacgymenvs = None

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default (when available)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """if toggled, save the final and the best-eval model (with the observation normaliser) under `runs/{run_name}`"""
    eval_checkpoint: Optional[str] = None
    """if set, load this saved model or checkpoint (a file, or a run directory holding just one), run
    `eval_episodes` deterministic episodes, print the return and exit"""
    checkpoint_frequency: int = 0
    """write the full training state to `runs/{run_name}/checkpoint.pt` every N transitions (0 = never)"""
    resume: Optional[str] = None
    """resume training from a checkpoint file or a run directory holding `checkpoint.pt`"""
    compile: bool = False
    """if toggled, torch.compile the update and acting (CUDA graphs on GPU)"""
    log_frequency: int = 100
    """log losses and episode statistics, and print progress, every N vector steps"""

    # Environment
    backend: Literal["isaacgym", "isaaclab", "gymnasium"] = "isaacgym"
    """`isaacgym` (IsaacGymEnvs task names: Ant, Humanoid, ...), `isaaclab` (Isaac Lab 2.3.2 task ids:
    Isaac-Ant-v0, ...) or `gymnasium` (ids such as Ant-v4)"""
    env_id: str = "Ant"
    """the task name (isaacgym), the Isaac Lab task id (isaaclab) or the Gymnasium id (gymnasium)"""
    num_envs: int = 128
    """the number of parallel environments"""
    sim_device: str = "cuda:0"
    """the simulation device of Isaac Gym or Isaac Lab (cpu, cuda or cuda:N)"""
    graphics_device_id: int = 0
    """Isaac Gym's graphics device (rendering is off: headless)"""

    # Algorithm specific arguments (defaults: the paper's Isaac Gym Ant settings)
    total_timesteps: int = 128_000_000
    """total transitions over all envs (paper: 1M vector steps x 128 envs)"""
    buffer_size: int = 15_000
    """the replay capacity in vector steps (it holds buffer_size * num_envs transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.0005
    """target smoothing coefficient (Polyak averaging rate)"""
    batch_size: int = 1024
    """the batch size of one gradient step (paper: 131072 / num_envs)"""
    learning_starts: int = 100
    """vector steps of uniform random actions before learning starts"""
    learning_rate: float = 1e-3
    """the learning rate of the single Adam optimizer"""
    max_grad_norm: float = 30.0
    """the maximum norm for gradient clipping"""
    alpha: float = 0.075
    """entropy temperature (fixed per task, as in the paper)"""
    sigma_max: float = 2.0
    """upper bound of the log-std of the state-dependent scale sigma(s)"""
    sigma_min: float = -5.0
    """lower bound of the log-std of the state-dependent scale sigma(s)"""
    flow_hidden: int = 64
    """hidden width of the coupling networks t_k and of the log-scale network h(s)"""
    shift_hidden: int = 256
    """hidden width of the reward-shift networks b_1(s), b_2(s)"""
    obs_clip: float = 5.0
    """standardised observations are clipped to [-obs_clip, obs_clip]"""
    eval_frequency: int = 1_280_000
    """evaluate the deterministic policy every N transitions"""
    eval_episodes: int = 10
    """episodes per deterministic evaluation: one whole episode from each of the first eval_episodes envs
    (episodes that begin during the evaluation; with fewer envs, the next episodes in env order)"""
    max_nonfinite_updates: int = 100
    """stop the run once this many updates had a non-finite loss or gradient (each one is skipped)"""


def fail(message: str):
    """Bad input: one line on stderr and a non-zero exit, before anything is written."""
    # one line whatever the message quotes (a file name, a parser's error): control characters are escaped
    print("error: " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in message), file=sys.stderr)
    sys.exit(2)


def library_versions():
    """The software a run uses, as one line. The simulator's version matters: MuJoCo 3.5 and later move
    Ant-v4 and Humanoid-v4 off the trajectories MuJoCo 2.3 (the paper's) gives the same actions within a
    few steps (docs/meow.md, "Experiment results"). MuJoCo is listed where the task loaded it."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
                "numpy": np.__version__}
    if "mujoco" in sys.modules:
        versions["mujoco"] = sys.modules["mujoco"].__version__
    return ", ".join(f"{name} {version}" for name, version in versions.items())


# Every int and float flag of Args, under the one rule its values must satisfy. check_args walks the
# fields of Args, so a numeric flag added without a rule here stops every run (KeyError) until it has one.
RULES = {
    "positive": (lambda x: x > 0, ["num_envs", "total_timesteps", "buffer_size", "batch_size", "learning_rate",
                                   "max_grad_norm", "alpha", "flow_hidden", "shift_hidden", "obs_clip",
                                   "eval_frequency", "eval_episodes", "log_frequency", "max_nonfinite_updates"]),
    "non-negative": (lambda x: x >= 0, ["learning_starts", "checkpoint_frequency"]),
    "in (0, 1]": (lambda x: 0 < x <= 1, ["tau"]),
    "in [0, 1]": (lambda x: 0 <= x <= 1, ["gamma"]),
    "in [0, 2**32 - 1]": (lambda x: 0 <= x < 2**32, ["seed"]),  # numpy's and Gymnasium's seed range
    "a device id or -1 (none)": (lambda x: x >= -1, ["graphics_device_id"]),  # Isaac Gym's convention
    "finite": (lambda x: True, ["sigma_min", "sigma_max"]),  # any finite value; their order is checked below
}
RULE_OF = {name: rule for rule, (_, names) in RULES.items() for name in names}


def check_args(args: Args):
    for field in fields(Args):
        if field.type not in (int, float):
            continue
        value, rule = getattr(args, field.name), RULE_OF[field.name]
        # a float must first be finite (NaN compares false with everything: `x > 0` alone lets it through),
        # and finite in float32, the precision of the tensors it meets (a clip at 1e39 cannot be applied)
        if field.type is float and not (math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max):
            fail(f"--{field.name.replace('_', '-')} must be a finite float32 number (|x| <= 3.4e38), got {value}")
        if not RULES[rule][0](value):
            fail(f"--{field.name.replace('_', '-')} must be {rule}, got {value}")
    if args.sigma_min >= args.sigma_max:
        fail(f"--sigma-min ({args.sigma_min}) must be smaller than --sigma-max ({args.sigma_max})")
    if args.batch_size > args.buffer_size * args.num_envs:
        fail(f"--batch-size ({args.batch_size}) cannot exceed the replay capacity "
             f"(--buffer-size {args.buffer_size} x --num-envs {args.num_envs})")
    if args.total_timesteps < args.num_envs:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one vector step (--num-envs {args.num_envs})")


# ---------------------------------------------------------------------------------------------
# Environments: two thin adapters with one batched-tensor contract, so the training loop is the
# same for both. step(actions (N, d) in [-1, 1]) returns, as tensors on the device that the caller
# owns (copies: nothing aliases a buffer the simulator overwrites in the next step):
#   next_obs (N, obs_dim)   the observation to act on next (a new episode's first one after a reset)
#   real_next_obs           the true successor s' of this transition (the final observation at an end)
#   rewards (N,), terminated (N,) (cuts the bootstrap), truncated (N,) (time-out: bootstraps)
#   valid (N,)              0 for a transition that spans two episodes (never learned from)
# reset(seed) starts fresh episodes in every env and returns the observation to act on; it is only
# fed to the policy, never to the normaliser (Isaac Gym's is a stale buffer of zeros).
# Episodes: an episode is every step from the one after an end (or after reset()) to the next end
# (terminated or truncated); its return is the sum of all their rewards, `valid` or not.
# one_per_process: the simulator allows one instance per process (Isaac Gym, Isaac Lab), so
# evaluation must run on the training envs; otherwise it gets fresh envs of its own.
# ---------------------------------------------------------------------------------------------
class GymnasiumVecEnv:
    """Any Gymnasium continuous-control task as a synchronous vector env (CPU)."""

    one_per_process = False

    def __init__(self, env_id, num_envs, seed, device):
        try:
            probe = gym.make(env_id)  # unknown ids fail here, before the vector env is built
        except gym.error.Error as e:
            fail(f"cannot make environment {env_id!r}: {e}")
        space = probe.action_space
        probe.close()
        if not isinstance(space, gym.spaces.Box):
            fail(f"MEow needs a continuous (Box) action space; {env_id} has {space}")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            fail(f"{env_id} has an unbounded action space; MEow's tanh flow needs finite bounds")
        ones = np.ones(space.shape, dtype=space.dtype)
        # SAME_STEP autoreset: a finished env is reset inside step(); its final observation is in
        # info["final_obs"], so every transition stays inside one episode
        self.envs = gym.make_vec(env_id, num_envs, vectorization_mode="sync",
                                 vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                                 wrappers=[lambda e: gym.wrappers.RescaleAction(e, -ones, ones)])
        self.num_envs, self.seed, self.device = num_envs, seed, device
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = self.envs.single_action_space.shape[0]
        self.envs.action_space.seed(seed)

    def tensor(self, x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=self.device)

    def reset(self, seed=None):
        obs, _ = self.envs.reset(seed=seed)
        return self.tensor(obs)

    def random_actions(self):
        return self.tensor(self.envs.action_space.sample())

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.envs.step(actions.cpu().numpy())
        real_next_obs = obs.copy()
        if "_final_obs" in info:
            for i in np.flatnonzero(info["_final_obs"]):
                real_next_obs[i] = info["final_obs"][i]
        return (self.tensor(obs), self.tensor(real_next_obs), self.tensor(rewards), self.tensor(terminated),
                self.tensor(truncated), torch.ones(self.num_envs, device=self.device))

    def close(self):
        self.envs.close()


class IsaacGymVecEnv:
    """Isaac Gym Preview 4 through IsaacGymEnvs: the envs live on the GPU and reset themselves.

    From IsaacGymEnvs' tasks/base/vec_task.py: reset() computes nothing and returns the observation
    buffer (zeros before the first step), while reset_buf starts at ones, so the first step() resets
    every env. A finished env is reset during the *next* step (in post_physics_step: Ant, Humanoid,
    Anymal, FrankaCabinet; in pre_physics_step: AllegroHand, Ingenuity), so the observation returned
    with done is the true final one and the next transition spans the reset. step() returns the
    task's own rew_buf and reset_buf, which the following step overwrites in place.
    """

    one_per_process = True  # vec_task.py creates the simulation once per process (_create_sim_once)

    def __init__(self, task, num_envs, seed, args, device):
        if isaacgymenvs is None:
            fail("Isaac Gym is not installed: get Isaac Gym Preview 4 from NVIDIA, `pip install -e isaacgym/python` "
                 "and IsaacGymEnvs; or run any Gymnasium task with --backend gymnasium (works on a CPU)")
        # make()'s seed seeds nothing: the caller seeds torch before this (seed_everything)
        self.envs = isaacgymenvs.make(seed=seed, task=task, num_envs=num_envs, sim_device=args.sim_device,
                                      rl_device=str(device), graphics_device_id=args.graphics_device_id, headless=True)
        self.num_envs, self.device = num_envs, device
        self.obs_dim = self.envs.observation_space.shape[0]
        self.act_dim = self.envs.action_space.shape[0]
        # envs whose next transition spans a reset: every env after reset() (reset_buf starts at ones)
        self.prev_done = torch.ones(num_envs, dtype=torch.bool, device=device)

    def reset(self, seed=None):
        """Once, on the fresh task (VecTask.reset: "Is called only once when environment starts")."""
        self.prev_done.fill_(True)  # the first step resets every env: (zeros, a, r, s') is not a transition
        return self.envs.reset()["obs"].to(torch.float32, copy=True)

    def random_actions(self):
        return torch.rand(self.num_envs, self.act_dim, device=self.device) * 2 - 1

    def step(self, actions):
        obs_dict, rewards, dones, infos = self.envs.step(actions)
        obs = obs_dict["obs"].to(torch.float32, copy=True)
        rewards = rewards.to(torch.float32, copy=True)  # the task's rew_buf: copied before the next step
        dones = dones.to(torch.bool, copy=True)  # the task's reset_buf, likewise
        time_outs = infos["time_outs"].to(torch.bool, copy=True)
        valid = (~self.prev_done).float()
        self.prev_done = dones
        return obs, obs, rewards, (dones & ~time_outs).float(), time_outs.float(), valid

    def close(self):
        pass  # Isaac Gym tears its simulation down with the process


ISAACLAB_INSTALL = ('pip install "isaaclab[isaacsim]==2.3.2.post1" --extra-index-url https://pypi.nvidia.com '
                    "(Python 3.11, an NVIDIA GPU, a CUDA build of torch >= 2.7)")


class IsaacLabVecEnv:
    """Isaac Lab 2.3.2 (Isaac Sim 5.1): a manager-based or direct RL task on the GPU that resets finished
    envs inside step(). API as in the isaaclab 2.3.2.post1 wheel: isaaclab/app/app_launcher.py,
    isaaclab_tasks/utils/parse_cfg.py, isaaclab/envs/manager_based_rl_env.py and direct_rl_env.py."""

    one_per_process = True  # one SimulationApp per process (AppLauncher), so one simulation
    def __init__(self, task, num_envs, seed, args, device):
        try:  # the one Isaac Lab import allowed before the simulation app runs
            from isaaclab.app import AppLauncher
        except ImportError:
            fail(f"Isaac Lab is not installed: {ISAACLAB_INSTALL}; "
                 "or run any Gymnasium task with --backend gymnasium (works on a CPU)")
        try:
            self.app = AppLauncher(headless=True, device=args.sim_device).app
        except ValueError as e:  # a --sim-device that is not cpu, cuda or cuda:N
            fail(f"cannot launch Isaac Sim: {e}")
        self.envs = None
        # Isaac Lab's other modules and its task registry import only once the app runs
        import isaaclab_tasks  # noqa: F401  registers the Isaac-* task ids with gymnasium
        from isaaclab_tasks.utils import parse_env_cfg

        try:
            env_cfg = parse_env_cfg(task, device=args.sim_device, num_envs=num_envs)
        except (gym.error.Error, ValueError) as e:  # unknown id, or a gymnasium id that is no Isaac Lab task
            self.fail(f"cannot make Isaac Lab task {task!r}: {str(e).strip().splitlines()[0]}")
        env_cfg.seed = seed  # building the env seeds Python, NumPy, torch and Warp with it (configure_seed)
        # 2.3.2 never exposes the observation a finished env reached before its reset; later versions do,
        # in extras["final_obs"], when the opt-in compute_final_obs flag is set
        self.has_final_obs = hasattr(env_cfg, "compute_final_obs")
        if self.has_final_obs:
            env_cfg.compute_final_obs = True
        self.envs = gym.make(task, cfg=env_cfg)
        torch.backends.cudnn.deterministic = args.torch_deterministic  # configure_seed() set it to False
        unwrapped = self.envs.unwrapped
        obs_space, act_space = unwrapped.single_observation_space["policy"], unwrapped.single_action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            self.fail(f"MEow needs a flat 'policy' observation vector; {task} has {obs_space}")
        if not isinstance(act_space, gym.spaces.Box):
            self.fail(f"MEow needs a continuous (Box) action space; {task} has {act_space}")
        # The action space is unbounded: the flow's actions in [-1, 1] go to the task as they are, and the
        # task's own action term scales them (Isaac-Ant-v0: joint effort = 7.5 x action), as for the
        # rl_games agents, whose wrapper clamps actions to [-1, 1] (clip_actions: 1.0).
        # A finite-horizon task's time limit is part of the task (Isaac Lab's RL wrappers do not bootstrap it)
        self.time_limit_is_terminal = unwrapped.cfg.is_finite_horizon
        self.num_envs, self.device = num_envs, device
        self.obs_dim, self.act_dim = obs_space.shape[0], act_space.shape[0]

    def fail(self, message):
        """Bad input once the app runs: close the env and the app, then the one-line error."""
        self.close()
        fail(message)

    def policy_obs(self, obs):
        return obs["policy"].to(self.device, torch.float32, copy=True)  # (N, obs_dim)

    def reset(self, seed=None):
        # seeded when built (env_cfg.seed): reset(seed=...) would reseed Python, NumPy and torch globally and
        # overwrite the random state a resumed run has restored
        obs, _ = self.envs.reset()
        return self.policy_obs(obs)

    def random_actions(self):
        return torch.rand(self.num_envs, self.act_dim, device=self.device) * 2 - 1

    def step(self, actions):
        obs, rewards, terminated, truncated, extras = self.envs.step(actions)
        # terminated and truncated (and a manager-based task's rewards) are the env's own buffers, rewritten
        # in place by the next step: copy them. Both flags can be set; termination wins (no bootstrap)
        next_obs = self.policy_obs(obs)
        rewards = rewards.to(self.device, torch.float32, copy=True)
        terminated = terminated.to(self.device, torch.bool, copy=True)
        truncated = truncated.to(self.device, torch.bool, copy=True) & ~terminated
        if self.time_limit_is_terminal:
            terminated, truncated = terminated | truncated, torch.zeros_like(truncated)
        # A finished env was reset inside step(): next_obs holds its new episode's first observation
        done = (terminated | truncated)[:, None]
        final_obs = extras.get("final_obs") if self.has_final_obs else None  # set at a step with resets
        valid = torch.ones(self.num_envs, device=self.device)
        if final_obs is not None:
            real_next_obs = torch.where(done, self.policy_obs(final_obs), next_obs)
        else:
            # no true s' for a time-out: never learned from. A termination is safe: (1 - terminated) zeroes s'
            real_next_obs = next_obs
            valid = valid * ~truncated
        return next_obs, real_next_obs, rewards, terminated.float(), truncated.float(), valid

    def close(self):
        if self.envs is not None:
            self.envs.close()
        self.app.close()  # the simulation app goes last, as in Isaac Lab's own scripts


def make_env(args, device, num_envs=None, seed=None):
    num_envs, seed = num_envs or args.num_envs, args.seed if seed is None else seed
    if args.backend == "isaacgym":
        return IsaacGymVecEnv(args.env_id, num_envs, seed, args, device)
    if args.backend == "isaaclab":
        return IsaacLabVecEnv(args.env_id, num_envs, seed, args, device)
    return GymnasiumVecEnv(args.env_id, num_envs, seed, device)


# ---------------------------------------------------------------------------------------------
# Observation standardisation by running mean / variance (as the paper's Isaac runs), clip 5.
# ---------------------------------------------------------------------------------------------
class RunningMeanStd(nn.Module):
    """Chan et al.'s parallel update of mean and variance; buffers so checkpoints carry them."""

    def __init__(self, dim, clip=5.0, eps=1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def update(self, x):  # x (N, dim)
        x = x.double()
        b_mean, b_var, b_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        self.var.copy_((self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total)
        self.count.copy_(total)

    def forward(self, x):
        return ((x - self.mean.float()) / torch.sqrt(self.var.float() + self.eps)).clamp(-self.clip, self.clip)


# ---------------------------------------------------------------------------------------------
# The EBFlow policy (paper Sec. 3.1, Eqs. 6-9; published architecture in Appendix)
# ---------------------------------------------------------------------------------------------
EPS = torch.finfo(torch.float32).eps  # guard inside log(1 - a^2 + eps)


class Swish(nn.Module):
    """x * sigmoid(beta * x), one learnable beta per unit, initialised to 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def mlp(in_dim, hidden, out_dim, layer_norm=False, dropout=0.0, weight_init=None):
    """Two hidden layers of Linear -> [LayerNorm] -> Swish -> [Dropout], then a final Linear."""
    layers = []
    for d_in in [in_dim, hidden]:
        layers.append(nn.Linear(d_in, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(Swish(hidden))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear) and weight_init is not None:
            weight_init(layer.weight)  # biases keep PyTorch's default init
    return nn.Sequential(*layers)


class EBFlowPolicy(nn.Module):
    """pi(a|s) = exp((Q(s,a) - V(s)) / alpha), an energy-based normalizing flow.

    Density direction a -> u (computes Q):  atanh (non-linear), 4 additive couplings (volume
    preserving), u = y / sigma(s) (linear, its log-det depends on s only and forms Z(s) = V/alpha).
    Sampling direction u -> a (acting): the same layers inverted, in reverse order.
    """

    def __init__(self, obs_dim, act_dim, alpha, sigma_min, sigma_max, flow_hidden=64, shift_hidden=256):
        super().__init__()
        self.act_dim, self.alpha = act_dim, alpha
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        # masks m_1 = m_3 = [1,0,1,0,...], m_2 = m_4 = 1 - m_1; row k-1 holds m_k.   (4, d)
        m1 = (torch.arange(act_dim) % 2 == 0).float()
        self.register_buffer("masks", torch.stack([m1, 1 - m1, m1, 1 - m1]))
        # coupling translations t_k(m_k * y, s): orthogonal init, LayerNorm, dropout 0.1
        self.couplings = nn.ModuleList(
            [mlp(act_dim + obs_dim, flow_hidden, act_dim, True, 0.1, nn.init.orthogonal_) for _ in range(4)]
        )
        # h(s), the log-scale of the state-dependent linear layer; zero weights: sigma starts mid-range
        self.log_scale_net = mlp(obs_dim, flow_hidden, act_dim, weight_init=nn.init.zeros_)
        # b_1(s), b_2(s): the two learnable reward shifts (LRS + SCDQ); zero weights
        self.shift_nets = nn.ModuleList([mlp(obs_dim, shift_hidden, 1, weight_init=nn.init.zeros_) for _ in range(2)])
        # the couplings' dropout layers: the only layers that differ between train and eval mode
        self.dropout_layers = [m for m in self.couplings.modules() if isinstance(m, nn.Dropout)]

    def set_dropout(self, on: bool):
        """Dropout on (updates) or off (acting): for this network, what .train() / .eval() do, at a
        fraction of the cost. The loop switches twice per environment step: .eval() + .train() walk
        all 61 submodules, while only the 8 dropout layers differ between the modes."""
        for layer in self.dropout_layers:
            layer.training = on

    def log_sigma(self, obs):
        """log sigma(s), squashed into [sigma_min, sigma_max].   (B, d)"""
        h = self.log_scale_net(obs)
        return self.sigma_min + 0.5 * (self.sigma_max - self.sigma_min) * (torch.tanh(h) + 1)

    def shifts(self, obs):
        """[b_1(s), b_2(s)]: learnable reward shifting (paper Sec. 3.2).   (B, 2)"""
        return torch.cat([b(obs) for b in self.shift_nets], dim=1)

    def action_to_y(self, obs, actions):
        """Density direction, steps 1-3: clamp, y = atanh(a), inverse couplings k = 4..1.

        Returns y (B, d) and the non-linear log-det sum_j -log(1 - a_j^2 + eps) (B,).
        """
        a = actions.clamp(-1 + 1e-5, 1 - 1e-5)  # numerical guard only
        y = torch.atanh(a)
        logdet_tanh = -torch.log(1 - a * a + EPS).sum(dim=1)
        for k in reversed(range(4)):  # additive couplings: log|det| = 0
            m = self.masks[k]
            y = y - (1 - m) * self.couplings[k](torch.cat([m * y, obs], dim=1))
        return y, logdet_tanh

    def u_to_action(self, obs, u):
        """Sampling direction: y = sigma(s) u, couplings k = 1..4, a = tanh(y).   (B, d)"""
        y = torch.exp(self.log_sigma(obs)) * u
        for k in range(4):
            m = self.masks[k]
            y = y + (1 - m) * self.couplings[k](torch.cat([m * y, obs], dim=1))
        return torch.tanh(y)

    # ---- Soft Q and exact soft V (paper Eqs. 8-9, with LRS b_k added to both) ----------------
    def soft_q(self, obs, actions):
        """Q_k(s,a) = alpha * (-0.5 sum_j (y_j/sigma_j)^2 - sum_j log(1 - a_j^2 + eps) + b_k(s)).

        The base term -E(a|s) is computed once and shared by both shift heads (SCDQ).   (B, 2)
        """
        y, logdet_tanh = self.action_to_y(obs, actions)
        u = y * torch.exp(-self.log_sigma(obs))  # the linear layer u = y / sigma(s)
        neg_energy = -0.5 * (u * u).sum(dim=1) + logdet_tanh  # (B,)
        return self.alpha * (neg_energy.unsqueeze(1) + self.shifts(obs))

    def soft_v(self, obs):
        """V_k(s) = alpha * log Z(s) = alpha * (sum_j log sigma_j(s) + (d/2) log 2pi + b_k(s)).

        Exact and closed form: only the linear layer and the shifts enter, no coupling. (B, 2)
        """
        log_z = self.log_sigma(obs).sum(dim=1) + 0.5 * self.act_dim * math.log(2 * math.pi)  # (B,)
        return self.alpha * (log_z.unsqueeze(1) + self.shifts(obs))

    def log_prob(self, obs, actions):
        """log pi(a|s) = log N(u; 0, I) + log-dets (change of variables).   (B,)"""
        log_sigma = self.log_sigma(obs)
        y, logdet_tanh = self.action_to_y(obs, actions)
        u = y * torch.exp(-log_sigma)
        log_normal = -0.5 * (u * u).sum(dim=1) - 0.5 * self.act_dim * math.log(2 * math.pi)
        return log_normal + logdet_tanh - log_sigma.sum(dim=1)

    # ---- Acting -----------------------------------------------------------------------------
    def sample(self, obs):
        """Stochastic action: u ~ N(0, I) pushed through the flow (exact sample of pi)."""
        return self.u_to_action(obs, torch.randn(obs.shape[0], self.act_dim, device=obs.device))

    def deterministic_action(self, obs):
        """Deterministic action (paper Sec. 3.3): the image of u = 0, used for evaluation."""
        return self.u_to_action(obs, torch.zeros(obs.shape[0], self.act_dim, device=obs.device))


# ---------------------------------------------------------------------------------------------
# Soft Bellman loss with shifting-based clipped double Q (paper Sec. 3.2, Eqs. 10-12)
# ---------------------------------------------------------------------------------------------
def soft_bellman_loss(flow, target_flow, obs, actions, rewards, next_obs, terminated, valid, gamma):
    """L = 0.5 * sum_k mean (Q_k(s,a) - y)^2,  y = r + gamma (1 - terminated) min_k Vbar_k(s').

    The mean runs over valid transitions only (Isaac Gym's transition across a reset has valid = 0).
    """
    with torch.no_grad():
        next_v = target_flow.soft_v(next_obs)  # exact V from the target network   (B, 2)
        target = rewards + gamma * (1.0 - terminated) * next_v.min(dim=1).values  # SCDQ   (B,)
    q = flow.soft_q(obs, actions)  # (B, 2)
    w = valid / valid.sum().clamp(min=1.0)  # (B,) weights of a mean over the valid transitions
    loss = 0.5 * (w * (q[:, 0] - target) ** 2).sum() + 0.5 * (w * (q[:, 1] - target) ** 2).sum()
    return loss, q.detach()


def compile_fn(fn, device):
    """torch.compile for --compile. On a GPU, mode="reduce-overhead": CUDA graphs.
    On a CPU, the random numbers inside compiled code (dropout masks, the acting noise u) come from
    ATen, as in eager mode, not from inductor's own generator: a --compile run then draws the same
    masks and noise as an eager run with the same seed, and ATen's generator is the faster one on a
    CPU (docs/speed.md). Left as it is on GPUs, where it has not been measured."""
    if device.type == "cpu":
        # imported under its own name: `import torch._inductor.config` would make `torch` a local
        # name of this whole function, unbound on the CUDA path below
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)


def make_update(flow, target_flow, args, compile=False):
    """One MEow update (paper Algorithm 1): a soft Bellman regression step, then Polyak averaging.

    Returns update(data) -> (loss, Q (B, 2), grad norm), the optimizer, and a device counter of
    skipped (non-finite) updates. Every tensor stays on the device: no host sync per update.
    """
    params = list(flow.parameters())
    # one Adam over all parameters; fused: a single kernel per step, and it can skip a step on device
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, fused=True)
    # V needs only the linear layer h(s) and the shifts b_k(s), so those are all the target is read
    # for: Polyak averaging updates only them (the target's coupling layers are never used).
    online_v = list(flow.log_scale_net.parameters()) + list(flow.shift_nets.parameters())
    target_v = list(target_flow.log_scale_net.parameters()) + list(target_flow.shift_nets.parameters())
    device = params[0].device
    loss_fn = compile_fn(soft_bellman_loss, device) if compile else soft_bellman_loss
    nonfinite_updates = torch.zeros((), device=device)

    def update(data):
        loss, q = loss_fn(flow, target_flow, *data, args.gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
        # A non-finite loss or gradient is never zeroed: fused Adam skips the whole step
        # (parameters and moments untouched) when `found_inf` is 1; we count the skips.
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
        nonfinite_updates.add_(optimizer.found_inf)
        with torch.no_grad():  # Polyak averaging: target <- target + tau (online - target), fused
            torch._foreach_lerp_(target_v, online_v, args.tau)
        return loss, q, grad_norm

    return update, optimizer, nonfinite_updates


# ---------------------------------------------------------------------------------------------
# Replay buffer: preallocated device tensors, N transitions per vector step, a ring of `capacity`
# vector steps. Observations are stored raw and standardised when sampled (current statistics).
# ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    FIELDS = ["obs", "next_obs", "actions", "rewards", "terminated", "valid"]

    def __init__(self, capacity, num_envs, obs_dim, act_dim, device):
        self.capacity, self.num_envs, self.pos, self.size, self.device = capacity, num_envs, 0, 0, device
        self.obs = torch.zeros(capacity, num_envs, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, num_envs, obs_dim, device=device)  # true s', also at time-outs
        self.actions = torch.zeros(capacity, num_envs, act_dim, device=device)
        self.rewards = torch.zeros(capacity, num_envs, device=device)
        self.terminated = torch.zeros(capacity, num_envs, device=device)
        self.valid = torch.zeros(capacity, num_envs, device=device)

    def add(self, obs, next_obs, actions, rewards, terminated, valid):
        for key, value in zip(self.FIELDS, [obs, next_obs, actions, rewards, terminated, valid]):
            getattr(self, key)[self.pos].copy_(value)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size):
        idx = torch.randint(0, self.size * self.num_envs, (batch_size,), device=self.device)  # never leaves the device
        return [getattr(self, key).flatten(0, 1)[idx] for key in self.FIELDS]

    def state_dict(self):
        """Compact: float32 and only the filled part (a copy, not a view of the whole storage)."""
        state = {"pos": self.pos, "size": self.size}
        for key in self.FIELDS:
            state[key] = getattr(self, key)[: self.size].to("cpu", copy=True)
        return state

    def load_state_dict(self, state):
        n, pos = state["size"], state["pos"]
        if n > self.capacity or state["obs"].shape[1] != self.num_envs:
            raise ValueError(f"checkpoint buffer of {n} x {state['obs'].shape[1]} transitions does not fit "
                             f"--buffer-size {self.capacity} x --num-envs {self.num_envs}")
        if not (0 <= pos < self.capacity and 0 <= n and (pos == n or n == self.capacity)):
            raise ValueError(f"checkpoint buffer position {pos} and size {n} are no state of a ring of {self.capacity}")
        for key in self.FIELDS:
            if state[key].shape != getattr(self, key)[:n].shape:  # exactly: a narrower tensor would broadcast
                raise ValueError(f"checkpoint buffer {key} has shape {tuple(state[key].shape)}, "
                                 f"this run's is {tuple(getattr(self, key)[:n].shape)}")
            getattr(self, key)[:n] = state[key].to(self.device)
        self.pos, self.size = pos, n


# ---------------------------------------------------------------------------------------------
# Bookkeeping: checkpoints (atomic, data only), evaluation. Safe to skip on a first read.
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "meow-ebflow-isaacgym/1"
ARCH_KEYS = ["sigma_min", "sigma_max", "flow_hidden", "shift_hidden"]
# arguments a resumed run may change; every other one must equal the checkpoint's
RESUME_MAY_CHANGE = {"total_timesteps", "resume", "checkpoint_frequency", "track", "wandb_project_name",
                     "wandb_entity", "save_model", "cuda", "compile", "log_frequency", "eval_checkpoint",
                     "exp_name", "max_nonfinite_updates", "sim_device", "graphics_device_id"}


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill at any moment leaves the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lock_run(run_dir):
    """Hold an exclusive lock on `run_dir` (its train.lock file) while this process trains the run. Two
    processes resuming one run (a sweep started again while its first training process still runs,
    --resume typed twice) would otherwise both write its checkpoint and its logs. The kernel releases
    the lock when the process ends, however it ends (kill -9 too), so a killed run resumes as before.
    Returns the open lock file: closing it releases the lock."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, "train.lock"), "a+")
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows has no flock: runs there are not guarded
        return lock
    except BlockingIOError:  # another process holds it
        lock.seek(0)
        holder = lock.read().strip()[:100] or "it has not written its pid yet"
        fail(f"{run_dir} is being trained by another process ({holder}): stop that process, or wait for it")
    except OSError as e:  # a file system without locks (some NFS, Lustre without -o flock): run unguarded
        print(f"note: cannot lock {run_dir} ({e.strerror}): nothing stops a second process from training it")
        return lock
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {platform.node()}\n")
    lock.flush()
    return lock


# a training checkpoint's train_state: each entry and its type (float: any real number; the large
# entries are dicts here, and their contents are checked when --resume loads them)
TRAIN_STATE_TYPES = {"args": dict, "run_name": str, "global_step": int, "best_eval": float, "last_eval": float,
                     "nonfinite_updates": float, "target_model": dict, "optimizer": dict, "buffer": dict,
                     "rng": dict}


def train_state_problem(ts):
    """What is wrong with a checkpoint's train_state, or None. A forged or damaged one must fail in one
    line before anything is written, and its run name must not lead out of runs/."""
    if not isinstance(ts, dict):
        return f"train_state is a {type(ts).__name__}, not a dict"
    for key, kind in TRAIN_STATE_TYPES.items():
        value = ts.get(key)
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok:
            return f"train_state[{key!r}] is {'missing' if key not in ts else type(value).__name__ + ', not ' + kind.__name__}"
    if ts["global_step"] < 0:
        return f"train_state['global_step'] is {ts['global_step']}"
    if os.path.basename(ts["run_name"]) != ts["run_name"] or ts["run_name"] in ("", ".", ".."):
        return f"train_state['run_name'] {ts['run_name'][:80]!r} is not a plain directory name"
    return None


def load_checkpoint(path, training=False):
    """Load a saved model, or (training=True) a training checkpoint: a file, or a run directory holding
    checkpoint.pt. A training checkpoint holds the model too, so --eval-checkpoint takes either, or a run
    directory holding exactly one of them (checkpoint.pt, *.cleanrl_model).
    Any other file stops the run here in one line that names it, before anything is written.

    Checkpoints are data, never code: weights_only=True refuses any pickle that would run code. Other
    bytes (text, random, a zip that is not torch's, a truncated write) make torch.load raise whatever
    its parser meets first (UnpicklingError, IndexError, EOFError, RuntimeError, ...): all are caught.
    """
    if training and os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    elif os.path.isdir(path):  # --eval-checkpoint of a run directory: its one model file, if it has just one
        found = sorted(f for f in os.listdir(path) if f == "checkpoint.pt" or f.endswith(".cleanrl_model"))
        if len(found) != 1:
            holds = f"several checkpoints ({', '.join(found)})" if found else "no checkpoint"
            fail(f"{path} is a directory holding {holds}: name the file to evaluate")
        path = os.path.join(path, found[0])
    if not os.path.exists(path):
        fail(f"no such checkpoint: {path}")
    if os.path.getsize(path) == 0:
        fail(f"{path} is an empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsupported = re.search(r"Unsupported (\w+)[^\n]*?(?=\. |\n|$)", str(e))  # weights_only's refusals
        if unsupported and unsupported[1] == "global":
            fail(f"refusing to load {path}: it would import code ({unsupported[0][:150]}); a checkpoint is plain data")
        # the reason: weights_only's refusal, else the first sentence of the parser's error
        first_sentence = re.split(r"(?<=[a-z])\. |\n", str(e))[0]
        why = unsupported[0] if unsupported else f"{type(e).__name__}: {first_sentence}"
        fail(f"refusing to load {path}: not a readable torch checkpoint file ({why[:150]})")
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        fail(f"{path} is not a checkpoint of {os.path.basename(__file__)}: it holds a {type(ckpt).__name__} "
             "without a 'format' entry")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of {os.path.basename(__file__)}: its format is {repr(ckpt['format'])[:80]}, "
             f"this script reads {CHECKPOINT_FORMAT!r}")
    if training and "train_state" not in ckpt:
        fail(f"{path} is a saved model, not a training checkpoint (use --eval-checkpoint to evaluate it)")
    try:  # the policy and normaliser must build from it: a damaged or forged file fails here, not later
        flow = EBFlowPolicy(ckpt["obs_dim"], ckpt["act_dim"], ckpt["alpha"], **ckpt["arch"])
        flow.load_state_dict(ckpt["model"])
        RunningMeanStd(ckpt["obs_dim"], ckpt["obs_clip"]).load_state_dict(ckpt["obs_normalizer"])
    except Exception as e:
        fail(f"{path} does not hold a usable model ({type(e).__name__}: {' '.join(str(e).split())[:220]})")
    problem = train_state_problem(ckpt["train_state"]) if training else None
    if problem:
        fail(f"{path} holds a damaged training state: {problem}")
    return ckpt


def model_checkpoint(flow, normalizer, args, obs_dim, act_dim, step):
    return {"format": CHECKPOINT_FORMAT, "backend": args.backend, "env_id": args.env_id, "obs_dim": obs_dim,
            "act_dim": act_dim, "alpha": args.alpha, "arch": {k: getattr(args, k) for k in ARCH_KEYS},
            "obs_clip": args.obs_clip, "global_step": step, "model": flow.state_dict(),
            "obs_normalizer": normalizer.state_dict()}


EVAL_RULE = ("deterministic actions (u = 0); in env i, episode j (j = 0, 1, ...; only episodes that begin "
             "during the evaluation, after a reset or after an episode end) counts if j * num_envs + i < "
             "eval_episodes: with eval_episodes <= num_envs, one complete episode from each of the first "
             "eval_episodes envs")


def evaluate(flow, normalizer, env, episodes, obs=None, seed=0, max_steps=100_000):
    """Mean deterministic return over exactly `episodes` complete episodes chosen by EVAL_RULE.

    Which episodes count is fixed before any of them is played (by env index and order), so short
    episodes are not favoured over long ones, as "the first K episodes to finish" would do.
    obs=None: reset the envs (with `seed`); every env starts an episode at once. Otherwise `obs` is the
    current observation of envs in mid-episode (Isaac Gym's training envs, which cannot be reset at
    will): the episodes in progress are played to their end and not counted.
    Returns the mean return, the number of episodes counted (fewer only if max_steps ran out) and the
    last observation.
    """
    was_training = flow.training
    flow.eval()
    started = torch.full((env.num_envs,), obs is None, dtype=torch.bool)  # env is in an episode begun here
    if obs is None:
        obs = env.reset(seed=seed)
    started = started.to(obs.device)
    env_index = torch.arange(env.num_envs, device=obs.device)
    to_count = ((episodes - 1 - env_index) // env.num_envs + 1).clamp(min=0)  # #{j >= 0: j * N + i < episodes}
    ep_return = torch.zeros(env.num_envs, device=obs.device)
    returns = []
    for _ in range(max_steps):
        if to_count.sum() == 0:
            break
        with torch.inference_mode():
            action = flow.deterministic_action(normalizer(obs))
        obs, _, rewards, terminated, truncated, _ = env.step(action)
        ep_return += rewards
        done = (terminated + truncated) > 0
        counted = done & started & (to_count > 0)
        returns += ep_return[counted].tolist()
        to_count -= counted.long()
        started |= done  # the step after an end begins the env's next episode
        ep_return[done] = 0.0
    flow.train(was_training)
    return float(np.mean(returns)) if returns else float("nan"), len(returns), obs


def seed_everything(seed, torch_deterministic=True):
    """Seed Python, numpy and torch before any env is built: isaacgymenvs.make(seed=) seeds nothing
    (IsaacGymEnvs' own train.py calls set_seed first), and its tasks draw reset noise from torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state():
    """Python, numpy and torch RNG states as plain data (the vector envs' own RNGs are not saved)."""
    return {"python": random.getstate(), "numpy": {"state": np.random.get_state()[1].tolist(),
            "rest": list(np.random.get_state()[2:])}, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"]["state"], dtype=np.uint32), *state["numpy"]["rest"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    # nothing renders: `import mujoco` then loads no OpenGL library (a missing one would make it fail,
    # e.g. MUJOCO_GL=osmesa without libosmesa6)
    os.environ["MUJOCO_GL"] = "disable"
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # ---- Reload a saved model and evaluate it (no training) --------------------------------
    if args.eval_checkpoint is not None:
        ckpt = load_checkpoint(args.eval_checkpoint)
        args.backend, args.env_id = ckpt["backend"], ckpt["env_id"]
        seed_everything(args.seed, args.torch_deterministic)
        env = make_env(args, device, num_envs=args.eval_episodes)  # fresh envs: one episode from each
        flow = EBFlowPolicy(ckpt["obs_dim"], ckpt["act_dim"], ckpt["alpha"], **ckpt["arch"]).to(device)
        normalizer = RunningMeanStd(ckpt["obs_dim"], ckpt["obs_clip"]).to(device)
        flow.load_state_dict(ckpt["model"])
        normalizer.load_state_dict(ckpt["obs_normalizer"])
        mean_return, counted, _ = evaluate(flow, normalizer, env, args.eval_episodes, seed=args.seed)
        env.close()
        print(f"{args.env_id}: deterministic return {mean_return:.1f} over {counted} episodes "
              f"(checkpoint step {ckpt['global_step']}; {EVAL_RULE})")
        sys.exit(0)

    if args.backend == "isaacgym" and isaacgymenvs is None:
        make_env(args, device)  # the one-line "Isaac Gym is not installed" error, before anything else

    # ---- Resume: take the run's name and training state from its checkpoint -----------------
    resume_ckpt = None
    if args.resume is not None:
        resume_ckpt = load_checkpoint(args.resume, training=True)
        saved = resume_ckpt["train_state"]["args"]
        mismatched = [k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != getattr(args, k, None)]
        if mismatched:
            fail("cannot resume: arguments differ from the checkpoint's: "
                 + ", ".join(f"--{k.replace('_', '-')} {saved[k]} (got {getattr(args, k, None)})" for k in mismatched))
        if resume_ckpt["train_state"]["global_step"] >= args.total_timesteps:
            fail(f"checkpoint is at step {resume_ckpt['train_state']['global_step']}, "
                 f"not below --total-timesteps {args.total_timesteps}")

    # ---- Seeding ------------------------------------------------------------------------------
    seed_everything(args.seed, args.torch_deterministic)

    # ---- Environments (validated before anything is written) -------------------------------
    env = make_env(args, device)
    # one simulation per process (Isaac Gym, Isaac Lab): evaluate on the training envs; otherwise on fresh envs
    eval_env = env if env.one_per_process else make_env(args, device, num_envs=args.eval_episodes)
    N, obs_dim, act_dim = env.num_envs, env.obs_dim, env.act_dim
    if resume_ckpt is not None:
        run_name = resume_ckpt["train_state"]["run_name"]
    else:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # ---- Networks: one EBFlow is policy and critic; a target copy gives Vbar ---------------
    try:  # sizes the machine cannot hold are bad input too: one line, before anything is written
        flow = EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min, args.sigma_max,
                            args.flow_hidden, args.shift_hidden).to(device)
        target_flow = EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min, args.sigma_max,
                                   args.flow_hidden, args.shift_hidden).to(device)
        target_flow.load_state_dict(flow.state_dict())
        target_flow.eval()  # the target runs in eval mode (no dropout)
        normalizer = RunningMeanStd(obs_dim, args.obs_clip).to(device)
        rb = ReplayBuffer(args.buffer_size, N, obs_dim, act_dim, device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        fail(f"cannot allocate the networks and the replay buffer on {device} "
             f"(--buffer-size {args.buffer_size}, --flow-hidden {args.flow_hidden}, "
             f"--shift-hidden {args.shift_hidden}): "
             f"{str(e).strip().splitlines()[0]}")
    update, optimizer, nonfinite_updates = make_update(flow, target_flow, args, compile=args.compile)
    # acting: a ~ pi(.|s); --compile fuses it (CUDA graphs on GPU)
    act_fn = compile_fn(flow.sample, device) if args.compile else flow.sample

    # ---- Counters, restored on resume -------------------------------------------------------
    start_iter, best_eval, last_eval = 0, -math.inf, float("nan")
    if resume_ckpt is not None:
        ts = resume_ckpt["train_state"]
        try:
            flow.load_state_dict(resume_ckpt["model"])
            normalizer.load_state_dict(resume_ckpt["obs_normalizer"])
            target_flow.load_state_dict(ts["target_model"])
            optimizer.load_state_dict(ts["optimizer"])
            rb.load_state_dict(ts["buffer"])
            start_iter, best_eval, last_eval = ts["global_step"] // N, ts["best_eval"], ts["last_eval"]
            nonfinite_updates.fill_(ts["nonfinite_updates"])
            set_rng_state(ts["rng"])
        except Exception as e:  # a damaged or forged entry: whatever torch or numpy raises, one line
            fail(f"checkpoint does not fit this run ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        print(f"resumed {run_name} at step {ts['global_step']} (buffer {rb.size} x {N} transitions); "
              "the environments start fresh episodes")

    # ---- Logging: only now is anything written ---------------------------------------------
    run_dir = f"runs/{run_name}"
    run_lock = lock_run(run_dir)  # one training process per run directory, until this one ends
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, id=run_name, resume="allow")
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events a killed run logged after its last checkpoint: no duplicated steps
    writer = SummaryWriter(run_dir, purge_step=start_iter * N if resume_ckpt is not None else None)
    if resume_ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n"
                        + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    # at every start, resumes too: a run continued elsewhere may run on other versions
    versions = library_versions()
    print(f"versions: {versions}", flush=True)
    writer.add_text("versions", versions, start_iter * N)

    def write_checkpoint(step):
        ckpt = model_checkpoint(flow, normalizer, args, obs_dim, act_dim, step)
        ckpt["train_state"] = {
            "args": asdict(args), "run_name": run_name, "global_step": step,
            "target_model": target_flow.state_dict(), "optimizer": optimizer.state_dict(),
            "buffer": rb.state_dict(), "best_eval": best_eval, "last_eval": last_eval,
            "nonfinite_updates": float(nonfinite_updates), "rng": rng_state()}
        save_atomic(ckpt, f"{run_dir}/checkpoint.pt")

    # ---- Training loop: one iteration = one vector step (N transitions) + one gradient step ----
    num_iterations = args.total_timesteps // N
    # the normaliser sees every observation step() returns, never reset()'s (Isaac Gym: stale zeros)
    obs = env.reset(seed=args.seed if resume_ckpt is None else args.seed + start_iter)
    print(f"evaluation: {args.eval_episodes} episodes, {EVAL_RULE}", flush=True)
    writer.add_text("evaluation", f"{args.eval_episodes} episodes, {EVAL_RULE}")
    # episode statistics, kept on the device for all envs; read at the logging interval only
    ep_return, ep_length = torch.zeros(N, device=device), torch.zeros(N, device=device)
    # the env's current episode was played by the training policy from its first step: only those are
    # logged (after an evaluation on the training envs, the episodes in progress are not)
    ep_whole = torch.ones(N, dtype=torch.bool, device=device)
    finished = torch.zeros(3, device=device)  # sum of returns, sum of lengths, count of finished episodes
    last_return, start_time = float("nan"), time.time()
    skipped, updates_unread = int(nonfinite_updates), 0  # the counter as last read, updates since
    log_time = start_time  # time of the last progress line: the time left uses the recent rate
    for iteration in range(start_iter, num_iterations):
        global_step = (iteration + 1) * N  # transitions collected so far, over all envs

        # ALGO LOGIC: act. Uniform random actions for the first learning_starts vector steps
        if iteration < args.learning_starts:
            actions = env.random_actions()
        else:
            flow.set_dropout(False)  # acting: no dropout, as in eval mode
            # no_grad rather than inference_mode: CUDA-graph trees have a known failure when the same
            # parameters are first captured under inference_mode, then trained (pytorch/pytorch#135892)
            with torch.no_grad():
                actions = act_fn(normalizer(obs))
            flow.set_dropout(True)

        next_obs, real_next_obs, rewards, terminated, truncated, valid = env.step(actions)
        # Terminations cut the bootstrap, time-outs do not: real_next_obs is the true s' in both cases
        rb.add(obs, real_next_obs, actions, rewards, terminated, valid)
        normalizer.update(next_obs)
        obs = next_obs

        done = (terminated + truncated) > 0  # bookkeeping: finished episodes, on the device
        ep_return += rewards  # every reward of the episode, also the first one after a reset (valid = 0)
        ep_length += 1
        logged = done & ep_whole
        finished += torch.stack([(ep_return * logged).sum(), (ep_length * logged).sum(), logged.sum()])
        ep_whole |= done
        ep_return *= ~done
        ep_length *= ~done

        # ALGO LOGIC: training. One soft Bellman regression step per vector step
        if iteration >= args.learning_starts:
            b_obs, b_next_obs, b_actions, b_rewards, b_terminated, b_valid = rb.sample(args.batch_size)
            loss, q, grad_norm = update((normalizer(b_obs), b_actions, b_rewards, normalizer(b_next_obs),
                                         b_terminated, b_valid))
            updates_unread += 1
            # Stop at the very update that makes --max-nonfinite-updates skipped ones. The device counter
            # grows by at most 1 per update, and reading it is a host sync on a GPU: it is read only once
            # it could have reached the limit, (limit - value last read) updates after the last read.
            if skipped + updates_unread >= args.max_nonfinite_updates:
                skipped, updates_unread = int(nonfinite_updates), 0
                if skipped >= args.max_nonfinite_updates:
                    writer.add_scalar("losses/nonfinite_updates", skipped, global_step)
                    writer.close()
                    run_lock.close()
                    fail(f"{skipped} updates had a non-finite loss or gradient (each skipped); stopping at "
                         f"step {global_step}. Try a smaller --learning-rate or --alpha.")

        # Bookkeeping: logging (the only host syncs, with the non-finite check above), evaluation, checkpoints
        if (iteration + 1) % args.log_frequency == 0:
            stats = finished.tolist()
            if stats[2] > 0:
                last_return = stats[0] / stats[2]
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", stats[1] / stats[2], global_step)
            finished.zero_()
            sps = (iteration + 1 - start_iter) * N / (time.time() - start_time)
            writer.add_scalar("charts/SPS", int(sps), global_step)
            if iteration >= args.learning_starts:
                skipped, updates_unread = int(nonfinite_updates), 0
                writer.add_scalar("losses/qf_loss", loss.item(), global_step)
                writer.add_scalar("losses/qf1_values", q[:, 0].mean().item(), global_step)
                writer.add_scalar("losses/qf2_values", q[:, 1].mean().item(), global_step)
                writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
                writer.add_scalar("losses/nonfinite_updates", skipped, global_step)
            # the recent rate, not the average: random steps before learning_starts are far faster
            now = time.time()
            eta = (num_iterations - iteration - 1) * (now - log_time) / args.log_frequency
            log_time = now
            print(f"step {global_step}/{num_iterations * N} | SPS {sps:.0f} | "
                  f"left {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m | episodic_return {last_return:.1f} | "
                  f"eval {last_eval:.1f}", flush=True)
        if global_step // args.eval_frequency > (global_step - N) // args.eval_frequency or iteration + 1 == num_iterations:
            last_eval, counted, eval_obs = evaluate(flow, normalizer, eval_env, args.eval_episodes,
                                                    obs=obs if eval_env is env else None)
            if eval_env is env:  # Isaac Gym, Isaac Lab: continue training from where evaluation left the envs,
                obs = eval_obs  # whose episodes in progress were partly played by the evaluation
                ep_whole.fill_(False)
            print(f"eval at step {global_step}: deterministic return {last_eval:.1f} over {counted} episodes",
                  flush=True)
            writer.add_scalar("eval/return", last_eval, global_step)
            if args.save_model and last_eval > best_eval:
                save_atomic(model_checkpoint(flow, normalizer, args, obs_dim, act_dim, global_step),
                            f"{run_dir}/{args.exp_name}_best.cleanrl_model")
            best_eval = max(best_eval, last_eval)
        if args.checkpoint_frequency > 0 and (
                global_step // args.checkpoint_frequency > (global_step - N) // args.checkpoint_frequency
                or iteration + 1 == num_iterations):
            write_checkpoint(global_step)  # also at the end: resume with a larger --total-timesteps

    if args.save_model:
        path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        save_atomic(model_checkpoint(flow, normalizer, args, obs_dim, act_dim, num_iterations * N), path)
        print(f"model saved to {path}; evaluate it with --eval-checkpoint {path}")
    writer.close()
    run_lock.close()  # another process may resume the run from here on
    env.close()  # Isaac Lab: closes the simulation app, the last thing a run does
    if eval_env is not env:
        eval_env.close()
