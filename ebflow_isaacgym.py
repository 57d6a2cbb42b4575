# MEow on vectorized simulators: Chao et al., NeurIPS 2024 (paper: https://arxiv.org/abs/2405.13629)
# The EBFlow policy and soft Bellman loss of ebflow_continuous_action.py (duplicated on purpose:
# each script stands alone), vectorized: N envs step at once, every tensor lives on the device, the
# buffer holds N transitions per vector step, observations are standardised, and one gradient step
# follows each vector step. Backends: isaacgym (Isaac Gym Preview 4), isaaclab (Isaac Lab 3.0),
# playground (MuJoCo Playground, on JAX), gymnasium (any Gymnasium task as a vector env, on a CPU).
import importlib.util
import math
import os
import platform
import random
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

fcntl = importlib.import_module("fcntl") if os.name == "posix" else None  # run lock; not on Windows

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be enabled by default (when available)
    track: bool = False  # if toggled, track the run with Weights and Biases (pip install wandb)
    wandb_project_name: str = "cleanRL"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project
    save_model: bool = False  # if toggled, save the final and the best-eval models
    eval_checkpoint: Optional[str] = None  # evaluate this saved model or checkpoint, then exit
    checkpoint_frequency: int = 0  # save the training state every N transitions (0: never)
    resume: Optional[str] = None  # resume from a checkpoint file or its run directory
    compile: bool = False  # if toggled, torch.compile the update and acting (CUDA graphs on GPU)
    log_frequency: int = 100  # log and print progress every N vector steps

    # Environment
    backend: Literal["isaacgym", "isaaclab", "playground", "gymnasium"] = "isaacgym"  # simulator
    env_id: str = "Ant"  # task: Ant (Isaac Gym), Isaac-Ant, CartpoleSwingup (Playground), Ant-v4
    num_envs: int = 128  # the number of parallel environments
    sim_device: str = "cuda:0"  # the simulation device of Isaac Gym or Isaac Lab
    physics: Literal["newton", "physx"] = "newton"  # Isaac Lab: newton (kit-less) or physx (Kit)

    # Algorithm specific arguments (defaults: the paper's Isaac Gym Ant settings)
    total_timesteps: int = 128_000_000  # total transitions over all envs (paper: 1M x 128 envs)
    buffer_size: int = 15_000  # the replay capacity in vector steps (x num_envs transitions)
    gamma: float = 0.99  # the discount factor gamma
    tau: float = 0.0005  # target smoothing coefficient (Polyak averaging rate)
    batch_size: int = 1024  # the batch size of one gradient step (paper: 131072 / num_envs)
    learning_starts: int = 100  # vector steps of uniform random actions before learning starts
    learning_rate: float = 1e-3  # the learning rate of the single Adam optimizer
    max_grad_norm: float = 30.0  # the maximum norm for gradient clipping
    alpha: float = 0.075  # entropy temperature (fixed per task, as in the paper)
    sigma_max: float = 2.0  # upper bound of the log-std of the state-dependent scale sigma(s)
    sigma_min: float = -5.0  # lower bound of the log-std of the state-dependent scale sigma(s)
    flow_hidden: int = 64  # hidden width of the couplings t_k and the log-scale net h(s)
    shift_hidden: int = 256  # hidden width of the reward-shift networks b_1(s), b_2(s)
    obs_clip: float = 5.0  # standardised observations are clipped to [-obs_clip, obs_clip]
    eval_frequency: int = 1_280_000  # evaluate the deterministic policy every N transitions
    eval_episodes: int = 10  # episodes per evaluation (EVAL_RULE: one from each of the first envs)
    max_nonfinite_updates: int = 100  # stop once this many updates had a non-finite loss (skipped)


