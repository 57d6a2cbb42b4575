"""Export deterministic evaluation curves from TensorBoard runs to docs/mujoco_eval.csv.

    python docs/export_curves.py RUNS_DIR [RUNS_DIR ...] [--exp-name NAME] [--merge] [--plot]

Reads every run directory named {env_id}__{exp_name}__{seed}__{time} (started by hand) or
{env_id}__{exp_name}__{seed} (docs/sweep.py) under the given folders, only those of --exp-name if
given, and writes one row per evaluation: env_id, seed, step (environment steps), eval_return (mean
of the deterministic episodes), eval_return_stochastic (the same episodes with sampled actions, for
runs with --eval-stochastic; else empty). --merge keeps the CSV's rows of every (env_id, seed) not
exported now, so runs made earlier stay; --plot then redraws the figure (docs/plot_curves.py). Needs only
tensorboard (already a run-time dependency); --plot needs matplotlib.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="eval/return[_stochastic] of MEow runs -> CSV")
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR")
    parser.add_argument("--exp-name", help="only the runs of this experiment (e.g. sweep)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the CSV's rows of the tasks and seeds not exported now")
    parser.add_argument("--csv", default=os.path.join(HERE, "mujoco_eval.csv"), help="default: docs/mujoco_eval.csv")
    parser.add_argument("--plot", action="store_true", help="then draw the figure (next to the CSV, .png)")
    args = parser.parse_args()

    rows, source = [], {}  # source: (env_id, seed) -> the run directory it was read from
    for folder in args.runs_dirs:
        for run_dir in sorted(glob.glob(os.path.join(folder, "*__*__*"))):
            parts = os.path.basename(run_dir).split("__")
            if not os.path.isdir(run_dir) or len(parts) not in (3, 4) or not parts[2].isdigit():
                continue
            env_id, exp_name, seed = parts[0], parts[1], int(parts[2])
            if args.exp_name is not None and exp_name != args.exp_name:
                continue
            ea = EventAccumulator(run_dir)
            ea.Reload()
            if "eval/return" not in ea.Tags()["scalars"]:
                continue
            if (env_id, seed) in source:
                sys.exit(f"error: two runs of {env_id} seed {seed}: {source[env_id, seed]} and {run_dir} "
                         "(choose one with --exp-name or the folders given)")
            source[env_id, seed] = run_dir
            stochastic = {e.step: round(e.value, 1) for e in ea.Scalars("eval/return_stochastic")} \
                if "eval/return_stochastic" in ea.Tags()["scalars"] else {}
            # logged at global_step = (steps taken) - 1; report steps taken
            rows += [(env_id, seed, e.step + 1, round(e.value, 1), stochastic.get(e.step, ""))
                     for e in ea.Scalars("eval/return")]
    kept = []
    if args.merge and os.path.exists(args.csv):
        with open(args.csv) as f:
            kept = [(r["env_id"], int(r["seed"]), int(r["step"]), float(r["eval_return"]),
                     r.get("eval_return_stochastic") or "")  # a CSV written before the column existed
                    for r in csv.DictReader(f) if (r["env_id"], int(r["seed"])) not in source]
    rows = sorted(rows + kept, key=lambda row: row[:3])
    tmp = f"{args.csv}.tmp"  # write, then rename: an interrupted export leaves the old CSV
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "seed", "step", "eval_return", "eval_return_stochastic"])
        writer.writerows(rows)
    os.replace(tmp, args.csv)
    print(f"wrote {len(rows)} rows to {args.csv} ({len(rows) - len(kept)} from {len(source)} runs, {len(kept)} kept)")
    if args.plot:
        sys.exit(subprocess.run([sys.executable, os.path.join(HERE, "plot_curves.py"), args.csv]).returncode)
