"""docs/export_curves.py and docs/plot_curves.py: each evaluation carries the MuJoCo version it ran on,
and runs on different versions are neither merged away nor averaged together."""
import csv
import importlib.util
import math
import os

import pytest
from torch.utils.tensorboard import SummaryWriter

from .conftest import ROOT, run_script


def fake_run(path, evals, versions=()):
    """A run directory as the scripts write it: eval/return at global_step = steps taken - 1, and the
    'versions' text at each start (step 0, and the resume step of a resumed run)."""
    writer = SummaryWriter(str(path))
    for step, text in versions:
        writer.add_text("versions", text, step)
    for step, value in evals:
        writer.add_scalar("eval/return", value, step - 1)
    writer.close()


def versions(mujoco):
    return f"python 3.11.7, torch 2.13.0+cpu, gymnasium 1.4.0, numpy 2.4.6, mujoco {mujoco}"


def read(csv_path):
    return sorted((r["env_id"], int(r["seed"]), int(r["step"]), float(r["eval_return"]), r["mujoco"])
                  for r in csv.DictReader(open(csv_path)))


def test_each_evaluation_gets_the_version_of_the_start_before_it_and_merge_keeps_other_versions(tmp_path):
    # started on 3.3.7, resumed from its step-30 checkpoint on 4.0.0
    fake_run(tmp_path / "runs" / "Ant-v4__x__1__100", [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0), (50, 5.0)],
             [(0, versions("3.3.7")), (30, versions("4.0.0"))])
    # started before runs logged their versions
    fake_run(tmp_path / "runs" / "Hopper-v4__x__2", [(10, 6.0)])
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("env_id,seed,step,eval_return,eval_return_stochastic,mujoco\n"
                        "Ant-v4,1,10,7.0,,2.3.7\n"    # the same task and seed on another version: kept
                        "Ant-v4,1,999,8.0,,4.0.0\n"   # a version exported now: replaced
                        "Ant-v4,1,60,9.0,,\n"         # no recorded version, and Ant's run logged its
                                                      # versions from the start: another run, kept
                        "Hopper-v4,2,20,10.0,,\n"     # its run logged no versions: may be the same, replaced
                        "Walker2d-v4,1,10,11.0,,\n")  # not exported now: kept
    out = run_script("docs/export_curves.py", "runs", "--mujoco", "9.9.9", "--merge", "--csv", csv_path,
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert read(csv_path) == sorted([
        ("Ant-v4", 1, 10, 1.0, "3.3.7"), ("Ant-v4", 1, 20, 2.0, "3.3.7"), ("Ant-v4", 1, 30, 3.0, "3.3.7"),
        ("Ant-v4", 1, 40, 4.0, "4.0.0"), ("Ant-v4", 1, 50, 5.0, "4.0.0"),
        ("Ant-v4", 1, 10, 7.0, "2.3.7"), ("Ant-v4", 1, 60, 9.0, ""),
        ("Hopper-v4", 2, 10, 6.0, "9.9.9"),  # --mujoco: only for runs that logged none
        ("Walker2d-v4", 1, 10, 11.0, "")])

    # without --mujoco, a run that logged no versions has an empty version, and an old CSV without the
    # column reads as empty too: both sides unknown, so the old row of that seed is replaced
    csv_path.write_text("env_id,seed,step,eval_return\nHopper-v4,2,20,10.0\nHopper-v4,3,20,12.0\n")
    out = run_script("docs/export_curves.py", "runs", "--exp-name", "x", "--merge", "--csv", csv_path,
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [r for r in read(csv_path) if r[0] == "Hopper-v4"] == [("Hopper-v4", 2, 10, 6.0, ""),
                                                                  ("Hopper-v4", 3, 20, 12.0, "")]


def test_plot_never_averages_runs_on_different_mujoco_versions(tmp_path):
    pytest.importorskip("matplotlib", reason="docs/plot_curves.py needs matplotlib (tests/requirements.txt)")
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("env_id,seed,step,eval_return,eval_return_stochastic,mujoco\n"
                        "Ant-v4,1,10000,100.0,,4.0.0\nAnt-v4,2,10000,300.0,,4.0.0\n"
                        "Ant-v4,3,10000,1000.0,,3.3.7\nAnt-v4,3,20000,2000.0,50.0,3.3.7\n"
                        "Hopper-v4,1,10000,5.0,,\n")
    out = run_script("docs/plot_curves.py", csv_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    tables = {block.split(":")[0]: block.splitlines()[1:] for block in out.stdout.strip().split("\n\n")[:-1]}
    assert tables == {"Ant-v4 (MuJoCo 3.3.7)": ["10000 | 1 | 1000 | 1000 | 1000",
                                                "20000 | 1 | 2000 | 2000 | 2000 | 50 (1)"],
                      "Ant-v4 (MuJoCo 4.0.0)": ["10000 | 2 | 200 | 100 | 300"],
                      "Hopper-v4": ["10000 | 1 | 5 | 5 | 5"]}
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_plot_means_only_steps_every_seed_reached_and_draws_the_rest_per_seed():
    pytest.importorskip("matplotlib", reason="docs/plot_curves.py needs matplotlib (tests/requirements.txt)")
    spec = importlib.util.spec_from_file_location("plot_curves", os.path.join(ROOT, "docs", "plot_curves.py"))
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    # seed 1 ran to 40, seed 2 to 20: the mean stops at 20; seed 1 goes on alone, joined at 20
    common, means, mins, maxs, alone = plot_curves.mean_where_all_seeds(
        {10: {1: 1.0, 2: 3.0}, 20: {1: 2.0, 2: 5.0}, 30: {1: 4.0}, 40: {1: 8.0}})
    assert (common, means, mins, maxs) == ([10, 20], [2.0, 3.5], [1.0, 2.0], [3.0, 5.0])
    assert list(alone) == [1] and alone[1][0] == [10, 20, 30, 40]
    assert math.isnan(alone[1][1][0]) and alone[1][1][1:] == [2.0, 4.0, 8.0]
    # a seed that started logging later (sampled actions from a resume): the other is alone before it
    common, means, _, _, alone = plot_curves.mean_where_all_seeds(
        {10: {1: 1.0}, 20: {1: 2.0, 2: 6.0}, 30: {1: 3.0, 2: 7.0}})
    assert (common, means) == ([20, 30], [4.0, 5.0])
    assert list(alone) == [1] and alone[1][0] == [10, 20, 30]
    assert alone[1][1][:2] == [1.0, 2.0] and math.isnan(alone[1][1][2])
    # one seed: its whole curve is the mean, nothing alone
    assert plot_curves.mean_where_all_seeds({10: {3: 1.0}, 20: {3: 2.0}}) == ([10, 20], [1.0, 2.0], [1.0, 2.0],
                                                                               [1.0, 2.0], {})
