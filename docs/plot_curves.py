"""Plot docs/mujoco_eval.csv against the paper's values: python docs/plot_curves.py (needs matplotlib).

Writes docs/mujoco_eval.png (mean and min-max over seeds per task, with the paper's Fig. 3 values
as reference points) and prints the table that the README shows.
"""
import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# approximate values read off the paper's Fig. 3 (mean of 5 seeds), as quoted in MEOW.md section 4
PAPER = {"Hopper-v4": [(250_000, 3000), (1_500_000, 3450)], "HalfCheetah-v4": [(1_500_000, 11500)],
         "Walker2d-v4": [(1_000_000, 5000), (4_000_000, 5500)]}

if __name__ == "__main__":
    curves = defaultdict(lambda: defaultdict(dict))  # env -> step -> seed -> return
    with open(os.path.join(HERE, "mujoco_eval.csv")) as f:
        for row in csv.DictReader(f):
            curves[row["env_id"]][int(row["step"])][int(row["seed"])] = float(row["eval_return"])
    envs = sorted(curves)
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        steps = sorted(curves[env])
        values = [list(curves[env][s].values()) for s in steps]
        mean = [sum(v) / len(v) for v in values]
        ax.plot(steps, mean, label=f"ours, mean of {max(len(v) for v in values)} seeds")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.25, label="min-max")
        off_axis = []
        for step, value in PAPER.get(env, []):
            if step <= 1.5 * steps[-1]:
                ax.plot([step], [value], "k*", markersize=10, label=f"paper Fig. 3 at {step // 1000}k (5 seeds)")
            else:
                off_axis.append(f"paper: ~{value:,} at {step / 1e6:g}M")
        if off_axis:
            ax.text(0.98, 0.03, "\n".join(off_axis), transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("deterministic evaluation return")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        print(f"\n{env}: step | seeds | mean | min | max")
        for s, v, m in zip(steps, values, mean):
            print(f"{s} | {len(v)} | {m:.0f} | {min(v):.0f} | {max(v):.0f}")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mujoco_eval.png"), dpi=110)
    print(f"\nwrote {os.path.join(HERE, 'mujoco_eval.png')}")
