"""Speed benchmark (not collected by pytest): python tests/benchmark_speed.py [--steps N] [--no-loop] [--device D]
                                             [--authors-script PATH [--authors-python PYTHON]]

Prints, for a fixed seed and Hopper-v4 shapes (obs 11, action 3, batch 256):
  * ms per update (median of interleaved rounds): the script's update (eager and torch.compile) and, in the same run, the
    straightforward evaluation of tests/meow_reference.py (V by a full pass of a zero action
    through the flow, both shift heads by doubling the batch, default Adam, Polyak by a Python
    loop over all parameters): what the authors' code does;
  * ms per action (batch of one observation, no autograd), eager and compiled;
  * whole-loop steps/s of `ebflow_continuous_action.py` on Hopper-v4 (short runs, eager and --compile
    side by side, time-sliced as described below);
on CPU, and on CUDA when present. Ratios are measured side by side in this one run.

With --authors-script (the authors' `meow_continuous_action.py` from their repository, run by
--authors-python: an interpreter with what it needs, e.g. gymnasium 0.29 and stable-baselines3), it
also times whole training processes of that script and of this one (eager and --compile) on
Hopper-v4 with the same settings: steps per second once updates run, from the wall-clock times of the
`losses/qf_loss` TensorBoard events both scripts write every 1,000 steps. The three processes run side
by side, time-sliced (one runs for half a second while the others are stopped, in turn), and only the
time each one ran counts, so the machine's slow spells fall on all three alike. Runs in rounds and
reports the median round's ratios.
"""
import argparse
import glob
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ebflow_continuous_action as meow  # noqa: E402
import meow_reference as ref  # noqa: E402

OBS_DIM, ACT_DIM, BATCH = 11, 3, 256


def make_setup(device, seed=0):
    torch.manual_seed(seed)
    flow = meow.EBFlowPolicy(OBS_DIM, ACT_DIM, 0.25, -5.0, -0.3).to(device)
    target = meow.EBFlowPolicy(OBS_DIM, ACT_DIM, 0.25, -5.0, -0.3).to(device)
    target.load_state_dict(flow.state_dict())
    target.eval()
    rb = meow.ReplayBuffer(10_000, OBS_DIM, ACT_DIM, device)
    for _ in range(10_000):
        rb.add(torch.randn(OBS_DIM), torch.rand(ACT_DIM) * 2 - 1, torch.randn(()).item(), torch.randn(OBS_DIM), 0.0)
    return flow, target, rb


def fast_update_fn(flow, target, compiled):
    """The script's own update (make_update), eager or compiled."""
    update, _, _ = meow.make_update(flow, target, meow.Args(), compile=compiled)
    return update


def straightforward_update_fn(flow, target):
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    def update(data):
        loss = ref.reference_loss(flow, target, *data, 0.99)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 30.0)
        opt.step()
        with torch.no_grad():
            for p, tp in zip(flow.parameters(), target.parameters()):
                tp.data.copy_(0.005 * p.data + (1 - 0.005) * tp.data)
        return loss

    return update


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, n, device, warmup=20):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n * 1e3


