# MEow: Maximum Entropy RL via Energy-Based Normalizing Flow (Chao et al., NeurIPS 2024)
# paper: https://arxiv.org/abs/2405.13629
# One network, an energy-based normalizing flow (EBFlow), is both the policy and the soft
# Q-function; its log normalizing constant is the exact soft value V. Training is one soft
# Bellman regression (paper Sec. 3, Eq. 10); there is no separate actor loss.
# Read top to bottom: Args -> environment -> EBFlow policy -> replay buffer -> training loop.
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    run_name: Optional[str] = None
    """the run's directory under runs/, which must not exist yet (default: {env_id}__{exp_name}__{seed}__{unix time})"""
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
    capture_video: bool = False
    """if toggled, record videos of evaluation episodes under `videos/{run_name}` (needs moviepy)"""
    save_model: bool = False
    """if toggled, save the final and the best-eval model under `runs/{run_name}`"""
    eval_checkpoint: Optional[str] = None
    """if set, load this saved model or checkpoint (a file, or a run directory holding just one), run
    `eval_episodes` deterministic episodes, print the return and exit"""
    eval_stochastic: bool = False
    """if toggled, also evaluate with sampled actions (u ~ N(0, I)) on the same episodes, logged as
    `eval/return_stochastic`; the authors' released run configurations evaluate this way"""
    checkpoint_frequency: int = 0
    """write the full training state to `runs/{run_name}/checkpoint.pt` every N steps (0 = never)"""
    resume: Optional[str] = None
    """resume training from a checkpoint file or a run directory holding `checkpoint.pt`"""
    compile: bool = False
    """if toggled, torch.compile the update and acting (CUDA graphs on GPU)"""
    log_frequency: int = 1000
    """log losses to TensorBoard and print progress every N steps"""

    # Algorithm specific arguments (defaults: the paper's Hopper-v4 settings)
    env_id: str = "Hopper-v4"
    """the id of the environment"""
    total_timesteps: int = 1_500_000
    """total timesteps of the experiments"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (Polyak averaging rate)"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    learning_starts: int = 5_000
    """timestep to start learning (uniform random actions before)"""
    learning_rate: float = 1e-3
    """the learning rate of the single Adam optimizer"""
    max_grad_norm: float = 30.0
    """the maximum norm for gradient clipping"""
    alpha: float = 0.25
    """entropy temperature (fixed per task, as in the paper)"""
    sigma_max: float = -0.3
    """upper bound of the log-std of the state-dependent scale sigma(s)"""
    sigma_min: float = -5.0
    """lower bound of the log-std of the state-dependent scale sigma(s)"""
    flow_hidden: int = 64
    """hidden width of the coupling networks t_k and of the log-scale network h(s)"""
    shift_hidden: int = 256
    """hidden width of the reward-shift networks b_1(s), b_2(s)"""
    eval_frequency: int = 10_000
    """evaluate the deterministic policy every N steps"""
    eval_episodes: int = 10
    """number of episodes per evaluation"""
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


def mujoco_note(env_id):
    """One line for a run that cannot be compared with the paper's Ant-v4 curve, else None. MuJoCo 3.5 made
    a contact's margin the sum of its two geoms' margins (before: the larger), so Ant's feet (margin 0.01)
    meet the floor 2 cm away instead of 1 cm: from 3.5 on, Ant-v4 is not the task the paper learned
    (MuJoCo 2.3.7; 3.1 to 3.4 follow its trajectories). Whether that changes the returns MEow reaches is
    not settled: docs/meow.md, "Experiment results", has our runs on both versions."""
    mujoco = sys.modules.get("mujoco")
    if mujoco is None or not env_id.startswith("Ant-"):
        return None
    if tuple(int(x) for x in re.findall(r"\d+", mujoco.__version__)[:2]) < (3, 5):
        return None
    return (f"note: MuJoCo 3.5 and later (here {mujoco.__version__}) simulate Ant's contacts differently from the "
            "paper's MuJoCo 2.3.7; to compare with the paper: pip install 'mujoco<3.5' (docs/meow.md)")


# Every int and float flag of Args, under the one rule its values must satisfy. check_args walks the
# fields of Args, so a numeric flag added without a rule here stops every run (KeyError) until it has one.
RULES = {
    "positive": (lambda x: x > 0, ["total_timesteps", "buffer_size", "batch_size", "learning_rate", "max_grad_norm",
                                   "alpha", "flow_hidden", "shift_hidden", "eval_frequency", "eval_episodes",
                                   "log_frequency", "max_nonfinite_updates"]),
    "non-negative": (lambda x: x >= 0, ["learning_starts", "checkpoint_frequency"]),
    "in (0, 1]": (lambda x: 0 < x <= 1, ["tau"]),
    "in [0, 1]": (lambda x: 0 <= x <= 1, ["gamma"]),
    "in [0, 2**32 - 1]": (lambda x: 0 <= x < 2**32, ["seed"]),  # numpy's and Gymnasium's seed range
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
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size ({args.batch_size}) cannot exceed --buffer-size ({args.buffer_size})")


# ---------------------------------------------------------------------------------------------
# Environment. MEow's flow ends in tanh, so the env is rescaled to the action space [-1, 1]^d.
# We use one plain env (not a vector env) and reset it ourselves: the final observation of an
# episode is then simply `next_obs`, and no stored transition can span two episodes.
# ---------------------------------------------------------------------------------------------
def make_env(env_id: str, render: bool = False):
    try:
        env = gym.make(env_id, render_mode="rgb_array") if render else gym.make(env_id)
    except gym.error.Error as e:  # unknown id, missing version, ...
        fail(f"cannot make environment {env_id!r}: {e}")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"MEow needs a continuous (Box) action space; {env_id} has {env.action_space}")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        fail(f"this script needs a flat Box observation space; {env_id} has {env.observation_space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        fail(f"{env_id} has an unbounded action space; MEow's tanh flow needs finite bounds")
    ones = np.ones(env.action_space.shape, dtype=env.action_space.dtype)
    return gym.wrappers.RescaleAction(env, -ones, ones)


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
def soft_bellman_loss(flow, target_flow, obs, actions, rewards, next_obs, terminated, gamma):
    """L = 0.5 * sum_k mean (Q_k(s,a) - y)^2,  y = r + gamma (1 - terminated) min_k Vbar_k(s')."""
    with torch.no_grad():
        next_v = target_flow.soft_v(next_obs)  # exact V from the target network   (B, 2)
        target = rewards + gamma * (1.0 - terminated) * next_v.min(dim=1).values  # SCDQ   (B,)
    q = flow.soft_q(obs, actions)  # (B, 2)
    loss = 0.5 * ((q[:, 0] - target) ** 2).mean() + 0.5 * ((q[:, 1] - target) ** 2).mean()
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
# Replay buffer: preallocated tensors on the training device, a ring of `capacity` transitions.
# ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity, self.pos, self.size, self.device = capacity, 0, 0, device
        self.obs = torch.zeros(capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(capacity, obs_dim, device=device)  # true s', also at truncation
        self.actions = torch.zeros(capacity, act_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminated = torch.zeros(capacity, device=device)  # 1 only for true terminations

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.pos
        self.obs[i] = torch.as_tensor(obs)
        self.next_obs[i] = torch.as_tensor(next_obs)
        self.actions[i] = torch.as_tensor(action)
        self.rewards[i] = float(reward)
        self.terminated[i] = float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size):
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx]

    def state_dict(self):
        """Compact: float32 and only the filled part."""
        n = self.size
        state = {"pos": self.pos, "size": n}
        for key in ["obs", "next_obs", "actions", "rewards", "terminated"]:
            # a copy: saving a view would write the whole preallocated storage
            state[key] = getattr(self, key)[:n].to("cpu", copy=True)
        return state

    def load_state_dict(self, state):
        n, pos = state["size"], state["pos"]
        if n > self.capacity:
            raise ValueError(f"checkpoint buffer holds {n} transitions, more than --buffer-size {self.capacity}")
        if not (0 <= pos < self.capacity and 0 <= n and (pos == n or n == self.capacity)):
            raise ValueError(f"checkpoint buffer position {pos} and size {n} are no state of a ring of {self.capacity}")
        for key in ["obs", "next_obs", "actions", "rewards", "terminated"]:
            if state[key].shape != getattr(self, key)[:n].shape:  # exactly: a narrower tensor would broadcast
                raise ValueError(f"checkpoint buffer {key} has shape {tuple(state[key].shape)}, "
                                 f"this run's is {tuple(getattr(self, key)[:n].shape)}")
            getattr(self, key)[:n] = state[key].to(self.device)
        self.pos, self.size = pos, n


# ---------------------------------------------------------------------------------------------
# Bookkeeping: checkpoints (atomic, data only), evaluation. Safe to skip on a first read.
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "meow-ebflow-continuous/1"
ARCH_KEYS = ["sigma_min", "sigma_max", "flow_hidden", "shift_hidden"]
# arguments a resumed run may change; every other one must equal the checkpoint's
RESUME_MAY_CHANGE = {"total_timesteps", "resume", "checkpoint_frequency", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "save_model", "cuda", "compile", "log_frequency",
                     "eval_checkpoint", "exp_name", "run_name", "max_nonfinite_updates", "eval_stochastic"}


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
    try:  # the policy must build from it: a damaged or forged file fails here, not in a traceback later
        flow_from_checkpoint(ckpt, torch.device("cpu"))
    except Exception as e:
        fail(f"{path} does not hold a usable model ({type(e).__name__}: {' '.join(str(e).split())[:220]})")
    problem = train_state_problem(ckpt["train_state"]) if training else None
    if problem:
        fail(f"{path} holds a damaged training state: {problem}")
    return ckpt


def model_checkpoint(flow, args, obs_dim, act_dim, step):
    return {"format": CHECKPOINT_FORMAT, "env_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim,
            "alpha": args.alpha, "arch": {k: getattr(args, k) for k in ARCH_KEYS}, "global_step": step,
            "model": flow.state_dict()}


def flow_from_checkpoint(ckpt, device):
    flow = EBFlowPolicy(ckpt["obs_dim"], ckpt["act_dim"], ckpt["alpha"], **ckpt["arch"]).to(device)
    flow.load_state_dict(ckpt["model"])
    return flow


def evaluate(flow, env, episodes, seed, device, stochastic=False):
    """Returns of `episodes` episodes seeded seed, seed+1, ..., in eval mode (no dropout), with the
    deterministic action (u = 0, paper Sec. 3.3) or, stochastic=True, with sampled actions. Their noise
    u ~ N(0, I) comes from a generator seeded with `seed`: training's random stream is left untouched."""
    was_training = flow.training
    flow.eval()
    noise = torch.Generator(device).manual_seed(seed) if stochastic else None
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, episodic_return = False, 0.0
        while not done:
            with torch.inference_mode():
                o = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                if stochastic:
                    action = flow.u_to_action(o, torch.randn(1, flow.act_dim, generator=noise, device=device))
                else:
                    action = flow.deterministic_action(o)
            obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
    flow.train(was_training)
    return returns


def rng_state(env):
    return {"python": random.getstate(), "numpy": {"state": np.random.get_state()[1].tolist(),
            "rest": list(np.random.get_state()[2:])}, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "env": env.unwrapped.np_random.bit_generator.state,
            "action_space": env.action_space.np_random.bit_generator.state}


def set_rng_state(state, env):
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"]["state"], dtype=np.uint32), *state["numpy"]["rest"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    env.unwrapped.np_random.bit_generator.state = state["env"]
    env.action_space.np_random.bit_generator.state = state["action_space"]


def make_video_env(env_id, video_folder):
    try:
        import moviepy  # noqa: F401  (gymnasium's RecordVideo writes mp4 files with it)
    except ImportError:
        fail("--capture-video needs moviepy: pip install moviepy (and MUJOCO_GL=osmesa or egl when headless)")
    try:  # render one frame now: without a working OpenGL backend, one line and nothing written
        with warnings.catch_warnings():  # (glfw warns before it fails where there is no display)
            warnings.simplefilter("ignore")
            env = make_env(env_id, render=True)
            env.reset()
            env.render()
    except Exception as e:
        fail(f"--capture-video: MuJoCo cannot render here (MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}, "
             f"{type(e).__name__}); headless: MUJOCO_GL=egl (GPU or Mesa's libEGL) or MUJOCO_GL=osmesa (libosmesa6)")
    return gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda ep: True, disable_logger=True)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    # without --capture-video nothing renders: `import mujoco` then loads no OpenGL library (a missing one
    # would make it fail, e.g. MUJOCO_GL=osmesa without libosmesa6)
    if not args.capture_video:
        os.environ["MUJOCO_GL"] = "disable"
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # ---- Reload a saved model and evaluate it (no training) --------------------------------
    if args.eval_checkpoint is not None:
        ckpt = load_checkpoint(args.eval_checkpoint)
        env_id = ckpt["env_id"]
        eval_env = make_video_env(env_id, "videos/eval_checkpoint") if args.capture_video else make_env(env_id)
        flow = flow_from_checkpoint(ckpt, device)
        for stochastic in [False, True] if args.eval_stochastic else [False]:
            returns = evaluate(flow, eval_env, args.eval_episodes, args.seed, device, stochastic)
            print(f"{env_id}: {'stochastic' if stochastic else 'deterministic'} return {np.mean(returns):.1f} "
                  f"+- {np.std(returns):.1f} over {len(returns)} episodes (checkpoint step {ckpt['global_step']})")
        eval_env.close()
        sys.exit(0)

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

    # ---- Environments (validated before anything is written) -------------------------------
    if resume_ckpt is not None:
        run_name = resume_ckpt["train_state"]["run_name"]
    elif args.run_name is not None:  # a fixed name (sweeps): a requeued job finds its run again
        run_name = args.run_name
        if not run_name or os.path.basename(run_name) != run_name or run_name in (".", ".."):
            fail(f"--run-name must be a plain directory name, got {run_name!r}")
        if os.path.exists(f"runs/{run_name}"):
            fail(f"runs/{run_name} exists: continue it with --resume runs/{run_name}, or choose another --run-name")
    else:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    eval_env = make_video_env(args.env_id, f"videos/{run_name}") if args.capture_video else make_env(args.env_id)
    env = make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    # ---- Seeding ------------------------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    env.action_space.seed(args.seed)

    # ---- Networks: one EBFlow is policy and critic; a target copy gives Vbar ---------------
    try:  # sizes the machine cannot hold are bad input too: one line, before anything is written
        flow = EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min, args.sigma_max,
                            args.flow_hidden, args.shift_hidden).to(device)
        target_flow = EBFlowPolicy(obs_dim, act_dim, args.alpha, args.sigma_min, args.sigma_max,
                                   args.flow_hidden, args.shift_hidden).to(device)
        target_flow.load_state_dict(flow.state_dict())
        target_flow.eval()  # the target runs in eval mode (no dropout)
        rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        fail(f"cannot allocate the networks and the replay buffer on {device} "
             f"(--buffer-size {args.buffer_size}, --flow-hidden {args.flow_hidden}, "
             f"--shift-hidden {args.shift_hidden}): "
             f"{str(e).strip().splitlines()[0]}")

    update, optimizer, nonfinite_updates = make_update(flow, target_flow, args, compile=args.compile)
    # acting: a ~ pi(.|s); --compile fuses it (CUDA graphs on GPU)
    act_fn = compile_fn(flow.sample, device) if args.compile else flow.sample

    # ---- Counters, restored on resume -------------------------------------------------------
    start_step, best_eval, last_eval, last_return = 0, -math.inf, float("nan"), float("nan")
    if resume_ckpt is not None:
        ts = resume_ckpt["train_state"]
        try:
            flow.load_state_dict(resume_ckpt["model"])
            target_flow.load_state_dict(ts["target_model"])
            optimizer.load_state_dict(ts["optimizer"])
            rb.load_state_dict(ts["buffer"])
            start_step, best_eval, last_eval = ts["global_step"], ts["best_eval"], ts["last_eval"]
            nonfinite_updates.fill_(ts["nonfinite_updates"])
            set_rng_state(ts["rng"], env)
        except Exception as e:  # a damaged or forged entry: whatever torch or numpy raises, one line
            fail(f"checkpoint does not fit this run ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        print(f"resumed {run_name} at step {start_step} (buffer {rb.size} transitions); "
              "the environment starts a fresh episode")

    # ---- Logging: only now is anything written ---------------------------------------------
    run_dir = f"runs/{run_name}"
    run_lock = lock_run(run_dir)  # one training process per run directory, until this one ends
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, monitor_gym=True, save_code=True,
                   id=run_name, resume="allow")
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events a killed run logged after its last checkpoint: no duplicated steps
    writer = SummaryWriter(run_dir, purge_step=start_step if resume_ckpt is not None else None)
    if resume_ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n"
                        + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    # at every start, resumes too: a run continued elsewhere may run on other versions
    versions = library_versions()
    print(f"versions: {versions}", flush=True)
    writer.add_text("versions", versions, start_step)
    note = mujoco_note(args.env_id)
    if note:
        print(note, flush=True)
    if device.type == "cuda" and not args.compile:
        # one env, batch 256: eager updates are launch-bound, slower on an H200 than on a 2-core CPU (docs/speed.md)
        print("note: on a GPU, --compile (CUDA graphs) is about 3x faster than eager", flush=True)

    def write_checkpoint(step):
        ckpt = model_checkpoint(flow, args, obs_dim, act_dim, step)
        ckpt["train_state"] = {
            "args": asdict(args), "run_name": run_name, "global_step": step,
            "target_model": target_flow.state_dict(), "optimizer": optimizer.state_dict(),
            "buffer": rb.state_dict(), "best_eval": best_eval, "last_eval": last_eval,
            "nonfinite_updates": float(nonfinite_updates), "rng": rng_state(env)}
        save_atomic(ckpt, f"{run_dir}/checkpoint.pt")

    # ---- Training loop ------------------------------------------------------------------------
    start_time, needs_reset = time.time(), True
    skipped, updates_unread = int(nonfinite_updates), 0  # the counter as last read, updates since
    log_time = start_time  # time of the last progress line: the time left uses the recent rate
    episodic_return, episodic_length = 0.0, 0
    for global_step in range(start_step, args.total_timesteps):
        if needs_reset:  # first step, after an episode ended, and after a resume
            obs, _ = env.reset(seed=args.seed if global_step == 0 else None)
            episodic_return, episodic_length, needs_reset = 0.0, 0, False

        # ALGO LOGIC: act. Uniform random actions before learning_starts, then a ~ pi(.|s) (eval mode)
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            flow.set_dropout(False)  # acting: no dropout, as in eval mode
            # no_grad rather than inference_mode: CUDA-graph trees have a known failure when the same
            # parameters are first captured under inference_mode, then trained (pytorch/pytorch#135892)
            with torch.no_grad():
                action = act_fn(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            flow.set_dropout(True)

        next_obs, reward, terminated, truncated, info = env.step(action)
        # Terminations cut the bootstrap, truncations do not: next_obs is the true s' in both cases
        rb.add(obs, action, reward, next_obs, terminated)
        obs = next_obs
        episodic_return += float(reward)
        episodic_length += 1
        if terminated or truncated:
            last_return, needs_reset = episodic_return, True
            writer.add_scalar("charts/episodic_return", episodic_return, global_step)
            writer.add_scalar("charts/episodic_length", episodic_length, global_step)

        # ALGO LOGIC: training. One soft Bellman regression step per environment step
        if global_step > args.learning_starts:
            loss, q, grad_norm = update(rb.sample(args.batch_size))
            updates_unread += 1

            if global_step % args.log_frequency == 0:  # the only host syncs of the update (and the one below)
                skipped, updates_unread = int(nonfinite_updates), 0
                writer.add_scalar("losses/qf_loss", loss.item(), global_step)
                writer.add_scalar("losses/qf1_values", q[:, 0].mean().item(), global_step)
                writer.add_scalar("losses/qf2_values", q[:, 1].mean().item(), global_step)
                writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
                writer.add_scalar("losses/nonfinite_updates", skipped, global_step)
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

        # Bookkeeping: progress, evaluation, checkpoints
        if (global_step + 1) % args.log_frequency == 0:
            sps = (global_step + 1 - start_step) / (time.time() - start_time)
            writer.add_scalar("charts/SPS", int(sps), global_step)
            # the recent rate, not the average: random steps before learning_starts are far faster
            now = time.time()
            eta = (args.total_timesteps - global_step - 1) * (now - log_time) / args.log_frequency
            log_time = now
            print(f"step {global_step + 1}/{args.total_timesteps} | SPS {sps:.0f} | "
                  f"left {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m | episodic_return {last_return:.1f} | "
                  f"eval {last_eval:.1f}", flush=True)
        if (global_step + 1) % args.eval_frequency == 0 or global_step + 1 == args.total_timesteps:
            eval_seed = args.seed + 1_000_000 + global_step
            last_eval = float(np.mean(evaluate(flow, eval_env, args.eval_episodes, eval_seed, device)))
            writer.add_scalar("eval/return", last_eval, global_step)
            if args.eval_stochastic:  # the same initial states, sampled actions
                returns = evaluate(flow, eval_env, args.eval_episodes, eval_seed, device, stochastic=True)
                writer.add_scalar("eval/return_stochastic", float(np.mean(returns)), global_step)
            if args.save_model and last_eval > best_eval:
                save_atomic(model_checkpoint(flow, args, obs_dim, act_dim, global_step + 1),
                            f"{run_dir}/{args.exp_name}_best.cleanrl_model")
            best_eval = max(best_eval, last_eval)
        if args.checkpoint_frequency > 0 and ((global_step + 1) % args.checkpoint_frequency == 0
                                              or global_step + 1 == args.total_timesteps):
            write_checkpoint(global_step + 1)  # also at the end: resume with a larger --total-timesteps

    if args.save_model:
        path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        save_atomic(model_checkpoint(flow, args, obs_dim, act_dim, args.total_timesteps), path)
        print(f"model saved to {path}; evaluate it with --eval-checkpoint {path}")
    env.close()
    eval_env.close()
    writer.close()
    run_lock.close()  # another process may resume the run from here on