def fail(message: str, close=None):
    """Bad input: one line on stderr (control characters escaped) and exit 2, nothing written;
    after close(SystemExit(2)) if given (Kit, launched by Isaac Lab, exits inside it)."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {line}", file=sys.stderr)
    if close is not None:
        close(SystemExit(2))
    sys.exit(2)


# The rule of each numeric flag of Args that is not simply positive
RULES = {"positive": lambda x: x > 0, "non-negative": lambda x: x >= 0,
         "in (0, 1]": lambda x: 0 < x <= 1, "in [0, 1]": lambda x: 0 <= x <= 1,
         "in [0, 2**32 - 1]": lambda x: 0 <= x < 2**32,  # numpy's and Gymnasium's seed range
         "finite": lambda x: True}
RULE_OF = {"learning_starts": "non-negative", "checkpoint_frequency": "non-negative",
           "tau": "in (0, 1]", "gamma": "in [0, 1]", "seed": "in [0, 2**32 - 1]",
           "sigma_min": "finite", "sigma_max": "finite"}


def check_args(args: Args):
    for field in [f for f in fields(Args) if f.type in (int, float)]:
        value, rule = getattr(args, field.name), RULE_OF.get(field.name, "positive")
        flag = "--" + field.name.replace("_", "-")
        if field.type is float and not (math.isfinite(value) and abs(value) <= 3.4e38):  # float32
            fail(f"{flag} must be a finite float32 number (|x| <= 3.4e38), got {value}")
        if not RULES[rule](value):
            fail(f"{flag} must be {rule}, got {value}")
    if args.sigma_min >= args.sigma_max:
        fail(f"--sigma-min ({args.sigma_min}) must be smaller than --sigma-max ({args.sigma_max})")
    if args.batch_size > args.buffer_size * args.num_envs:
        fail(f"--batch-size ({args.batch_size}) cannot exceed the replay capacity "
             f"(--buffer-size {args.buffer_size} x --num-envs {args.num_envs})")
    if args.total_timesteps < args.num_envs:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one vector step "
             f"(--num-envs {args.num_envs})")
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs wandb: pip install wandb")


# ---- Environments: thin adapters with one contract, so one loop serves all. step(actions (N, d)
# in [-1, 1]) returns tensors on the device that the caller owns (the simulator rewrites none):
#   next_obs (N, obs_dim)   the observation to act on next (a new episode's first after a reset)
#   real_next_obs           the true successor s' of this transition (the final one at an end)
#   rewards (N,), terminated (N,) (cuts the bootstrap), truncated (N,) (time-out: bootstraps)
#   valid (N,)              0 for a transition that spans two episodes (never learned from)
# reset(seed) starts fresh episodes and returns the observation to act on (never fed to the
# normaliser: Isaac Gym's is stale zeros). An episode's return sums all its rewards, valid or not.
# one_per_process: one simulation per process, so evaluation runs on the training envs.
class GymnasiumVecEnv:
    """Any Gymnasium continuous-control task as a synchronous vector env (CPU)."""

    one_per_process = False

    def __init__(self, env_id, num_envs, seed, args, device):
        try:
            probe = gym.make(env_id)  # unknown ids fail here, before the vector env is built
        except gym.error.Error as e:
            fail(f"cannot make environment {env_id!r}: {e}")
        obs, act = probe.observation_space, probe.action_space
        probe.close()
        if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
            fail(f"this script needs a flat Box observation space; {env_id} has {obs}")
        if not (isinstance(act, gym.spaces.Box) and np.isfinite([act.low, act.high]).all()):
            fail(f"MEow needs a bounded continuous (Box) action space; {env_id} has {act}")
        ones = np.ones(act.shape, dtype=act.dtype)  # MEow's flow ends in tanh: actions in [-1, 1]^d
        # SAME_STEP: a finished env is reset inside step(), its final observation in info
        self.envs = gym.make_vec(env_id, num_envs, vectorization_mode="sync", vector_kwargs={
                                 "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                                 wrappers=[lambda e: gym.wrappers.RescaleAction(e, -ones, ones)])
        self.num_envs, self.device = num_envs, device
        self.obs_dim, self.act_dim = obs.shape[0], act.shape[0]

    def tensor(self, x):
        return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device)

    def reset(self, seed=None):
        return self.tensor(self.envs.reset(seed=seed)[0])

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.envs.step(actions.cpu().numpy())
        real_next_obs = obs.copy()
        for i in np.flatnonzero(info.get("_final_obs", [])):
            real_next_obs[i] = info["final_obs"][i]
        return (*map(self.tensor, [obs, real_next_obs, rewards, terminated, truncated]),
                torch.ones(self.num_envs, device=self.device))

    def close(self):
        self.envs.close()


class IsaacGymVecEnv:
    """Isaac Gym Preview 4 through IsaacGymEnvs (tasks/base/vec_task.py): reset() returns the obs
    buffer (zeros before the first step) and the first step() resets every env; a finished env is
    reset during the *next* step, so the observation returned with done is the true final one and
    the next transition spans the reset. rew_buf and reset_buf are overwritten by the next step."""

    one_per_process = True  # vec_task.py creates the simulation once per process (_create_sim_once)

    def __init__(self, task, num_envs, seed, args, device):
        if isaacgymenvs is None:
            fail("Isaac Gym is not installed: get Isaac Gym Preview 4 from NVIDIA, `pip install -e "
                 "isaacgym/python` and IsaacGymEnvs; or run a Gymnasium task: --backend gymnasium")
        # make()'s seed seeds nothing: the caller seeds torch before this (seed_everything)
        self.envs = isaacgymenvs.make(seed=seed, task=task, num_envs=num_envs, headless=True,
                                      sim_device=args.sim_device, rl_device=str(device))
        self.num_envs, self.device = num_envs, device
        self.obs_dim = self.envs.observation_space.shape[0]
        self.act_dim = self.envs.action_space.shape[0]
        self.prev_done = torch.ones(num_envs, dtype=torch.bool, device=device)  # next spans a reset

    def reset(self, seed=None):
        """Once, on the fresh task (VecTask.reset: "Is called only once when environment starts")"""
        self.prev_done.fill_(True)  # the first step resets every env: no transition
        return self.envs.reset()["obs"].to(torch.float32, copy=True)

    def step(self, actions):
        obs_dict, rewards, dones, infos = self.envs.step(actions)
        obs = obs_dict["obs"].to(torch.float32, copy=True)
        rewards = rewards.to(torch.float32, copy=True)  # the task's rew_buf, rewritten next step
        dones = dones.to(torch.bool, copy=True)  # the task's reset_buf, likewise
        time_outs = infos["time_outs"].to(torch.bool, copy=True)
        valid, self.prev_done = (~self.prev_done).float(), dones
        return obs, obs, rewards, (dones & ~time_outs).float(), time_outs.float(), valid

    def close(self):
        pass  # Isaac Gym tears its simulation down with the process


ISAACLAB_INSTALL = ('pip install "isaaclab==3.0.0" (Python 3.12, torch 2.11.0, an NVIDIA GPU of '
                    'compute capability 7.5+); for --physics physx: "isaaclab[isaacsim]==3.0.0" '
                    "--extra-index-url https://pypi.nvidia.com")
PHYSICS_PRESETS = {"newton": "newton_mjwarp", "physx": "isaacsim_physx"}  # Isaac Lab's physics=NAME


class IsaacLabVecEnv:
    """Isaac Lab 3.0: a manager-based or direct RL task that resets finished envs inside step(), on
    Newton (kit-less, the default) or Isaac Sim PhysX (in Kit). API of the isaaclab 3.0.0 wheel:
    app/sim_launcher.py, isaaclab_tasks/utils/parse_cfg.py, envs/{manager_based,direct}_rl_env.py"""

    one_per_process = True  # one SimulationContext per process: a second env raises

    def __init__(self, task, num_envs, seed, args, device):
        try:  # 3.0 imports the task registry before any launch
            from isaaclab.app import launch_simulation
            import isaaclab_tasks  # noqa: F401  registers the Isaac-* task ids with gymnasium
            from isaaclab_tasks.utils import parse_env_cfg
        except ImportError as e:
            fail(f"Isaac Lab 3.0 is not installed ({e}): {ISAACLAB_INSTALL}; "
                 "or run any Gymnasium task with --backend gymnasium (works on a CPU)")
        dev = args.sim_device  # kit-less, nothing checks it before the env is built
        if not (dev in ("cpu", "cuda") or dev.startswith("cuda:") and dev[5:].isdigit()):
            fail(f"--sim-device must be cpu, cuda or cuda:N, got {dev!r}")
        if args.physics == "physx" and not importlib.util.find_spec("isaacsim"):  # else Kit exits 1
            fail(f"--physics physx runs Isaac Sim PhysX in Kit; Isaac Sim is not installed: "
                 f"{ISAACLAB_INSTALL}")
        try:  # the task's own preset for that physics: a task without one fails here
            env_cfg = parse_env_cfg(task, device=args.sim_device, num_envs=num_envs,
                                    overrides=[f"physics={PHYSICS_PRESETS[args.physics]}"])
        except (gym.error.Error, ValueError) as e:  # unknown id (old -v0 ids too), no such preset
            fail(f"cannot make Isaac Lab task {task!r}: {str(e).strip().splitlines()[0]}")
        env_cfg.seed = seed  # building the env seeds Python, NumPy, torch and Warp (configure_seed)
        env_cfg.compute_final_obs = True  # extras["final_obs"]: the observation before a reset
        self.envs = None
        # Newton starts nothing; PhysX starts Kit (headless), which ends the process in close()
        self.launch = launch_simulation(env_cfg, dict(headless=True, device=dev, visualizer="none"))
        self.launch.__enter__()
        self.envs = gym.make(task, cfg=env_cfg)
        torch.backends.cudnn.deterministic = args.torch_deterministic  # configure_seed() unset it
        unwrapped = self.envs.unwrapped
        obs_space = unwrapped.single_observation_space["policy"]
        act_space = unwrapped.single_action_space
        # an unbounded action space is fine: actions in [-1, 1] go as they are, the task scales them
        if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1
                and isinstance(act_space, gym.spaces.Box)):
            fail(f"MEow needs a flat 'policy' observation vector and a continuous (Box) action "
                 f"space; {task} has {obs_space} and {act_space}", close=self.close)
        # a finite-horizon task's time limit is part of the task (Isaac Lab does not bootstrap it)
        self.time_limit_is_terminal = unwrapped.cfg.is_finite_horizon
        self.num_envs, self.device = num_envs, device
        self.obs_dim, self.act_dim = obs_space.shape[0], act_space.shape[0]

    def policy_obs(self, obs):
        return obs["policy"].to(self.device, torch.float32, copy=True)  # (N, obs_dim)

    def reset(self, seed=None):
        # seeded when built: reset(seed=...) would reseed Python, NumPy and torch over a resume's
        return self.policy_obs(self.envs.reset()[0])

    def step(self, actions):
        obs, rewards, terminated, truncated, extras = self.envs.step(actions)
        # the env's own buffers, rewritten in place by the next step: copied. Termination wins
        next_obs = self.policy_obs(obs)
        rewards = rewards.to(self.device, torch.float32, copy=True)
        terminated = terminated.to(self.device, torch.bool, copy=True)
        truncated = truncated.to(self.device, torch.bool, copy=True) & ~terminated
        if self.time_limit_is_terminal:
            terminated, truncated = terminated | truncated, torch.zeros_like(truncated)
        # a finished env was reset inside step(): next_obs is its new episode's first observation,
        # extras["final_obs"] the one it ended on (set at steps with resets, stale after: if done)
        done = (terminated | truncated)[:, None]
        final_obs = extras.get("final_obs")
        real_next_obs = (next_obs if final_obs is None
                         else torch.where(done, self.policy_obs(final_obs), next_obs))
        return (next_obs, real_next_obs, rewards, terminated.float(), truncated.float(),
                torch.ones(self.num_envs, device=self.device))

    def close(self, status=None):
        if self.envs is not None:
            self.envs.close()
        # the launch goes last, as in Isaac Lab's scripts; a SystemExit's status reaches Kit's exit
        self.launch.__exit__(type(status) if status else None, status, None)


class PlaygroundVecEnv:
    """MuJoCo Playground's DM Control Suite tasks (playground 0.2.0; MJX on JAX's default device):
    jitted, vmapped reset and step; the time limit and an auto-reset that keeps s' are ours."""

    one_per_process = False  # an env is a pure function: evaluation gets fresh envs of its own

    def __init__(self, task, num_envs, seed, args, device):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
        try:
            import jax
            import jax.numpy as jnp
            from mujoco_playground import dm_control_suite as suite
        except ImportError:
            fail("MuJoCo Playground is not installed: "
                 "pip install -r tests/requirements-playground.txt")
        if task not in suite.ALL_ENVS:
            fail(f"--backend playground runs the DM Control Suite tasks; {task!r} is none of: "
                 + ", ".join(suite.ALL_ENVS))
        try:  # impl "jax": the default, "warp", needs warp-lang and a GPU. Every task's observation
            # is a flat vector and its controls lie in [-1, 1] (checked for playground 0.2.0)
            self.env = env = suite.load(task, config_overrides={"impl": "jax"})
        except (AttributeError, KeyError, ValueError) as e:  # Reacher*: no MjSpec.find_body in 3.17
            fail(f"cannot make Playground task {task!r}: "
                 f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        self.num_envs, self.device = num_envs, device
        self.obs_dim, self.act_dim = env.observation_size, env.action_size
        jax_device = jax.devices()[0]  # and torch's device of its memory: zero-copy DLPack there
        self.via = torch.device("cuda" if jax_device.platform == "gpu" else "cpu", jax_device.id)

        def reset(key):  # (states, step counts, the key for later resets)
            keys = jax.random.split(key, num_envs + 1)
            return jax.vmap(env.reset)(keys[1:]), jnp.zeros(num_envs, jnp.int32), keys[0]

        def step(state, t, key, actions, limit):  # limit an argument: one program for every length
            nxt, t = jax.vmap(env.step)(state, actions), t + 1
            # a NaN state (DM Control's only `done`) ends its episode and is never learned from
            bad = (nxt.done > 0) | ~jnp.isfinite(nxt.reward) | ~jnp.isfinite(nxt.obs).all(axis=1)
            truncated = (t >= limit) & ~bad  # Playground never ends an episode by time: we do
            done = bad | truncated

            def restart(key):  # fresh episodes in the done envs; the others keep their state
                fresh, _, key = reset(key)
                return jax.tree.map(lambda a, b: jax.vmap(jnp.where)(done, a, b), fresh, nxt), key

            state, key = jax.lax.cond(done.any(), restart, lambda key: (nxt, key), key)
            # one new buffer: next_obs, real_next_obs, reward, terminated, truncated, valid
            flags = jnp.stack([jnp.where(bad, 0.0, nxt.reward), bad, truncated, ~bad], axis=1)
            out = jnp.concatenate([state.obs, jnp.where(bad[:, None], 0.0, nxt.obs), flags], axis=1)
            return state, jnp.where(done, 0, t), key, out.astype(jnp.float32)

        self.jit_reset, self.jit_step, self.to_jax = jax.jit(reset), jax.jit(step), jnp.from_dlpack
        # keys on JAX's device, as DLPack's actions are (else step() compiles twice)
        self.key_of = lambda s: jax.device_put(jax.random.PRNGKey(s), jax_device)
        self.limit, self.key = int(env._config.episode_length), self.key_of(seed)

    def reset(self, seed=None):
        key = self.key if seed is None else self.key_of(seed)
        self.state, self.t, self.key = self.jit_reset(key)
        return torch.from_dlpack(self.state.obs).to(self.device, torch.float32, copy=True)

    def step(self, actions):
        actions = self.to_jax(actions.detach().to(self.via, torch.float32).contiguous())
        self.state, self.t, self.key, out = self.jit_step(self.state, self.t, self.key, actions,
                                                          self.limit)
        out, d = torch.from_dlpack(out).to(self.device), self.obs_dim  # a new buffer: the caller's
        return (out[:, :d], out[:, d:2 * d], *out[:, 2 * d:].unbind(1))

    def close(self):
        self.state = None


def make_env(args, device, num_envs=None, seed=None):
    backend = {"isaacgym": IsaacGymVecEnv, "isaaclab": IsaacLabVecEnv,
               "playground": PlaygroundVecEnv, "gymnasium": GymnasiumVecEnv}[args.backend]
    return backend(args.env_id, num_envs or args.num_envs, args.seed if seed is None else seed,
                   args, device)


# ---- Observation standardisation by running mean and variance (as the paper's Isaac runs) ------
class RunningMeanStd(nn.Module):
    """Chan et al.'s parallel update of mean and variance; buffers, so checkpoints carry them."""

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
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x):
        std = torch.sqrt(self.var.float() + self.eps)
        return ((x - self.mean.float()) / std).clamp(-self.clip, self.clip)


