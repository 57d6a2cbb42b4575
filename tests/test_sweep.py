"""docs/sweep.py: the paper's settings table, local sweeps end to end, a real Slurm with a forced requeue."""
import csv
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import ROOT, hold_lock, read_tensorboard, run_script

submitit = pytest.importorskip("submitit", reason="docs/sweep.py needs submitit (tests/requirements.txt)")

spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "docs", "sweep.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

# These runs render nothing: glfw needs no display until a window opens (osmesa needs libosmesa6).
ENV = {"OMP_NUM_THREADS": "1", "MUJOCO_GL": "glfw"}
# a few hundred steps, an evaluation every EVAL steps
EVAL = 100
TINY = ["--learning-starts", 50, "--eval-frequency", EVAL, "--eval-episodes", 1, "--batch-size", 32,
        "--buffer-size", 2000, "--no-cuda", "--eval-stochastic"]


def readme_settings():
    """{env_id: {flag: value}} from the README's per-task commands (section "Reproducing the paper")."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    settings = {}
    for line in block.strip().splitlines():
        words = shlex.split(line)
        assert words[:2] == ["python", "ebflow_continuous_action.py"], line
        flags = dict(zip(words[2::2], words[3::2]))
        env_id = flags.pop("--env-id")
        settings[env_id] = {f[2:].replace("-", "_"): float(v) for f, v in flags.items()}
    return settings


def test_readme_commands_show_the_sweep_table():
    table = {env: {k: float(v) for k, v in s.items()} for env, s in sweep.PAPER_SETTINGS.items()}
    assert readme_settings() == table


def test_passed_through_flags_replace_the_paper_setting_and_launcher_flags_are_refused(tmp_path):
    args = sweep.SweepArgs(exp_name="x", checkpoint_frequency=500)
    cmd = sweep.run_command("Walker2d-v4", 3, args, ["--total-timesteps=1000", "--compile"])
    assert sweep.flag_value("--total-timesteps", cmd) == "1000" and "4000000" not in cmd
    assert sweep.flag_value("--alpha", cmd) == "0.1" and cmd[-1] == "--compile"
    assert sweep.flag_value("--run-name", cmd) == "Walker2d-v4__x__3"
    assert sweep.flag_value("--checkpoint-frequency", cmd) == "500"
    out = run_script("docs/sweep.py", "--env-ids", "Hopper-v4", "--", "--seed", 4, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--seed" in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_run_name_must_not_exist_yet(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    out = run_script("ebflow_continuous_action.py", "--run-name", "taken", "--total-timesteps", 10, cwd=tmp_path,
                     env=ENV)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and "--resume runs/taken" in errors[0], out.stderr
    assert os.listdir(tmp_path / "runs" / "taken") == []


def eval_steps(run_dir):
    return [step + 1 for step, _ in read_tensorboard(str(run_dir))[0]["eval/return"]]


def test_local_sweep_runs_checks_exit_status_exports_and_skips_finished_runs(tmp_path):
    # seed 3 finds a broken checkpoint in its directory: its run fails, the two others must not
    (tmp_path / "runs" / "Hopper-v4__sweep__3").mkdir(parents=True)
    (tmp_path / "runs" / "Hopper-v4__sweep__3" / "checkpoint.pt").write_text("not a checkpoint")
    steps = 2 * EVAL
    out = run_script("docs/sweep.py", "--env-ids", "Hopper-v4", "--seeds", 1, 2, 3, "--max-parallel", 2,
                     "--checkpoint-frequency", EVAL, "--", "--total-timesteps", steps, *TINY, cwd=tmp_path, env=ENV)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = out.stdout.split("result\n", 1)[1]
    for seed in (1, 2):
        assert re.search(rf"Hopper-v4__sweep__{seed} +finished\n", summary), summary
    assert re.search(r"Hopper-v4__sweep__3 +FAILED: .*exit status 2", summary), summary
    assert "2 of 3 runs succeeded" in summary
    logs = tmp_path / "runs" / "sweeps" / "sweep"
    assert "not a usable checkpoint of" in (logs / "Hopper-v4__sweep__3.log").read_text()
    for seed in (1, 2):
        assert eval_steps(tmp_path / "runs" / f"Hopper-v4__sweep__{seed}") == list(range(EVAL, steps + 1, EVAL))
        assert f"--seed {seed} " in (logs / f"Hopper-v4__sweep__{seed}.log").read_text()

    # the CSV: both seeds from the sweep; rows of other runs kept, among them an older seed-1 run with no
    # recorded MuJoCo version (the sweep's runs log theirs from the start, so they are new runs)
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("env_id,seed,step,eval_return\nHopper-v4,1,999999,1.0\nWalker2d-v4,1,10000,123.4\n")
    export = run_script("docs/export_curves.py", "runs", "--exp-name", "sweep", "--merge", "--csv", csv_path,
                        cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    rows = list(csv.DictReader(open(csv_path)))
    got = sorted((r["env_id"], int(r["seed"]), int(r["step"])) for r in rows)
    assert got == sorted([("Hopper-v4", s, k) for s in (1, 2) for k in range(EVAL, steps + 1, EVAL)]
                         + [("Hopper-v4", 1, 999999), ("Walker2d-v4", 1, 10000)])
    tb = read_tensorboard(str(tmp_path / "runs" / "Hopper-v4__sweep__2"))[0]
    for column, tag in [("eval_return", "eval/return"), ("eval_return_stochastic", "eval/return_stochastic")]:
        logged = dict(tb[tag])
        expected = [round(logged[k - 1], 1) for k in range(EVAL, steps + 1, EVAL)]  # logged at steps taken - 1
        assert [float(r[column]) for r in rows if r["seed"] == "2"] == expected
    assert [r["eval_return_stochastic"] for r in rows if r["env_id"] == "Walker2d-v4"] == [""]  # kept, had none
    # the MuJoCo version each run logged at its start, as the test process imports it
    mujoco = importlib.import_module("mujoco")
    assert {r["mujoco"] for r in rows if r["env_id"] == "Hopper-v4" and r["step"] != "999999"} == {mujoco.__version__}

    # the same sweep again: finished runs are recognised from their checkpoints and not run again
    ckpt = tmp_path / "runs" / "Hopper-v4__sweep__1" / "checkpoint.pt"
    mtime = ckpt.stat().st_mtime_ns
    again = run_script("docs/sweep.py", "--env-ids", "Hopper-v4", "--seeds", 1, "--checkpoint-frequency", EVAL,
                       "--", "--total-timesteps", steps, *TINY, cwd=tmp_path, env=ENV)
    assert again.returncode == 0 and f"complete (checkpoint at step {steps})" in again.stdout, again.stdout
    assert ckpt.stat().st_mtime_ns == mtime


def slurm_unavailable():
    if shutil.which("sbatch") is None:
        return "no Slurm here (sbatch not on PATH; .ci/slurm-up starts a one-node Slurm as root)"
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if up.returncode != 0 or not any(state in up.stdout for state in ("idle", "mixed")):
        return f"Slurm is installed but no node is up: {(up.stderr or up.stdout).strip()[:100]}"
    return None


def test_slurm_array_requeued_after_preemption_or_time_out_resumes_to_the_full_step_count(tmp_path):
    missing = slurm_unavailable()
    if missing and os.environ.get("CI_EXPECT_SLURM") == "1":  # CI started a Slurm (.ci/run): not finding it fails
        pytest.fail(f"CI_EXPECT_SLURM=1 but {missing}")
    if missing:
        pytest.skip(missing)
    # the runs must outlive Slurm's KillWait (5 s, .ci/slurm-up) after the first checkpoint: a requeued run
    # ignores SIGTERM until the SIGKILL, and one that finishes in that grace time has nothing to resume
    steps, ckpt_every = 30 * EVAL, 2 * EVAL
    launcher = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "docs", "sweep.py"), "--slurm", "--wait", "--env-ids", "Hopper-v4",
         "--seeds", "1", "2", "--checkpoint-frequency", str(ckpt_every), "--time-min", "10", "--",
         "--total-timesteps", str(steps), *map(str, TINY)],
        cwd=tmp_path, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        job_id = re.match(r"submitted array job (\d+)", launcher.stdout.readline()).group(1)
        twice = run_script("docs/sweep.py", "--slurm", "--env-ids", "Hopper-v4", cwd=tmp_path)
        assert twice.returncode == 2 and f"array job {job_id} " in twice.stderr, twice.stderr
        # as soon as each run has written its first checkpoint, while it is still running: requeue seed 1
        # (array task 0) as a pre-emption does, and send seed 2 the signal Slurm sends before the time limit
        interrupt = {1: ["scontrol", "requeue", f"{job_id}_0"], 2: ["scancel", "--signal=USR2", f"{job_id}_1"]}
        deadline = time.time() + 120
        while interrupt and time.time() < deadline:
            for seed in list(interrupt):
                if (tmp_path / "runs" / f"Hopper-v4__sweep__{seed}" / "checkpoint.pt").exists():
                    subprocess.run(interrupt.pop(seed), check=True)
            time.sleep(0.02)
        out, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            subprocess.run(["scancel", job_id])
    assert launcher.returncode == 0, out
    # seed 2 went through submitit's time-out handler: checkpoint() and a requeue by the job itself
    submitit_log = tmp_path / "runs" / "sweeps" / "sweep" / "submitit" / f"{job_id}_1_0_log.err"
    assert "Caught signal SIGUSR2" in submitit_log.read_text()
    for seed in (1, 2):
        assert re.search(rf"Hopper-v4__sweep__{seed} +finished \(resumed\)", out), out
        log = (tmp_path / "runs" / "sweeps" / "sweep" / f"Hopper-v4__sweep__{seed}.log").read_text()
        resumed_at = int(re.search(r"resumed \S+ at step (\d+)", log).group(1))
        assert log.count("==== ") == 2 and 0 < resumed_at < steps and resumed_at % ckpt_every == 0
        run_dir = tmp_path / "runs" / f"Hopper-v4__sweep__{seed}"
        assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["global_step"] == steps
        # every evaluation once: the requeued run's events after its checkpoint were purged
        assert eval_steps(run_dir) == list(range(EVAL, steps + 1, EVAL))


@pytest.mark.parametrize("slurm", [False, True])
def test_only_a_slurm_run_ignores_sigterm(tmp_path, slurm):
    # on Slurm the training process outlives SIGTERM until the SIGKILL (a requeue); here `kill` must stop it
    sends_itself_sigterm = "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(1)"
    run = sweep.TrainRun("r", [sys.executable, "-c", sends_itself_sigterm], str(tmp_path), str(tmp_path / "r.log"),
                         {}, slurm)
    if slurm:
        assert run() == "finished"
    else:
        with pytest.raises(RuntimeError, match=f"exit status -{signal.SIGTERM.value}"):
            run()


def test_a_run_that_trains_is_neither_removed_nor_started_again(tmp_path):
    # a local sweep killed while its run trains on (before its first checkpoint), then started again
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    with hold_lock(run_dir / "train.lock", "pid 4242 on elsewhere\n"):  # as a training process holds it
        run = sweep.TrainRun("r", [sys.executable, "-c", "pass"], str(tmp_path), str(tmp_path / "r.log"), {}, False)
        with pytest.raises(RuntimeError, match=r"is being trained by another process \(pid 4242 on elsewhere\)"):
            run()
        assert os.listdir(run_dir) == ["train.lock"] and not (tmp_path / "r.log").exists()
    assert run() == "finished"  # once that process has ended
