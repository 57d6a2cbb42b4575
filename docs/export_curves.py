"""Export deterministic evaluation curves from TensorBoard runs to docs/mujoco_eval.csv.

    python docs/export_curves.py RUNS_DIR [RUNS_DIR ...] [--exp-name NAME] [--mujoco VERSION] [--merge] [--plot]

Reads every run directory named {env_id}__{exp_name}__{seed}__{time} (started by hand) or
{env_id}__{exp_name}__{seed} (docs/sweep.py) under the given folders, only those of --exp-name if
given, and writes one row per evaluation: env_id, seed, step (environment steps), eval_return (mean
of the deterministic episodes), eval_return_stochastic (the same episodes with sampled actions, for
runs with --eval-stochastic; else empty), mujoco (the MuJoCo version the run had loaded when it
made that evaluation, from the text 'versions' every start logs; a run resumed on another version
gets the new one from its resume on; --mujoco VERSION for runs that logged no versions, else empty:
MuJoCo 3.5 and later change Ant-v4 and Humanoid-v4, docs/meow.md). --merge keeps the CSV's rows of
every (env_id, seed, mujoco) not exported now, so runs made earlier stay (a row without a version is
replaced by an export of its task and seed from a run that did not log its version from the start, which
may be the same run, never by a new run); --plot then redraws the figure (docs/plot_curves.py).
Needs only tensorboard (already a run-time dependency); --plot needs matplotlib.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["env_id", "seed", "step", "eval_return", "eval_return_stochastic", "mujoco"]


def mujoco_versions(ea):
    """[(step, MuJoCo version)] from the run's 'versions' texts ("python 3.11.7, ..., mujoco 3.3.7"), by step."""
    if "versions/text_summary" not in ea.Tags()["tensors"]:
        return []
    found = []
    for event in ea.Tensors("versions/text_summary"):
        names = dict(item.rsplit(" ", 1) for item in b"".join(event.tensor_proto.string_val).decode().split(", "))
        found.append((event.step, names.get("mujoco", "")))
    return sorted(found)


def version_at(versions, step, default):
    """The version of the last start at or before this step; default for a run that logged none."""
    before = [version for start, version in versions if start <= step]
    return before[-1] if before else default

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="eval/return[_stochastic] of MEow runs -> CSV")
    parser.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR")
    parser.add_argument("--exp-name", help="only the runs of this experiment (e.g. sweep)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the CSV's rows of the tasks, seeds and MuJoCo versions not exported now")
    parser.add_argument("--mujoco", default="", metavar="VERSION",
                        help="MuJoCo version of runs that did not log their versions (started before they did)")
    parser.add_argument("--csv", default=os.path.join(HERE, "mujoco_eval.csv"), help="default: docs/mujoco_eval.csv")
    parser.add_argument("--plot", action="store_true", help="then draw the figure (next to the CSV, .png)")
    args = parser.parse_args()

    rows, source = [], {}  # source: (env_id, seed) -> the run directory it was read from
    unlogged = set()  # (env_id, seed) of runs begun before runs logged their MuJoCo version
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
            versions = mujoco_versions(ea)
            if not versions or versions[0][0] > 0:  # begun before runs logged their versions
                unlogged.add((env_id, seed))
            # logged at global_step = (steps taken) - 1; report steps taken
            rows += [(env_id, seed, e.step + 1, round(e.value, 1), stochastic.get(e.step, ""),
                      version_at(versions, e.step, args.mujoco)) for e in ea.Scalars("eval/return")]
    exported = {}  # (env_id, seed) -> the MuJoCo versions of its rows exported now
    for row in rows:
        exported.setdefault(row[:2], set()).add(row[5])

    def replaced(env_id, seed, version):
        """An old row is replaced by this export if it is of a task, seed and MuJoCo version exported now.
        A row of no recorded version is replaced only by a run begun before runs logged their version (it
        may be that run, exported again, e.g. with --mujoco): a run that logged its version from the start
        is a new run, and must not delete an older run of the same seed."""
        return version in exported.get((env_id, seed), ()) or (version == "" and (env_id, seed) in unlogged)

    kept = []
    if args.merge and os.path.exists(args.csv):
        with open(args.csv) as f:
            kept = [(r["env_id"], int(r["seed"]), int(r["step"]), float(r["eval_return"]),
                     r.get("eval_return_stochastic") or "", r.get("mujoco") or "")  # columns added later: empty
                    for r in csv.DictReader(f) if not replaced(r["env_id"], int(r["seed"]), r.get("mujoco") or "")]
    rows = sorted(rows + kept, key=lambda row: (row[0], row[5], row[1], row[2]))
    tmp = f"{args.csv}.tmp"  # write, then rename: an interrupted export leaves the old CSV
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, args.csv)
    print(f"wrote {len(rows)} rows to {args.csv} ({len(rows) - len(kept)} from {len(source)} runs, {len(kept)} kept)")
    if args.plot:
        sys.exit(subprocess.run([sys.executable, os.path.join(HERE, "plot_curves.py"), args.csv]).returncode)