# ---- The EBFlow policy (paper Sec. 3.1, Eqs. 6-9; published architecture in Appendix) -------
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
    Sampling direction u -> a (acting): the same layers inverted, in reverse order."""

    def __init__(self, obs_dim, act_dim, alpha, sigma_min, sigma_max, flow_hidden=64,
                 shift_hidden=256):
        super().__init__()
        self.act_dim, self.alpha = act_dim, alpha
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        # masks m_1 = m_3 = [1,0,1,0,...], m_2 = m_4 = 1 - m_1; row k-1 holds m_k.   (4, d)
        m1 = (torch.arange(act_dim) % 2 == 0).float()
        self.register_buffer("masks", torch.stack([m1, 1 - m1, m1, 1 - m1]))
        # coupling translations t_k(m_k * y, s): orthogonal init, LayerNorm, dropout 0.1
        self.couplings = nn.ModuleList([mlp(act_dim + obs_dim, flow_hidden, act_dim, True, 0.1,
                                            nn.init.orthogonal_) for _ in range(4)])
        # h(s), log-scale of the state-dependent linear layer; zero weights: sigma starts mid-range
        self.log_scale_net = mlp(obs_dim, flow_hidden, act_dim, weight_init=nn.init.zeros_)
        # b_1(s), b_2(s): the two learnable reward shifts (LRS + SCDQ); zero weights
        self.shift_nets = nn.ModuleList([mlp(obs_dim, shift_hidden, 1, weight_init=nn.init.zeros_)
                                         for _ in range(2)])
        self.dropout_layers = [m for m in self.couplings.modules() if isinstance(m, nn.Dropout)]

    def set_dropout(self, on: bool):
        """Dropout on (updates) or off (acting): what .train() / .eval() change here, cheaper (the
        couplings' dropout layers are the only layers that differ between the two modes)."""
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
        Returns y (B, d) and the non-linear log-det sum_j -log(1 - a_j^2 + eps) (B,)."""
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
        The base term -E(a|s) is computed once and shared by both shift heads (SCDQ).   (B, 2)"""
        y, logdet_tanh = self.action_to_y(obs, actions)
        u = y * torch.exp(-self.log_sigma(obs))  # the linear layer u = y / sigma(s)
        neg_energy = -0.5 * (u * u).sum(dim=1) + logdet_tanh  # (B,)
        return self.alpha * (neg_energy.unsqueeze(1) + self.shifts(obs))

    def soft_v(self, obs):
        """V_k(s) = alpha * log Z(s) = alpha * (sum_j log sigma_j(s) + (d/2) log 2pi + b_k(s)).
        Exact and closed form: only the linear layer and the shifts enter, no coupling. (B, 2)"""
        log_z = self.log_sigma(obs).sum(dim=1) + 0.5 * self.act_dim * math.log(2 * math.pi)  # (B,)
        return self.alpha * (log_z.unsqueeze(1) + self.shifts(obs))

    def log_prob(self, obs, actions):
        """log pi(a|s) = (Q(s,a) - V(s)) / alpha (paper Eq. 6); the shifts b_k cancel.   (B,)"""
        return (self.soft_q(obs, actions)[:, 0] - self.soft_v(obs)[:, 0]) / self.alpha

    # ---- Acting -----------------------------------------------------------------------------
    def sample(self, obs):
        """Stochastic action: u ~ N(0, I) pushed through the flow (exact sample of pi)."""
        return self.u_to_action(obs, torch.randn(obs.shape[0], self.act_dim, device=obs.device))

    def deterministic_action(self, obs):
        """Deterministic action (paper Sec. 3.3): the image of u = 0, used for evaluation."""
        return self.u_to_action(obs, torch.zeros(obs.shape[0], self.act_dim, device=obs.device))


# ---- Soft Bellman loss with shifting-based clipped double Q (paper Sec. 3.2, Eqs. 10-12) -----
def soft_bellman_loss(flow, target_flow, obs, actions, rewards, next_obs, terminated, valid, gamma):
    """L = 0.5 * sum_k mean (Q_k(s,a) - y)^2,  y = r + gamma (1 - terminated) min_k Vbar_k(s').
    The mean runs over valid transitions only (Isaac Gym's transition across a reset: valid = 0)."""
    with torch.no_grad():
        next_v = target_flow.soft_v(next_obs)  # exact V from the target network   (B, 2)
        target = rewards + gamma * (1.0 - terminated) * next_v.min(dim=1).values  # SCDQ   (B,)
    q = flow.soft_q(obs, actions)  # (B, 2)
    w = valid / valid.sum().clamp(min=1.0)  # (B,) weights of a mean over the valid transitions
    loss = 0.5 * (w * (q[:, 0] - target) ** 2).sum() + 0.5 * (w * (q[:, 1] - target) ** 2).sum()
    return loss, q.detach()


def compile_fn(fn, device):
    """torch.compile: CUDA graphs on a GPU; on a CPU, eager mode's random numbers (speed.md)."""
    if device.type == "cpu":  # the same dropout masks and noise as an eager run, and faster
        import torch._inductor.config as inductor_config  # its own name: `torch` stays global here
        inductor_config.fallback_random = True
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)