def bench_updates(device, n, rounds=5):
    """Interleaved: each round times n // rounds updates of every variant in turn; the median round is kept,
    so a slow spell of the shared machine does not land on one variant only."""
    variants = {}
    for name in ["straightforward", "eager", "compile"]:
        flow, target, rb = make_setup(device)
        upd = straightforward_update_fn(flow, target) if name == "straightforward" else \
            fast_update_fn(flow, target, compiled=(name == "compile"))
        variants[name] = (upd, rb)
        time_ms(lambda: upd(rb.sample(BATCH)), 1, device, warmup=30)  # compile and warm up outside the timing
    times = {name: [] for name in variants}
    torch.manual_seed(1)
    for _ in range(rounds):
        for name, (upd, rb) in variants.items():
            times[name].append(time_ms(lambda: upd(rb.sample(BATCH)), max(n // rounds, 1), device, warmup=2))
    return {name: statistics.median_high(t) for name, t in times.items()}


def bench_act(device, n):
    out = {}
    for name in ["eager", "compile"]:
        flow, _, _ = make_setup(device)
        flow.eval()
        # as the training loop acts: CUDA graphs on GPU, no autograd
        act = meow.compile_fn(flow.sample, device) if name == "compile" else flow.sample
        obs = torch.randn(OBS_DIM).numpy()

        def step():
            with torch.no_grad():
                return act(torch.as_tensor(obs, device=device)[None])[0].cpu().numpy()

        out[name] = time_ms(step, n, device)
    return out


def training_cmd(total, learning_starts, device, compiled):
    """Arguments of a Hopper-v4 training run of this script, seed 1, no evaluation during the run, losses
    logged every 1,000 steps (time_sliced_sps reads the wall-clock times of those events)."""
    return [os.path.join(ROOT, "ebflow_continuous_action.py"), "--env-id", "Hopper-v4", "--seed", "1",
            "--total-timesteps", str(total), "--learning-starts", str(learning_starts),
            "--log-frequency", "1000", "--eval-frequency", str(10 * total), "--exp-name", "benchmark",
            "--cuda" if device.type == "cuda" else "--no-cuda"] + (["--compile"] if compiled else [])


def bench_loop(device, steps):
    """Whole training loop (act, simulator step, buffer, update) of this script, eager and --compile, run
    side by side time-sliced (time_sliced_sps): steps/s from step 2,000 to `steps`, learning from step
    1,000 (start-up and compilation are not counted)."""
    variants = {name: (sys.executable, training_cmd(steps + 1, 1000, device, compiled=(name == "compile")))
                for name in ["eager", "compile"]}
    return time_sliced_sps(variants, 2000, steps)


def time_sliced_sps(variants, first, last, slice_s=0.5):
    """Runs the training processes {name: (python, args)} side by side but one at a time: each runs in
    turn for `slice_s` seconds while the others are stopped (SIGSTOP/SIGCONT to its process group, so
    torch.compile's worker processes stop too). Returns each one's steps/s between its qf_loss events at
    steps `first` and `last`, counting only the time it was running. A slow spell of this shared machine
    then falls on all of them alike instead of on whichever ran during it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        procs, running = {}, {name: [] for name in variants}
        for name, (python, cmd) in variants.items():
            os.makedirs(f"{tmp}/{name}")
            with open(f"{tmp}/{name}.err", "w") as err:  # the child keeps its own copy of the handle
                procs[name] = subprocess.Popen([python] + cmd, cwd=f"{tmp}/{name}", stdout=subprocess.DEVNULL,
                                               stderr=err, start_new_session=True)
            os.killpg(procs[name].pid, signal.SIGSTOP)
        try:
            while any(p.poll() is None for p in procs.values()):
                for name, p in procs.items():
                    if p.poll() is None:
                        t0 = time.time()
                        os.killpg(p.pid, signal.SIGCONT)
                        time.sleep(slice_s)
                        os.killpg(p.pid, signal.SIGSTOP)  # a finished process is a zombie until polled: no error
                        running[name].append((t0, time.time()))
        finally:  # interrupted: leave no stopped process behind
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        sps = {}
        for name, p in procs.items():
            if p.returncode != 0:
                with open(f"{tmp}/{name}.err") as f:
                    err = f.read().strip().splitlines() or ["?"]
                raise SystemExit(f"{name} run failed: {err[-1]}")
            acc = EventAccumulator(glob.glob(f"{tmp}/{name}/runs/*")[0])
            acc.Reload()
            wall = {e.step: e.wall_time for e in acc.Scalars("losses/qf_loss")}
            w0, w1 = wall[first], wall[last]
            ran = sum(max(0.0, min(b, w1) - max(a, w0)) for a, b in running[name])
            sps[name] = (last - first) / ran
    return sps


def bench_vs_authors(script, python, rounds, learning_starts=1000, total=6001):
    """Whole-process steps/s of the authors' script and of this one (eager, --compile), same Hopper-v4
    settings (their defaults: batch 256, lr 1e-3, tau 0.005, buffer 1e6; seed 1), time-sliced side by
    side (time_sliced_sps) in each of `rounds` rounds; the median round is reported."""
    first, last = learning_starts + 1000, total - 1  # whole 1,000-step intervals with updates only
    print(f"whole training process, Hopper-v4, CPU, {torch.get_num_threads()} threads: steps/s from step "
          f"{first:,} to {last:,} (learning starts at {learning_starts:,}), {rounds} rounds of authors / eager / --compile")
    cpu = torch.device("cpu")
    # (the authors' script evaluates every 10,000 steps: keep total <= 10,001)
    authors = [script, "--env-id", "Hopper-v4", "--seed", "1", "--total-timesteps", str(total),
               "--learning-starts", str(learning_starts), "--no-cuda"]
    variants = {"authors": (python, authors),
                "eager": (sys.executable, training_cmd(total, learning_starts, cpu, compiled=False)),
                "compile": (sys.executable, training_cmd(total, learning_starts, cpu, compiled=True))}
    ratios = {"eager": [], "compile": []}
    for r in range(rounds):
        sps = time_sliced_sps(variants, first, last)
        for name in ratios:
            ratios[name].append(sps[name] / sps["authors"])
        print(f"  round {r + 1}: steps/s authors {sps['authors']:.0f} | eager {sps['eager']:.0f} "
              f"({ratios['eager'][-1]:.2f}x) | compile {sps['compile']:.0f} ({ratios['compile'][-1]:.2f}x)", flush=True)
    return {name: statistics.median_high(v) for name, v in ratios.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--steps", type=int, default=6000, help="whole-loop runs: timed from step 2,000 to this one")
    p.add_argument("--no-loop", action="store_true", help="skip the whole-loop runs")
    p.add_argument("--authors-script", help="the authors' meow_continuous_action.py: time it against this script")
    p.add_argument("--authors-python", default=sys.executable, help="interpreter for --authors-script")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the --authors-script comparison")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="time only this device (all: the CPU, and CUDA when present)")
    cli = p.parse_args()
    if cli.steps <= 2000:
        p.error("--steps must be above 2,000 (the whole-loop runs are timed from step 2,000)")
    if cli.authors_script:
        r = bench_vs_authors(os.path.abspath(cli.authors_script), cli.authors_python, cli.rounds)
        print(f"[cpu] whole process, median round: eager {r['eager']:.2f}x the authors' steps/s, "
              f"--compile {r['compile']:.2f}x")
        sys.exit()
    if cli.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    devices = [torch.device(d) for d in ("cpu", "cuda") if cli.device in ("all", d)
               and (d == "cpu" or torch.cuda.is_available())]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU: {os.cpu_count()} cores" + (f", GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    for device in devices:
        u = bench_updates(device, cli.updates)
        print(f"[{device.type}] ms per update (batch {BATCH}): straightforward {u['straightforward']:.2f} | "
              f"eager {u['eager']:.2f} | compile {u['compile']:.2f}")
        print(f"[{device.type}] speed-up vs straightforward: eager {u['straightforward'] / u['eager']:.2f}x | "
              f"compile {u['straightforward'] / u['compile']:.2f}x; compile vs eager {u['eager'] / u['compile']:.2f}x")
        a = bench_act(device, 1000)
        print(f"[{device.type}] ms per action: eager {a['eager']:.3f} | compile {a['compile']:.3f}")
        if not cli.no_loop:
            sps = bench_loop(device, cli.steps)
            print(f"[{device.type}] whole loop, steps/s from step 2,000 to {cli.steps:,} (side by side): "
                  f"eager {sps['eager']:.0f} | compile {sps['compile']:.0f} ({sps['compile'] / sps['eager']:.2f}x)")
