"""Fake `isaaclab_tasks.utils` (source: isaaclab_tasks/utils/parse_cfg.py of the 2.3.2.post1 wheel)."""
import importlib

import gymnasium as gym


def load_cfg_from_registry(task_name, entry_point_key):
    # gym.spec raises gymnasium's NameNotFound for an unknown id
    cfg_entry_point = gym.spec(task_name.split(":")[-1]).kwargs.get(entry_point_key)
    if cfg_entry_point is None:
        raise ValueError(f"Could not find configuration for the environment: '{task_name}'."
                         f"\nPlease check that the gym registry has the entry point: '{entry_point_key}'.")
    mod_name, attr_name = cfg_entry_point.split(":")
    return getattr(importlib.import_module(mod_name), attr_name)()


def parse_env_cfg(task_name, device="cuda:0", num_envs=None, use_fabric=None):
    cfg = load_cfg_from_registry(task_name.split(":")[-1], "env_cfg_entry_point")
    cfg.sim.device = device
    if num_envs is not None:
        cfg.scene.num_envs = num_envs
    return cfg
