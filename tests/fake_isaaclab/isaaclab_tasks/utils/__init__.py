"""Fake `isaaclab_tasks.utils` (source, 3.0.0 wheel: isaaclab_tasks/utils/parse_cfg.py and hydra.py).

load_cfg_from_registry returns the registered config as it is, presets unresolved. parse_env_cfg(task, device,
num_envs, use_fabric, overrides) composes it as resolve_task_config does: every PresetCfg in the tree becomes
the alternative a `physics=NAME` or `presets=NAME` override names, else its `default`; a name no preset takes
is a ValueError ("Unknown preset(s)"), and a `physics=NAME` that lands on no physics config is one too.
"""
import dataclasses
import importlib

import gymnasium as gym

from isaaclab.physics import PhysicsCfg


@dataclasses.dataclass
class PresetCfg:
    """Fields are alternatives; `default` is used when no override names another."""


def load_cfg_from_registry(task_name, entry_point_key):
    # gym.spec raises gymnasium's NameNotFound (or VersionNotFound) for an unknown id
    cfg_entry_point = gym.spec(task_name.split(":")[-1]).kwargs.get(entry_point_key)
    if cfg_entry_point is None:
        raise ValueError(f"Could not find configuration for the environment: '{task_name}'."
                         f"\nPlease check that the gym registry has the entry point: '{entry_point_key}'.")
    mod_name, attr_name = cfg_entry_point.split(":")
    return getattr(importlib.import_module(mod_name), attr_name)()


def resolve_presets(cfg, selected, typed_hits):
    """Replace each PresetCfg in the dataclass tree by its chosen alternative; record the names used."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, PresetCfg):
            names = [field.name for field in dataclasses.fields(value)]
            name = next((n for n in selected if n in names), "default")
            value = getattr(value, name)
            setattr(cfg, f.name, value)
            typed_hits.setdefault(name, set()).add("physics" if isinstance(value, PhysicsCfg) else "presets")
        if dataclasses.is_dataclass(value):
            resolve_presets(value, selected, typed_hits)
    return cfg


def parse_env_cfg(task_name, device=None, num_envs=None, use_fabric=None, overrides=()):
    if isinstance(overrides, str):
        raise TypeError(f"'overrides' must be a list or tuple of 'key=value' strings, not a bare string: "
                        f"{overrides!r}.")
    cfg = load_cfg_from_registry(task_name.split(":")[-1], "env_cfg_entry_point")
    requested = [tuple(arg.split("=", 1)) for arg in overrides if "=" in arg]
    selected = [name for key, value in requested if key in ("physics", "presets") for name in value.split(",")]
    typed_hits = {}
    resolve_presets(cfg, selected, typed_hits)
    unknown = sorted(set(selected) - set(typed_hits))
    if unknown:
        raise ValueError(f"Unknown preset(s): {', '.join(unknown)}\n\nAvailable presets (grouped by affected paths):")
    missing = [f"physics={n}" for key, value in requested if key == "physics" for n in value.split(",")
               if "physics" not in typed_hits[n]]
    if missing:
        raise ValueError(f"Typed preset selector(s) {', '.join(missing)} did not match a selectable preset of that "
                         "type for this task.")
    if device is not None:
        cfg.sim.device = device
    if num_envs is not None:
        cfg.scene.num_envs = num_envs
    return cfg
