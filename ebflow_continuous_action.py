# MEow: Maximum Entropy RL via Energy-Based Normalizing Flow (Chao et al., NeurIPS 2024)
# paper: https://arxiv.org/abs/2405.13629
# One network, an energy-based normalizing flow (EBFlow), is both the policy and the soft
# Q-function; its log normalizing constant is the exact soft value V. Training is one soft
# Bellman regression (paper Sec. 3, Eq. 10); there is no separate actor loss.
# Read top to bottom: Args -> environment -> EBFlow policy -> replay buffer -> training loop.
import importlib.util
import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

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
    run_name: Optional[str] = None  # a new directory in runs/ (default: env__exp__seed__time)
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be enabled by default (when available)
    track: bool = False  # if toggled, track the run with Weights and Biases (pip install wandb)
    wandb_project_name: str = "cleanRL"  # the wandb's project name
    wandb_entity: Optional[str] = None  # the entity (team) of wandb's project
    capture_video: bool = False  # if toggled, record evaluation videos (moviepy)
    save_model: bool = False  # if toggled, save the final and the best-eval models
    eval_checkpoint: Optional[str] = None  # evaluate this saved model or checkpoint, then exit
    eval_stochastic: bool = False  # if toggled, also evaluate sampled actions
    checkpoint_frequency: int = 0  # save the training state every N steps (0: never)
    resume: Optional[str] = None  # resume from a checkpoint file or its run directory
    compile: bool = False  # if toggled, torch.compile the update and acting (CUDA graphs on GPU)
    log_frequency: int = 1000  # log losses to TensorBoard and print progress every N steps

    # Algorithm specific arguments (defaults: the paper's Hopper-v4 settings)
    env_id: str = "Hopper-v4"  # the id of the environment
    total_timesteps: int = 1_500_000  # total timesteps of the experiments
    buffer_size: int = 1_000_000  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    tau: float = 0.005  # target smoothing coefficient (Polyak averaging rate)
    batch_size: int = 256  # the batch size of samples from the replay memory
    learning_starts: int = 5_000  # timestep to start learning (uniform random actions before)
    learning_rate: float = 1e-3  # the learning rate of the single Adam optimizer
    max_grad_norm: float = 30.0  # the maximum norm for gradient clipping
    alpha: float = 0.25  # entropy temperature (fixed per task, as in the paper)
    sigma_max: float = -0.3  # upper bound of the log-std of the state-dependent scale sigma(s)
    sigma_min: float = -5.0  # lower bound of the log-std of the state-dependent scale sigma(s)
    flow_hidden: int = 64  # hidden width of the couplings t_k and the log-scale net h(s)
    shift_hidden: int = 256  # hidden width of the reward-shift networks b_1(s), b_2(s)
    eval_frequency: int = 10_000  # evaluate the deterministic policy every N steps
    eval_episodes: int = 10  # number of episodes per evaluation
    max_nonfinite_updates: int = 100  # stop once this many updates had a non-finite loss (skipped)


