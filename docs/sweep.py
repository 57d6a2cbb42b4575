"""Run the paper's MuJoCo sweep (env ids x seeds) on this machine, or as one Slurm array job.

    python docs/sweep.py --env-ids Hopper-v4 Walker2d-v4 --seeds 1 2 3 4 5            # here, one run per core
    python docs/sweep.py --slurm --partition cpu --time-min 1440 --mem-gb 8           # all five tasks x seeds 1-5
    python docs/sweep.py --env-ids Hopper-v4 --seeds 1 2 -- --total-timesteps 250000  # flags after -- go to the script

Each run is `ebflow_continuous_action.py` with the paper's settings for its task (PAPER_SETTINGS below;
flags after `--` are passed through and replace a setting of the same name), in the fixed directory
runs/{env_id}__{exp_name}__{seed}, writing a checkpoint every --checkpoint-frequency steps. A run whose
directory holds a checkpoint continues from it, so a requeued job, or the same command started again,
picks up where the run stopped, and finished runs are skipped. One log per run, with the console
output of every attempt: runs/sweeps/{exp_name}/{run_name}.log.

Built on submitit (`pip install submitit`, needed only here): its Slurm executor submits the runs as
one array job and, on time-out or pre-emption, checkpoints and requeues it (see TrainRun); its local
executor runs the same jobs on this machine, and a thread pool from the standard library keeps at most
--max-parallel of them running at once (submitit's local executor starts every job it is given).
Then `python docs/export_curves.py runs --exp-name sweep --merge --plot` rebuilds the CSV and figure.
"""
import fcntl
import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

try:
    import submitit
except ImportError:
    sys.exit("error: docs/sweep.py needs submitit: pip install submitit")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ebflow_continuous_action.py")

# The paper's per-task settings (arXiv:2405.13629, Fig. 3); tests/test_sweep.py checks the README's against them
PAPER_SETTINGS = {
    "Hopper-v4":
        dict(total_timesteps=1_500_000, tau=0.005, alpha=0.25, learning_starts=5_000, sigma_max=-0.3, sigma_min=-5.0),
    "HalfCheetah-v4":
        dict(total_timesteps=1_500_000, tau=0.003, alpha=0.25, learning_starts=10_000, sigma_max=2.0, sigma_min=-5.0),
    "Walker2d-v4":
        dict(total_timesteps=4_000_000, tau=0.005, alpha=0.1, learning_starts=10_000, sigma_max=-0.3, sigma_min=-5.0),
    "Ant-v4":
        dict(total_timesteps=4_000_000, tau=0.0001, alpha=0.05, learning_starts=5_000, sigma_max=-0.3, sigma_min=-5.0),
    "Humanoid-v4":
        dict(total_timesteps=5_000_000, tau=0.0005, alpha=0.125, learning_starts=5_000, sigma_max=-0.3, sigma_min=-5.0),
}
# flags the launcher sets itself for every run
OWN_FLAGS = ["--env-id", "--seed", "--exp-name", "--run-name", "--resume", "--checkpoint-frequency"]


@dataclass
class SweepArgs:
    env_ids: List[str] = field(default_factory=lambda: list(PAPER_SETTINGS))
    """the tasks (each runs with its PAPER_SETTINGS)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """the seeds, one run per task and seed"""
    exp_name: str = "sweep"
    """runs go to runs/{env_id}__{exp_name}__{seed}, logs to runs/sweeps/{exp_name}/"""
    checkpoint_frequency: int = 10_000
    """write a checkpoint every N steps: a requeued or restarted run continues from the last one"""
    cpus_per_run: int = 1
    """CPU cores (and torch threads, OMP_NUM_THREADS) per run"""
    max_parallel: Optional[int] = None
    """at most this many runs at once; unset: here, cores // cpus-per-run; on Slurm, all"""
    slurm: bool = False
    """submit one Slurm array job instead of running here"""
    partition: Optional[str] = None
    """Slurm partition; unset: the cluster's default partition"""
    gpus_per_run: int = 0
    """GPUs per run (Slurm)"""
    mem_gb: Optional[float] = None
    """memory per run in GB (Slurm; the replay buffer needs 0.1 GB on Hopper-v4, 3.1 GB on Humanoid-v4)"""
    time_min: int = 1440
    """Slurm time limit per job in minutes; a job that reaches it checkpoints and requeues itself"""
    max_timeouts: int = 50
    """requeue a run after at most this many time-outs (pre-emptions do not count)"""
    wait: bool = False
    """with --slurm: wait for the array and print the summary (otherwise submit and exit)"""