def make_update(flow, target_flow, args, compile=False):
    """One MEow update (paper Algorithm 1): a soft Bellman regression step, then Polyak averaging.
    Returns update(data) -> (loss, Q (B, 2), grad norm), the optimizer, and a device counter of
    skipped (non-finite) updates. No host sync per update."""
    params = list(flow.parameters())
    # one Adam over all parameters; fused: one kernel per step, and it can skip a step on device
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, fused=True)
    # the target is read only for V, which needs only h(s) and b_k(s): Polyak averages just those
    online_v = [*flow.log_scale_net.parameters(), *flow.shift_nets.parameters()]
    target_v = [*target_flow.log_scale_net.parameters(), *target_flow.shift_nets.parameters()]
    loss_fn = compile_fn(soft_bellman_loss, params[0].device) if compile else soft_bellman_loss
    nonfinite_updates = torch.zeros((), device=params[0].device)

    def update(data):
        loss, q = loss_fn(flow, target_flow, *data, args.gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
        # non-finite loss or gradient: fused Adam skips the whole step when found_inf is 1; counted
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
        nonfinite_updates.add_(optimizer.found_inf)
        with torch.no_grad():  # Polyak averaging: target <- target + tau (online - target), fused
            torch._foreach_lerp_(target_v, online_v, args.tau)
        return loss, q, grad_norm

    return update, optimizer, nonfinite_updates


# ---- Replay buffer: a ring of N transitions per vector step; raw obs, standardised when sampled
class ReplayBuffer:
    FIELDS = ["obs", "next_obs", "actions", "rewards", "terminated", "valid"]

    def __init__(self, capacity, num_envs, obs_dim, act_dim, device):
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        self.pos, self.size = 0, 0
        self.obs = torch.zeros(capacity, num_envs, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, num_envs, obs_dim, device=device)  # true s' always
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
        """A uniform batch, in FIELDS order; the indices never leave the device."""
        idx = torch.randint(0, self.size * self.num_envs, (batch_size,), device=self.device)
        return [getattr(self, key).flatten(0, 1)[idx] for key in self.FIELDS]

    def state_dict(self):
        """The filled part only, copied (saving a view would write the whole storage)."""
        filled = {key: getattr(self, key)[: self.size].to("cpu", copy=True) for key in self.FIELDS}
        return {"pos": self.pos, "size": self.size, **filled}

    def load_state_dict(self, state):
        n, pos, cap = state["size"], state["pos"], self.capacity
        if not (0 <= pos < cap and 0 <= n <= cap and (pos == n or n == cap)):
            raise ValueError(f"buffer position {pos} and size {n} are no state of a ring of {cap}")
        for key in self.FIELDS:
            shape = tuple(getattr(self, key)[:n].shape)
            if tuple(state[key].shape) != shape:  # exactly: a narrower tensor would broadcast
                raise ValueError(f"buffer {key} has shape {tuple(state[key].shape)}, not {shape}")
            getattr(self, key)[:n] = state[key].to(self.device)
        self.pos, self.size = pos, n


# ---- Bookkeeping: checkpoints (atomic, data only), resume, evaluation. Safe to skip. -----------
CHECKPOINT_FORMAT = "meow-ebflow-isaacgym/1"
ARCH_KEYS = ["sigma_min", "sigma_max", "flow_hidden", "shift_hidden"]
# arguments a resumed run may change; every other one must equal the checkpoint's
RESUME_MAY_CHANGE = {"total_timesteps", "resume", "checkpoint_frequency", "track", "wandb_entity",
                     "wandb_project_name", "save_model", "cuda", "compile", "log_frequency",
                     "eval_checkpoint", "exp_name", "max_nonfinite_updates", "sim_device"}


def save_atomic(obj, path):
    """Write a temporary file, then rename it: a kill leaves the old or the new file, whole."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def model_checkpoint(flow, normalizer, args, obs_dim, act_dim, step):
    return {"format": CHECKPOINT_FORMAT, "backend": args.backend, "env_id": args.env_id,
            "obs_dim": obs_dim, "act_dim": act_dim, "alpha": args.alpha,
            "arch": {k: getattr(args, k) for k in ARCH_KEYS},
            "obs_clip": args.obs_clip, "global_step": step, "model": flow.state_dict(),
            "obs_normalizer": normalizer.state_dict()}


def load_checkpoint(path, args=None):
    """(checkpoint, policy, normaliser) from a file or a run directory; with args (--resume), a
    training checkpoint this run can continue. Data only: weights_only refuses a pickle of code."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path  # a run directory
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        if fmt != CHECKPOINT_FORMAT:
            raise ValueError(f"format {str(fmt)[:40]!r}, not {CHECKPOINT_FORMAT!r}")
        flow = EBFlowPolicy(ckpt["obs_dim"], ckpt["act_dim"], ckpt["alpha"], **ckpt["arch"])
        flow.load_state_dict(ckpt["model"])
        normalizer = RunningMeanStd(ckpt["obs_dim"], ckpt["obs_clip"])
        normalizer.load_state_dict(ckpt["obs_normalizer"])
        if args is not None:  # the run's name and step, and the arguments it must keep
            if "train_state" not in ckpt:
                raise ValueError("a saved model, not a training checkpoint")
            ts = ckpt["train_state"]
            name, step = ts["run_name"], ts["global_step"]
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
                raise ValueError(f"run name {str(name)[:80]!r} is not a plain directory name")
            if type(step) is not int or not 0 <= step < args.total_timesteps:
                raise ValueError(f"step {step!r:.20} is not an int in [0, --total-timesteps)")
            differ = [f"--{k.replace('_', '-')} {v} (got {getattr(args, k, None)})"
                      for k, v in ts["args"].items()
                      if k not in RESUME_MAY_CHANGE and v != getattr(args, k, None)]
            if differ:
                fail(f"cannot resume: arguments differ from the checkpoint's: {', '.join(differ)}")
    except Exception as e:  # any file that is not one of ours: one line, before anything is written
        fail(f"cannot {'resume from' if args else 'load'} {path}: not a usable checkpoint of "
             f"{os.path.basename(__file__)} ({type(e).__name__}: {str(e)[:200]})")
    return ckpt, flow, normalizer


EVAL_RULE = ("deterministic actions (u = 0); in env i, episode j (j = 0, 1, ...; only episodes "
             "that begin during the evaluation) counts if j * num_envs + i < eval_episodes: with "
             "eval_episodes <= num_envs, one complete episode from each of the first envs")


def evaluate(flow, normalizer, env, episodes, obs=None, seed=0):
    """(mean return, episodes counted, last obs) over the episodes EVAL_RULE fixes beforehand (short
    ones are not favoured). obs=None: reset with seed; else (training envs) play out, uncounted."""
    flow.set_dropout(False)
    started = torch.full((env.num_envs,), obs is None, dtype=torch.bool)  # in an episode begun here
    obs = env.reset(seed=seed) if obs is None else obs
    started = started.to(obs.device)
    env_index = torch.arange(env.num_envs, device=obs.device)
    # how many episodes each env counts: #{j >= 0: j * N + i < episodes}
    to_count = ((episodes - 1 - env_index) // env.num_envs + 1).clamp(min=0)
    ep_return = torch.zeros(env.num_envs, device=obs.device)
    returns = []
    while to_count.sum() > 0:  # every backend ends its episodes (a time limit at least)
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
    flow.set_dropout(True)
    return float(np.mean(returns)) if returns else float("nan"), len(returns), obs


def seed_everything(seed, torch_deterministic=True):
    """Seed Python, numpy and torch before any env is built (Isaac Gym's tasks use torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state():
    """The random states training draws from: torch's (dropout, noise, batches, random actions)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    os.environ["MUJOCO_GL"] = "disable"  # nothing renders: `import mujoco` needs no OpenGL library
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_checkpoint is not None:  # evaluate a saved model or checkpoint; nothing is trained
        ckpt, flow, normalizer = load_checkpoint(args.eval_checkpoint)
        args.backend, args.env_id = ckpt["backend"], ckpt["env_id"]
        seed_everything(args.seed, args.torch_deterministic)
        env = make_env(args, device, num_envs=args.eval_episodes)  # one episode from each
        mean_return, counted, _ = evaluate(flow.to(device), normalizer.to(device), env,
                                           args.eval_episodes, seed=args.seed)
        print(f"{args.env_id}: deterministic return {mean_return:.1f} over {counted} episodes "
              f"(checkpoint step {ckpt['global_step']}; {EVAL_RULE})", flush=True)
        sys.exit(env.close())  # under Kit (--physics physx) the process ends inside close()
    resume_ckpt = load_checkpoint(args.resume, args)[0] if args.resume is not None else None
    run_name = (resume_ckpt["train_state"]["run_name"] if resume_ckpt
                else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")

    # ---- Seeding, then environments (validated before anything is written) ------------------
    seed_everything(args.seed, args.torch_deterministic)
    env = make_env(args, device)
    eval_env = env if env.one_per_process else make_env(args, device, num_envs=args.eval_episodes)
    N, obs_dim, act_dim = env.num_envs, env.obs_dim, env.act_dim

    # ---- Networks: one EBFlow is policy and critic; a target copy gives Vbar ---------------
    try:  # sizes the machine cannot hold are bad input too
        flow, target_flow = [EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min,
                                          args.sigma_max, args.flow_hidden, args.shift_hidden)
                             .to(device) for _ in range(2)]  # the online flow, then the target
        target_flow.load_state_dict(flow.state_dict())
        target_flow.eval()  # the target runs in eval mode (no dropout)
        normalizer = RunningMeanStd(obs_dim, args.obs_clip).to(device)
        rb = ReplayBuffer(args.buffer_size, N, obs_dim, act_dim, device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        fail(f"cannot allocate the networks and the replay buffer on {device}: try a smaller "
             f"--buffer-size or --flow-hidden/--shift-hidden ({str(e).splitlines()[0]})")
    update, optimizer, nonfinite_updates = make_update(flow, target_flow, args, args.compile)
    act_fn = compile_fn(flow.sample, device) if args.compile else flow.sample  # a ~ pi(.|s)

    # ---- Resume: the whole training state, or one line --------------------------------------
    start_iter, best_eval, last_eval = 0, -math.inf, float("nan")
    if resume_ckpt is not None:
        try:
            ts = resume_ckpt["train_state"]
            flow.load_state_dict(resume_ckpt["model"])
            normalizer.load_state_dict(resume_ckpt["obs_normalizer"])
            target_flow.load_state_dict(ts["target_model"])
            optimizer.load_state_dict(ts["optimizer"])
            rb.load_state_dict(ts["buffer"])
            start_iter = ts["global_step"] // N
            best_eval, last_eval = float(ts["best_eval"]), float(ts["last_eval"])
            nonfinite_updates.fill_(float(ts["nonfinite_updates"]))
            set_rng_state(ts["rng"])
        except Exception as e:  # whatever torch or numpy raises on a damaged entry
            fail(f"checkpoint does not fit this run ({type(e).__name__}: {str(e)[:200]})")
        print(f"resumed {run_name} at step {ts['global_step']}; the envs start fresh episodes")

    # ---- Logging: only now is anything written (purge_step: drop events after the checkpoint)
    run_dir = f"runs/{run_name}"
    os.makedirs(run_dir, exist_ok=True)
    run_lock = open(os.path.join(run_dir, "train.lock"), "a+")  # one trainer per run (not Windows)
    try:  # the kernel drops the lock however the process ends
        if fcntl:
            fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        run_lock.seek(0)
        fail(f"{run_dir} is being trained by another process ({run_lock.read().strip()[:100]})")
    run_lock.truncate(0)
    print(f"pid {os.getpid()} on {platform.node()}", file=run_lock, flush=True)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, id=run_name, resume="allow")
    writer = SummaryWriter(run_dir, purge_step=start_iter * N if resume_ckpt else None)
    if resume_ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n"
                        + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    versions = ", ".join([f"python {platform.python_version()}"] + [f"{m.__name__} {m.__version__}"
                         for m in [torch, gym, np, sys.modules.get("mujoco")] if m is not None])
    print(f"versions: {versions}", flush=True)
    writer.add_text("versions", versions, start_iter * N)  # at every start: a resume may use others
    print(f"evaluation: {args.eval_episodes} episodes, {EVAL_RULE}", flush=True)
    writer.add_text("evaluation", f"{args.eval_episodes} episodes, {EVAL_RULE}")

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
    # episode statistics on the device, read at the logging interval only; an episode is logged if
    # the training policy played it from its first step (not one begun during an evaluation)
    ep_return, ep_length = torch.zeros(N, device=device), torch.zeros(N, device=device)
    ep_whole = torch.ones(N, dtype=torch.bool, device=device)
    finished = torch.zeros(3, device=device)  # sum of returns, sum of lengths, count of episodes
    last_return, start_time = float("nan"), time.time()
    for iteration in range(start_iter, num_iterations):
        global_step = (iteration + 1) * N  # transitions collected so far, over all envs

        # ALGO LOGIC: act. Uniform random actions for the first learning_starts vector steps
        if iteration < args.learning_starts:
            actions = torch.rand(N, act_dim, device=device) * 2 - 1
        else:
            flow.set_dropout(False)  # acting: no dropout
            # no_grad: CUDA-graph trees fail on parameters captured under inference_mode (#135892)
            with torch.no_grad():
                actions = act_fn(normalizer(obs))
            flow.set_dropout(True)

        next_obs, real_next_obs, rewards, terminated, truncated, valid = env.step(actions)
        # Terminations cut the bootstrap, time-outs do not: real_next_obs is the true s' in both
        rb.add(obs, real_next_obs, actions, rewards, terminated, valid)
        normalizer.update(next_obs)
        obs = next_obs

        done = (terminated + truncated) > 0  # bookkeeping: finished episodes, on the device
        ep_return, ep_length, logged = ep_return + rewards, ep_length + 1, done & ep_whole
        finished += torch.stack([(ep_return * logged).sum(), (ep_length * logged).sum(),
                                 logged.sum()])
        ep_return, ep_length, ep_whole = ep_return * ~done, ep_length * ~done, ep_whole | done

        # ALGO LOGIC: training. One soft Bellman regression step per vector step
        if iteration >= args.learning_starts:
            b_obs, b_next_obs, b_actions, b_rewards, b_term, b_valid = rb.sample(args.batch_size)
            loss, q, grad_norm = update((normalizer(b_obs), b_actions, b_rewards,
                                         normalizer(b_next_obs), b_term, b_valid))

        # Bookkeeping: logging (the only host syncs), evaluation, checkpoints
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
                skipped = int(nonfinite_updates)
                for key, value in [("qf_loss", loss), ("qf1_values", q[:, 0].mean()),
                                   ("qf2_values", q[:, 1].mean()), ("grad_norm", grad_norm),
                                   ("nonfinite_updates", skipped)]:
                    writer.add_scalar(f"losses/{key}", float(value), global_step)
                if skipped >= args.max_nonfinite_updates:
                    writer.close()
                    fail(f"{skipped} updates had a non-finite loss or gradient (each skipped); "
                         f"stopping at step {global_step}. Try a smaller --learning-rate or alpha.")
            print(f"step {global_step}/{num_iterations * N} | SPS {sps:.0f} | left "
                  f"{(num_iterations * N - global_step) / sps / 3600:.1f}h | episodic_return "
                  f"{last_return:.1f} | eval {last_eval:.1f}", flush=True)
        if global_step // args.eval_frequency > (global_step - N) // args.eval_frequency \
                or iteration + 1 == num_iterations:
            last_eval, counted, eval_obs = evaluate(flow, normalizer, eval_env, args.eval_episodes,
                                                    obs=obs if eval_env is env else None)
            if eval_env is env:  # continue training from where evaluation left the envs
                obs = eval_obs
                ep_whole.fill_(False)
            print(f"eval at step {global_step}: deterministic return {last_eval:.1f} over "
                  f"{counted} episodes", flush=True)
            writer.add_scalar("eval/return", last_eval, global_step)
            if args.save_model and last_eval > best_eval:
                save_atomic(model_checkpoint(flow, normalizer, args, obs_dim, act_dim, global_step),
                            f"{run_dir}/{args.exp_name}_best.cleanrl_model")
            best_eval = max(best_eval, last_eval)
        freq = args.checkpoint_frequency
        if freq > 0 and (global_step // freq > (global_step - N) // freq
                         or iteration + 1 == num_iterations):
            write_checkpoint(global_step)  # also at the end: resume with more --total-timesteps

    if args.save_model:
        path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        step = N * num_iterations
        save_atomic(model_checkpoint(flow, normalizer, args, obs_dim, act_dim, step), path)
        print(f"model saved to {path}; evaluate it with --eval-checkpoint {path}")
    for resource in dict.fromkeys([writer, run_lock, eval_env, env]):  # Kit exits in env.close()
        resource.close()
