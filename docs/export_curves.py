"""Export deterministic evaluation curves from TensorBoard runs to docs/mujoco_eval.csv.

    python docs/export_curves.py RUNS_DIR [RUNS_DIR ...]

Reads every run directory named {env_id}__{exp_name}__{seed}__{time} under the given folders and
writes one row per evaluation: env_id, seed, step (environment steps), eval_return (mean of the
deterministic episodes). Needs only tensorboard (already a run-time dependency).
"""
import csv
import glob
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mujoco_eval.csv")

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python docs/export_curves.py RUNS_DIR [RUNS_DIR ...]")
    rows = []
    for folder in sys.argv[1:]:
        for run_dir in sorted(glob.glob(os.path.join(folder, "*__*__*__*"))):
            env_id, _, seed, _ = os.path.basename(run_dir).split("__")
            ea = EventAccumulator(run_dir)
            ea.Reload()
            if "eval/return" not in ea.Tags()["scalars"]:
                continue
            # logged at global_step = (steps taken) - 1; report steps taken
            rows += [(env_id, int(seed), e.step + 1, round(e.value, 1)) for e in ea.Scalars("eval/return")]
    rows.sort()
    with open(OUT, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "seed", "step", "eval_return"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {OUT}")