def flag_given(flag, argv):
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(flag, argv):
    """The value of the last `--flag V` or `--flag=V` in argv (None if absent)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def run_command(env_id, seed, sweep, extra):
    """The script's command line for one run: the paper's settings, then the passed-through flags."""
    cmd = [sys.executable, SCRIPT, "--env-id", env_id, "--seed", str(seed), "--exp-name", sweep.exp_name,
           "--run-name", f"{env_id}__{sweep.exp_name}__{seed}",
           "--checkpoint-frequency", str(sweep.checkpoint_frequency)]
    for key, value in PAPER_SETTINGS[env_id].items():
        flag = "--" + key.replace("_", "-")
        if not flag_given(flag, extra):  # a passed-through flag replaces the paper's value
            cmd += [flag, str(value)]
    return cmd + extra


class TrainRun(submitit.helpers.Checkpointable):
    """One training run as a submitit job: the script in a subprocess, resumed from its checkpoint if any.

    Time-out and pre-emption on Slurm: submitit asks Slurm to send SIGUSR2 90 s before the time limit;
    its handler in this job process calls checkpoint() (Checkpointable's: resubmit this same object),
    requeues the job and exits, which kills the training process. Pre-emption and `scontrol requeue`
    end the job with SIGTERM, then SIGKILL. Either way the requeued job calls this object again, and it
    finds runs/{run_name}/checkpoint.pt: the training state is in the script's checkpoint, not here.
    """

    def __init__(self, run_name, cmd, workdir, log, env, slurm):
        self.run_name, self.cmd, self.workdir, self.log, self.env = run_name, cmd, workdir, log, env
        self.slurm = slurm

    def __call__(self):
        run_dir = os.path.join(self.workdir, "runs", self.run_name)
        cmd = list(self.cmd)
        holder = training_elsewhere(run_dir)  # e.g. a local sweep killed and started again: its run goes on
        if holder:
            raise RuntimeError(f"{run_dir} is being trained by another process ({holder})")
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            import torch  # only to read the step; mmap leaves the (large) buffer on disk

            try:
                step = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", mmap=True,
                                  weights_only=True)["train_state"]["global_step"]
            except Exception:  # not a checkpoint we can read: the script's --resume says why, in the log
                step = -1
            if step >= int(flag_value("--total-timesteps", cmd)):
                return f"complete (checkpoint at step {step})"
            cmd += ["--resume", run_dir]
        elif os.path.exists(run_dir):
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to resume, start again
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}

        def ignore_stop_signals():
            # Slurm signals every process of the job; the training process ignores both signals. SIGUSR2 is
            # for submitit's handler in this job process (above), which then ends the training process.
            # SIGTERM submitit ignores too, so both end by the SIGKILL that follows, and no result is
            # recorded for a run that Slurm requeues. Here (local) nothing requeues: `kill` must stop a run.
            if self.slurm:
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

        with open(self.log, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=ignore_stop_signals).returncode
        if rc != 0:
            raise RuntimeError(f"exit status {rc}")
        return "finished" if "--resume" not in cmd else "finished (resumed)"


def training_elsewhere(run_dir):
    """The holder ("pid N on HOST") of runs/{run}/train.lock while a training process holds it (the scripts'
    lock_run), else None: a run must not be started again, or its directory removed, while it trains."""
    try:
        with open(os.path.join(run_dir, "train.lock")) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return lock.read().strip()[:100] or "its pid not written yet"
    except OSError:  # no lock file (never trained here), or a file system without locks
        pass
    return None


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def summarize(outcomes):
    """outcomes: [(TrainRun, job)]; prints one line per run, returns the number of failed runs."""
    failed = 0
    errors = [job.exception() for _, job in outcomes]  # waits for every job
    print(f"\n{'run':<40} result")
    for (run, job), error in zip(outcomes, errors):
        if error is None:
            print(f"{run.run_name:<40} {job.result()}")
        else:
            failed += 1
            # submitit's message holds the job's traceback between two dashed lines: keep its last line
            parts = str(error).split("-" * 22)
            reason = (parts[1] if len(parts) > 2 else parts[0]).strip().splitlines()[-1 if len(parts) > 2 else 0]
            print(f"{run.run_name:<40} FAILED: {reason.strip()[:120]}; log: {run.log}")
    print(f"{len(outcomes) - failed} of {len(outcomes)} runs succeeded")
    return failed


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    sweep = tyro.cli(SweepArgs, args=argv[: argv.index("--")] if "--" in argv else argv, description=__doc__)
    unknown = [e for e in sweep.env_ids if e not in PAPER_SETTINGS]
    if unknown:
        fail(f"no paper settings for {', '.join(unknown)}; known tasks: {', '.join(PAPER_SETTINGS)}")
    owned = [f for f in OWN_FLAGS if flag_given(f, extra)]
    if owned:
        fail(f"the launcher sets {', '.join(owned)} itself "
             "(use --env-ids, --seeds, --exp-name, --checkpoint-frequency)")
    if sweep.checkpoint_frequency <= 0 or sweep.cpus_per_run <= 0 or (sweep.max_parallel or 1) <= 0:
        fail("--checkpoint-frequency, --cpus-per-run and --max-parallel must be positive")
    if "/" in sweep.exp_name or "__" in sweep.exp_name or not sweep.exp_name:
        fail(f"--exp-name must be a plain name without '/' or '__', got {sweep.exp_name!r}")
    if sweep.slurm and shutil.which("sbatch") is None:
        fail("--slurm needs Slurm's sbatch on PATH")

    workdir = os.getcwd()
    log_dir = os.path.join(workdir, "runs", "sweeps", sweep.exp_name)
    os.makedirs(log_dir, exist_ok=True)
    # one thread per core given to a run; in local mode, restore the GPUs that submitit's local
    # executor hides (it sets CUDA_VISIBLE_DEVICES to the GPUs requested from it: none)
    env = {"OMP_NUM_THREADS": str(sweep.cpus_per_run)}
    if not sweep.slurm:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    runs = []
    for env_id in sweep.env_ids:
        for seed in sweep.seeds:
            name = f"{env_id}__{sweep.exp_name}__{seed}"
            runs.append(TrainRun(name, run_command(env_id, seed, sweep, extra), workdir,
                                 os.path.join(log_dir, f"{name}.log"), env, sweep.slurm))

    executor = submitit.AutoExecutor(folder=os.path.join(log_dir, "submitit"),
                                     cluster="slurm" if sweep.slurm else "local",
                                     slurm_max_num_timeout=sweep.max_timeouts)
    if sweep.slurm:
        # a second array on the same run directories would train each run twice at once
        queued = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-n", f"meow-{sweep.exp_name}", "-o", "%F"],
                                capture_output=True, text=True).stdout.split()
        if queued:
            fail(f"array job {queued[0]} (meow-{sweep.exp_name}) is still queued or running: "
                 "wait for it, or scancel it")
        executor.update_parameters(
            name=f"meow-{sweep.exp_name}", timeout_min=sweep.time_min, cpus_per_task=sweep.cpus_per_run,
            mem_gb=sweep.mem_gb, gpus_per_node=sweep.gpus_per_run or None, slurm_partition=sweep.partition,
            slurm_array_parallelism=sweep.max_parallel or len(runs),
            slurm_additional_parameters={"requeue": True})  # pre-emption may requeue it (JobRequeue=0 clusters)
        jobs = executor.submit_array(runs)  # one array job, one task per run
        print(f"submitted array job {jobs[0].job_id.split('_')[0]} ({len(runs)} runs); logs in {log_dir}", flush=True)
        if not sweep.wait:
            sys.exit(0)
        outcomes = list(zip(runs, jobs))
    else:
        # submitit's local executor stops a job after timeout_min (default 2): runs here last days
        executor.update_parameters(timeout_min=10**7)
        max_parallel = sweep.max_parallel or max(1, (os.cpu_count() or 1) // sweep.cpus_per_run)
        print(f"{len(runs)} runs, at most {max_parallel} at once; logs in {log_dir}", flush=True)

        def submit_and_wait(run):
            job = executor.submit(run)
            job.wait()
            print(f"{run.run_name}: {'FAILED' if job.exception() else 'done'}", flush=True)
            return run, job

        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            outcomes = list(pool.map(submit_and_wait, runs))
    sys.exit(1 if summarize(outcomes) else 0)