def fail(message: str):
    """Bad input: one line on stderr (control characters escaped) and exit 2, nothing written."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {line}", file=sys.stderr)
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
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size ({args.batch_size}) cannot exceed --buffer-size ({args.buffer_size})")
    name = args.run_name  # a fixed name (sweeps): a requeued job finds its run again
    if name is not None and (os.path.basename(name) != name or name in ("", ".", "..")):
        fail(f"--run-name must be a plain directory name, got {name!r}")
    if name is not None and args.resume is None and os.path.exists(f"runs/{name}"):
        fail(f"runs/{name} exists: continue it with --resume runs/{name}, or choose another name")
    for flag, package in [("track", "wandb"), ("capture_video", "moviepy")]:
        if getattr(args, flag) and importlib.util.find_spec(package) is None:
            fail(f"--{flag.replace('_', '-')} needs {package}: pip install {package}")


# ---- Environment: one plain env that the loop resets, so an episode's last s' is next_obs -------
def make_env(env_id: str, video_folder: Optional[str] = None):
    """The task, checked and rescaled; with video_folder, recording every episode."""
    try:
        with warnings.catch_warnings():  # glfw warns before it fails where there is no display
            warnings.simplefilter("ignore")
            env = gym.make(env_id, **({"render_mode": "rgb_array"} if video_folder else {}))
            if video_folder is not None:  # one frame now: no OpenGL, one line and nothing written
                env.reset()
                env.render()
    except gym.error.Error as e:  # unknown id, missing version, ...
        fail(f"cannot make environment {env_id!r}: {e}")
    except Exception as e:
        if video_folder is None:
            raise
        fail(f"--capture-video: MuJoCo cannot render here (MUJOCO_GL="
             f"{os.environ.get('MUJOCO_GL', 'unset')}, {type(e).__name__}); "
             "headless: MUJOCO_GL=egl (GPU or Mesa's libEGL) or MUJOCO_GL=osmesa (libosmesa6)")
    space, act = env.observation_space, env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        fail(f"this script needs a flat Box observation space; {env_id} has {space}")
    if not (isinstance(act, gym.spaces.Box) and np.isfinite([act.low, act.high]).all()):
        fail(f"MEow needs a bounded continuous (Box) action space; {env_id} has {act}")
    ones = np.ones(act.shape, dtype=act.dtype)  # MEow's flow ends in tanh: actions in [-1, 1]^d
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, -ones, ones))
    return env if video_folder is None else gym.wrappers.RecordVideo(
        env, video_folder, lambda episode: True, disable_logger=True)


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
def soft_bellman_loss(flow, target_flow, obs, actions, rewards, next_obs, terminated, gamma):
    """L = 0.5 * sum_k mean (Q_k(s,a) - y)^2,  y = r + gamma (1 - terminated) min_k Vbar_k(s')."""
    with torch.no_grad():
        next_v = target_flow.soft_v(next_obs)  # exact V from the target network   (B, 2)
        target = rewards + gamma * (1.0 - terminated) * next_v.min(dim=1).values  # SCDQ   (B,)
    q = flow.soft_q(obs, actions)  # (B, 2)
    loss = 0.5 * ((q[:, 0] - target) ** 2).mean() + 0.5 * ((q[:, 1] - target) ** 2).mean()
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


# ---- Replay buffer: preallocated tensors on the training device, a ring of `capacity` ---------
class ReplayBuffer:
    FIELDS = ["obs", "next_obs", "actions", "rewards", "terminated"]

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity, self.pos, self.size, self.device = capacity, 0, 0, device
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)  # true s', also at truncation
        self.actions = torch.zeros(capacity, act_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminated = torch.zeros(capacity, device=device)  # 1 only for true terminations

    def add(self, obs, action, reward, next_obs, terminated):
        for key, value in zip(self.FIELDS, [obs, next_obs, action, reward, terminated]):
            getattr(self, key)[self.pos] = torch.as_tensor(value, dtype=torch.float32)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size):
        """A uniform batch (obs, actions, rewards, next_obs, terminated): the loss's order."""
        i = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i]

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
CHECKPOINT_FORMAT = "meow-ebflow-continuous/1"
ARCH_KEYS = ["sigma_min", "sigma_max", "flow_hidden", "shift_hidden"]
# arguments a resumed run may change; every other one must equal the checkpoint's
RESUME_MAY_CHANGE = {"total_timesteps", "resume", "checkpoint_frequency", "track", "wandb_entity",
                     "wandb_project_name", "capture_video", "save_model", "cuda", "compile",
                     "log_frequency", "eval_checkpoint", "exp_name", "run_name", "eval_stochastic",
                     "max_nonfinite_updates"}


