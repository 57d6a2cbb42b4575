"""Does a MuJoCo (or gymnasium) version change the v4 tasks? Roll each task with one fixed action
sequence from one reset seed, in each installation, then compare the trajectories.

    python docs/mujoco_versions.py roll mj400.npz                     # in each environment to compare
    /path/to/other/venv/bin/python docs/mujoco_versions.py roll mj237.npz
    python docs/mujoco_versions.py compare mj237.npz mj400.npz        # the first file is the reference
    python docs/mujoco_versions.py margin                             # how this MuJoCo combines margins
    python docs/mujoco_versions.py roll mj400half.npz --half-margins  # every geom margin halved

For each task, `compare` prints both episode lengths and the first step at which any observation entry
differs by more than 1e-9, 1e-3 and 0.1 (None: never, within the shorter episode). `margin` makes Ant-v4's
floor margin 0.03 (its feet have 0.01) and prints the margin of the first foot contact: up to MuJoCo 3.4
a contact's margin is the larger of its two geoms' margins, from 3.5 on their sum. Every geom of a v4 task
has the same margin (Ant 0.01, Hopper and Humanoid 0.001, HalfCheetah and Walker2d 0), so `--half-margins`
gives the contacts of MuJoCo 3.5 and later the margins they had before. The results are in docs/meow.md,
"The MuJoCo version".
"""
import sys

import numpy as np

TASKS = ["Hopper-v4", "HalfCheetah-v4", "Walker2d-v4", "Ant-v4", "Humanoid-v4"]


def roll(path, half_margins=False, steps=1000):
    import gymnasium as gym
    import mujoco

    out = {"versions": np.array([gym.__version__, mujoco.__version__ + (" half margins" if half_margins else "")])}
    for env_id in TASKS:
        env = gym.make(env_id)
        if half_margins:
            env.unwrapped.model.geom_margin[:] *= 0.5
        actions = np.random.RandomState(0).uniform(-1, 1, (steps, env.action_space.shape[0])) * env.action_space.high
        obs, _ = env.reset(seed=0)
        trajectory = [obs]
        for action in actions:
            obs, _, terminated, truncated, _ = env.step(action.astype(env.action_space.dtype))
            trajectory.append(obs)
            if terminated or truncated:
                break
        out[env_id] = np.array(trajectory)
    np.savez(path, **out)
    print(f"gymnasium {gym.__version__}, mujoco {mujoco.__version__}:",
          ", ".join(f"{t} {len(out[t]) - 1} steps" for t in TASKS))


def compare(reference, *others):
    ref = np.load(reference)
    for path in others:
        other = np.load(path)
        print(f"{path} (gymnasium {other['versions'][0]}, mujoco {other['versions'][1]}) against {reference} "
              f"(gymnasium {ref['versions'][0]}, mujoco {ref['versions'][1]})")
        for task in TASKS:
            a, b = other[task], ref[task]
            n = min(len(a), len(b))
            gap = np.abs(a[:n] - b[:n]).max(axis=1)
            first = [int(np.argmax(gap > tol)) if (gap > tol).any() else None for tol in (1e-9, 1e-3, 0.1)]
            print(f"  {task:15s} {len(a) - 1:5d} steps against {len(b) - 1:5d}; first step off by >1e-9, >1e-3, >0.1: {first}")


def margin():
    import gymnasium as gym
    import mujoco

    env = gym.make("Ant-v4")
    model, data = env.unwrapped.model, env.unwrapped.data
    model.geom_margin[0] = 0.03  # geom 0 is the floor
    env.reset(seed=0)
    for action in np.random.RandomState(0).uniform(-1, 1, (1000, 8)):
        env.step(action.astype(np.float32))
        if data.ncon:
            break
    got = data.contact[0].includemargin  # the contact's margin less its gap (0 here)
    rule = {0.03: "the larger margin", 0.04: "the sum of margins"}.get(round(float(got), 6), "neither")
    print(f"mujoco {mujoco.__version__}: floor (margin 0.03) against foot (0.01): contact margin {got:g}, {rule}")


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "roll" and sys.argv[3:] in ([], ["--half-margins"]):
        roll(sys.argv[2], half_margins=len(sys.argv) == 4)
    elif sys.argv[1:] == ["margin"]:
        margin()
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(*sys.argv[2:])
    else:
        sys.exit(__doc__)
