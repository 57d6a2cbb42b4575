"""Does a MuJoCo (or gymnasium) version change the v4 tasks? Roll each task with one fixed action
sequence from one reset seed, in each installation, then compare the trajectories.

    python docs/mujoco_versions.py roll mj400.npz                     # in each environment to compare
    /path/to/other/venv/bin/python docs/mujoco_versions.py roll mj237.npz
    python docs/mujoco_versions.py compare mj237.npz mj400.npz        # the first file is the reference

For each task, `compare` prints both episode lengths and the first step at which any observation entry
differs by more than 1e-9, 1e-3 and 0.1 (None: never, within the shorter episode). The results are in
docs/meow.md, "Where we are below the paper".
"""
import sys

import numpy as np

TASKS = ["Hopper-v4", "HalfCheetah-v4", "Walker2d-v4", "Ant-v4", "Humanoid-v4"]


def roll(path, steps=1000):
    import gymnasium as gym
    import mujoco

    out = {"versions": np.array([gym.__version__, mujoco.__version__])}
    for env_id in TASKS:
        env = gym.make(env_id)
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "roll":
        roll(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(*sys.argv[2:])
    else:
        sys.exit(__doc__)