def save_atomic(obj, path):
    """Write a temporary file, then rename it: a kill leaves the old or the new file, whole."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def model_checkpoint(flow, args, obs_dim, act_dim, step):
    return {"format": CHECKPOINT_FORMAT, "env_id": args.env_id, "obs_dim": obs_dim,
            "act_dim": act_dim, "alpha": args.alpha, "global_step": step,
            "arch": {k: getattr(args, k) for k in ARCH_KEYS}, "model": flow.state_dict()}


def load_checkpoint(path, args=None):
    """(checkpoint, policy) from a file or a run directory; with args (--resume), a training
    checkpoint this run can continue. Data only: weights_only refuses a pickle that runs code."""
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
    return ckpt, flow


def evaluate(flow, env, episodes, seed, device, stochastic=False):
    """Returns of `episodes` episodes seeded seed, seed+1, ..., without dropout: deterministic
    actions (u = 0, paper Sec. 3.3) or sampled ones, whose noise has a generator of its own."""
    flow.set_dropout(False)
    noise = torch.Generator(device).manual_seed(seed) if stochastic else None
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, episodic_return = False, 0.0
        while not done:
            with torch.inference_mode():
                o = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                u = torch.randn(1, flow.act_dim, generator=noise, device=device) if noise else None
                action = flow.u_to_action(o, u) if stochastic else flow.deterministic_action(o)
            obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
    flow.set_dropout(True)
    return returns


def rng_state(env):
    """The random streams training draws from: torch's (dropout, noise, batches) and the env's."""
    return {"torch": torch.get_rng_state(), "env": env.unwrapped.np_random.bit_generator.state,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "action_space": env.action_space.np_random.bit_generator.state}


def set_rng_state(state, env):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    env.unwrapped.np_random.bit_generator.state = state["env"]
    env.action_space.np_random.bit_generator.state = state["action_space"]


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if not args.capture_video:  # nothing renders: `import mujoco` then needs no OpenGL library
        os.environ["MUJOCO_GL"] = "disable"
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_checkpoint is not None:  # evaluate a saved model or checkpoint; nothing is trained
        ckpt, flow = load_checkpoint(args.eval_checkpoint)
        env = make_env(ckpt["env_id"], "videos/eval_checkpoint" if args.capture_video else None)
        for sampled in [False, True] if args.eval_stochastic else [False]:
            returns = evaluate(flow.to(device), env, args.eval_episodes, args.seed, device, sampled)
            print(f"{ckpt['env_id']}: {'stochastic' if sampled else 'deterministic'} return "
                  f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes "
                  f"(checkpoint step {ckpt['global_step']})")
        sys.exit(env.close())
    resume_ckpt = load_checkpoint(args.resume, args)[0] if args.resume is not None else None
    run_name = (resume_ckpt["train_state"]["run_name"] if resume_ckpt else args.run_name
                or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")

    # ---- Environments (validated before anything is written) and seeding ---------------------
    eval_env = make_env(args.env_id, f"videos/{run_name}" if args.capture_video else None)
    env = make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    env.action_space.seed(args.seed)

    # ---- Networks: one EBFlow is policy and critic; a target copy gives Vbar ---------------
    try:  # sizes the machine cannot hold are bad input too
        flow, target_flow = [EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min,
                                          args.sigma_max, args.flow_hidden, args.shift_hidden)
                             .to(device) for _ in range(2)]  # the online flow, then the target
        target_flow.load_state_dict(flow.state_dict())
        target_flow.eval()  # the target runs in eval mode (no dropout)
        rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        fail(f"cannot allocate the networks and the replay buffer on {device}: try a smaller "
             f"--buffer-size or --flow-hidden/--shift-hidden ({str(e).splitlines()[0]})")
    update, optimizer, nonfinite_updates = make_update(flow, target_flow, args, args.compile)
    act_fn = compile_fn(flow.sample, device) if args.compile else flow.sample  # a ~ pi(.|s)

    # ---- Resume: the whole training state, or one line --------------------------------------
    start_step, best_eval, last_eval, last_return = 0, -math.inf, float("nan"), float("nan")
    if resume_ckpt is not None:
        try:
            ts = resume_ckpt["train_state"]
            flow.load_state_dict(resume_ckpt["model"])
            target_flow.load_state_dict(ts["target_model"])
            optimizer.load_state_dict(ts["optimizer"])
            rb.load_state_dict(ts["buffer"])
            start_step = ts["global_step"]
            best_eval, last_eval = float(ts["best_eval"]), float(ts["last_eval"])
            nonfinite_updates.fill_(float(ts["nonfinite_updates"]))
            set_rng_state(ts["rng"], env)
        except Exception as e:  # whatever torch or numpy raises on a damaged entry
            fail(f"checkpoint does not fit this run ({type(e).__name__}: {str(e)[:200]})")
        print(f"resumed {run_name} at step {start_step}; the environment starts a fresh episode")

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
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True, id=run_name,
                   resume="allow")
    writer = SummaryWriter(run_dir, purge_step=start_step if resume_ckpt else None)
    if resume_ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n"
                        + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    versions = ", ".join([f"python {platform.python_version()}"] + [f"{m.__name__} {m.__version__}"
                         for m in [torch, gym, np, sys.modules.get("mujoco")] if m is not None])
    print(f"versions: {versions}", flush=True)
    writer.add_text("versions", versions, start_step)  # at every start: a resume may use others

    def write_checkpoint(step):
        ckpt = model_checkpoint(flow, args, obs_dim, act_dim, step)
        ckpt["train_state"] = {
            "args": asdict(args), "run_name": run_name, "global_step": step,
            "target_model": target_flow.state_dict(), "optimizer": optimizer.state_dict(),
            "buffer": rb.state_dict(), "best_eval": best_eval, "last_eval": last_eval,
            "nonfinite_updates": float(nonfinite_updates), "rng": rng_state(env)}
        save_atomic(ckpt, f"{run_dir}/checkpoint.pt")

    # ---- Training loop ------------------------------------------------------------------------
    start_time = time.time()
    needs_reset = True
    for global_step in range(start_step, args.total_timesteps):
        if needs_reset:  # first step, after an episode ended, and after a resume
            obs, _ = env.reset(seed=args.seed if global_step == 0 else None)

        # ALGO LOGIC: act. Uniform random actions before learning_starts, then a ~ pi(.|s)
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            flow.set_dropout(False)  # acting: no dropout
            # no_grad: CUDA-graph trees fail on parameters captured under inference_mode (#135892)
            with torch.no_grad():
                action = act_fn(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            action = action[0].cpu().numpy()
            flow.set_dropout(True)

        next_obs, reward, terminated, truncated, info = env.step(action)
        # Terminations cut the bootstrap, truncations do not: next_obs is the true s' in both cases
        rb.add(obs, action, reward, next_obs, terminated)
        obs, needs_reset = next_obs, terminated or truncated
        if "episode" in info:  # at an episode's end: its return and length
            last_return = float(info["episode"]["r"])
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)

        # ALGO LOGIC: training. One soft Bellman regression step per environment step
        if global_step > args.learning_starts:
            loss, q, grad_norm = update(rb.sample(args.batch_size))
            if global_step % args.log_frequency == 0:  # the only host syncs of the update
                skipped = int(nonfinite_updates)
                for key, value in [("qf_loss", loss), ("qf1_values", q[:, 0].mean()),
                                   ("qf2_values", q[:, 1].mean()), ("grad_norm", grad_norm),
                                   ("nonfinite_updates", skipped)]:
                    writer.add_scalar(f"losses/{key}", float(value), global_step)
                if skipped >= args.max_nonfinite_updates:
                    writer.close()
                    fail(f"{skipped} updates had a non-finite loss or gradient (each skipped); "
                         f"stopping at step {global_step}. Try a smaller --learning-rate or alpha.")

        # Bookkeeping: progress, evaluation, checkpoints
        if (global_step + 1) % args.log_frequency == 0:
            sps = (global_step + 1 - start_step) / (time.time() - start_time)
            writer.add_scalar("charts/SPS", int(sps), global_step)
            print(f"step {global_step + 1}/{args.total_timesteps} | SPS {sps:.0f} | left "
                  f"{(args.total_timesteps - global_step - 1) / sps / 3600:.1f}h | episodic_return "
                  f"{last_return:.1f} | eval {last_eval:.1f}", flush=True)
        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            eval_seed = args.seed + 1_000_000 + global_step
            returns = evaluate(flow, eval_env, args.eval_episodes, eval_seed, device)
            last_eval = float(np.mean(returns))
            writer.add_scalar("eval/return", last_eval, global_step)
            if args.eval_stochastic:  # the same initial states, sampled actions
                returns = evaluate(flow, eval_env, args.eval_episodes, eval_seed, device, True)
                writer.add_scalar("eval/return_stochastic", float(np.mean(returns)), global_step)
            if args.save_model and last_eval > best_eval:
                save_atomic(model_checkpoint(flow, args, obs_dim, act_dim, global_step + 1),
                            f"{run_dir}/{args.exp_name}_best.cleanrl_model")
            best_eval = max(best_eval, last_eval)
        if args.checkpoint_frequency > 0 and ((global_step + 1) % args.checkpoint_frequency == 0
                                              or global_step + 1 == args.total_timesteps):
            write_checkpoint(global_step + 1)  # also at the end: resume with more --total-timesteps

    if args.save_model:
        path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        save_atomic(model_checkpoint(flow, args, obs_dim, act_dim, args.total_timesteps), path)
        print(f"model saved to {path}; evaluate it with --eval-checkpoint {path}")
    for resource in [env, eval_env, writer, run_lock]:  # then another process may resume the run
        resource.close()
