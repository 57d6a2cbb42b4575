"""Plot docs/mujoco_eval.csv against the paper's values: python docs/plot_curves.py [CSV] (needs matplotlib).

Writes docs/mujoco_eval.png (mean and min-max over seeds per task, with the paper's Fig. 3 values
as reference points; dashed: the mean with sampled actions, where runs logged it with
--eval-stochastic) and prints the table that the README shows. Runs on different MuJoCo versions
(column mujoco) are never averaged together: each version is its own curve and table. A mean is drawn
only at the steps that every seed reached; where one seed ran further, it goes on as a thin line of
its own (a mean of fewer seeds would jump by the seed spread and carry the wrong seed count). Given
another CSV (same columns), writes the figure next to it, with the same name ending in .png.
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
# approximate values read off the paper's Fig. 3 (mean of 5 seeds, arXiv:2405.13629)
PAPER = {"Hopper-v4": [(250_000, 3000), (500_000, 3400), (1_000_000, 3450), (1_500_000, 3500)],
         "HalfCheetah-v4": [(250_000, 8300), (500_000, 9800), (1_000_000, 11000), (1_500_000, 11500)],
         "Walker2d-v4": [(500_000, 4000), (1_000_000, 5000), (2_000_000, 5300), (4_000_000, 5500)],
         "Ant-v4": [(500_000, 1300), (1_000_000, 3800), (2_000_000, 6000), (4_000_000, 6600)],
         "Humanoid-v4": [(500_000, 1000), (1_000_000, 5500), (2_000_000, 6100), (5_000_000, 6900)]}


def mean_where_all_seeds(by_step):
    """by_step: {step: {seed: value}}. Returns (steps, means, mins, maxs) over the steps where every seed
    of by_step has a value, and {seed: (steps, values)} for the rest: each seed's own values at the
    other steps (NaN at the common ones, so the line breaks there, except the common step next to
    them, so that a seed's line joins the mean where it leaves it)."""
    seeds = {seed for values in by_step.values() for seed in values}
    steps = sorted(by_step)
    common = [s for s in steps if len(by_step[s]) == len(seeds)]
    means = [sum(by_step[s].values()) / len(seeds) for s in common]
    mins = [min(by_step[s].values()) for s in common]
    maxs = [max(by_step[s].values()) for s in common]
    alone = {}
    for seed in sorted(seeds):
        own = [s for s in steps if seed in by_step[s]]
        outside = [s not in common for s in own]
        shown = [out or (i > 0 and outside[i - 1]) or (i + 1 < len(own) and outside[i + 1])
                 for i, out in enumerate(outside)]
        if len(seeds) > 1 and any(outside):
            alone[seed] = (own, [by_step[s][seed] if show else float("nan") for s, show in zip(own, shown)])
    return common, means, mins, maxs, alone


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
            common, c_mean, c_min, c_max, alone = mean_where_all_seeds(curves[env][version])
            n_seeds = len({seed for v in curves[env][version].values() for seed in v})
            on = f", MuJoCo {version}" if version else ""
            label = f"ours, mean of {n_seeds} seed{'s' if n_seeds > 1 else ''}{on}"
            ax.plot(common, c_mean, color=colour[version], label=label)
            ax.fill_between(common, c_min, c_max, alpha=0.25, color=colour[version],
                            label="min-max" if n_seeds > 1 else None)
            for i, (seed, (own, own_values)) in enumerate(alone.items()):
                ax.plot(own, own_values, linewidth=0.8, color=colour[version],
                        label=f"thin: one seed where the others have not run{on}" if i == 0 else None)
            by_step = sampled[env][version]
            if by_step:
                common, c_mean, _, _, alone = mean_where_all_seeds(by_step)
                ax.plot(common, c_mean, "--", linewidth=1, color=colour[version],
                        label=f"ours, sampled actions (--eval-stochastic){on}")
                for own, own_values in alone.values():
                    ax.plot(own, own_values, "--", linewidth=0.6, color=colour[version])
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
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"\nwrote {png_path}")
