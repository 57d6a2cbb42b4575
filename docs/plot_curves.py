"""Plot docs/mujoco_eval.csv against the paper's values: python docs/plot_curves.py [CSV] (needs matplotlib).

Writes docs/mujoco_eval.png (mean and min-max over seeds per task, with the paper's Fig. 3 values
as reference points; dashed: the mean with sampled actions, where runs logged it with
--eval-stochastic) and prints the table that the README shows. Runs on different MuJoCo versions
(column mujoco) are never averaged together: each version is its own curve and table. Given another
CSV (same columns), writes the figure next to it, with the same name ending in .png.
"""
import csv
import os
import sys
from collections import defaultdict

try:
    import matplotlib
except ImportError:
    sys.exit("error: docs/plot_curves.py needs matplotlib: pip install matplotlib")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# approximate values read off the paper's Fig. 3 (mean of 5 seeds), as quoted in MEOW.md section 4
PAPER = {"Hopper-v4": [(250_000, 3000), (500_000, 3400), (1_000_000, 3450), (1_500_000, 3500)],
         "HalfCheetah-v4": [(250_000, 8300), (500_000, 9800), (1_000_000, 11000), (1_500_000, 11500)],
         "Walker2d-v4": [(500_000, 4000), (1_000_000, 5000), (2_000_000, 5300), (4_000_000, 5500)],
         "Ant-v4": [(500_000, 1300), (1_000_000, 3800), (2_000_000, 6000), (4_000_000, 6600)],
         "Humanoid-v4": [(500_000, 1000), (1_000_000, 5500), (2_000_000, 6100), (5_000_000, 6900)]}

if __name__ == "__main__":
    csv_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "mujoco_eval.csv")
    png_path = os.path.splitext(csv_path)[0] + ".png"
    # env -> MuJoCo version -> step -> seed -> return; "" where the run did not record its version
    curves = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    sampled = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))  # the same, with sampled actions
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            env, version, step, seed = row["env_id"], row.get("mujoco") or "", int(row["step"]), int(row["seed"])
            curves[env][version][step][seed] = float(row["eval_return"])
            if row.get("eval_return_stochastic"):
                sampled[env][version][step][seed] = float(row["eval_return_stochastic"])
    envs = sorted(curves)
    # one colour per MuJoCo version in every panel
    colour = {v: f"C{i}" for i, v in enumerate(sorted({v for env in envs for v in curves[env]}))}
    cols = min(3, len(envs))
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat[len(envs):]:
        ax.set_visible(False)
    for ax, env in zip(axes.flat, envs):
        last_step = 0
        for version in sorted(curves[env]):
            steps = sorted(curves[env][version])
            last_step = max(last_step, steps[-1])
            values = [list(curves[env][version][s].values()) for s in steps]
            mean = [sum(v) / len(v) for v in values]
            n_seeds = max(len(v) for v in values)
            on = f", MuJoCo {version}" if version else ""
            label = f"ours, mean of {n_seeds} seed{'s' if n_seeds > 1 else ''}{on}"
            ax.plot(steps, mean, color=colour[version], label=label)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.25,
                            color=colour[version], label="min-max" if n_seeds > 1 else None)
            by_step = sampled[env][version]
            if by_step:
                s_steps = sorted(by_step)
                s_mean = [sum(by_step[s].values()) / len(by_step[s]) for s in s_steps]
                ax.plot(s_steps, s_mean, "--", linewidth=1, color=colour[version],
                        label=f"ours, sampled actions (--eval-stochastic){on}")
            print(f"\n{env}{f' (MuJoCo {version})' if version else ''}: "
                  "step | seeds | mean | min | max | mean with sampled actions (seeds)")
            for s, v, m in zip(steps, values, mean):
                u = list(by_step.get(s, {}).values())
                print(f"{s} | {len(v)} | {m:.0f} | {min(v):.0f} | {max(v):.0f}"
                      + (f" | {sum(u) / len(u):.0f} ({len(u)})" if u else ""))
        on_axis = [(step, value) for step, value in PAPER.get(env, []) if step <= 1.5 * last_step]
        if on_axis:
            ax.plot(*zip(*on_axis), "k*", markersize=10, label="paper Fig. 3 (mean of 5 seeds)")
        off_axis = []
        for step, value in PAPER.get(env, []):
            if step > 1.5 * last_step:
                off_axis.append(f"~{value:,} at {step / 1e6:g}M")
        # the paper's later values, beyond our steps, under the title (not over the curve)
        ax.set_title(env + ("\npaper: " + ", ".join(off_axis) if off_axis else ""), fontsize=10)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_xlabel("environment steps")
        ax.set_ylabel("deterministic evaluation return")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"\nwrote {png_path}")
