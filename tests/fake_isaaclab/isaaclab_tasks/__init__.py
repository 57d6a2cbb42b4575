"""Fake `isaaclab_tasks`: importing it registers task ids with gymnasium, as the real package does
(isaaclab_tasks/__init__.py imports every task package; each calls gym.register with an entry point and
kwargs["env_cfg_entry_point"]). Real ids, toy scene: Isaac-Ant-v0 is manager-based like the real one,
Isaac-Franka-Cabinet-Direct-v0 a direct env; Isaac-Ant-Finite-Horizon-v0 (not a real id) sets
is_finite_horizon.
"""
from dataclasses import dataclass

import gymnasium as gym

from isaaclab.app import require_running_app

require_running_app("isaaclab_tasks")

from isaaclab.envs import DirectRLEnv, DirectRLEnvCfg, ManagerBasedRLEnvCfg  # noqa: E402


class AntEnvCfg(ManagerBasedRLEnvCfg):
    pass


@dataclass
class AntFiniteHorizonEnvCfg(ManagerBasedRLEnvCfg):
    is_finite_horizon: bool = True


class FrankaCabinetEnvCfg(DirectRLEnvCfg):
    pass


class FrankaCabinetEnv(DirectRLEnv):
    pass


for task_id, entry_point, cfg in [
    ("Isaac-Ant-v0", "isaaclab.envs:ManagerBasedRLEnv", "AntEnvCfg"),
    ("Isaac-Ant-Finite-Horizon-v0", "isaaclab.envs:ManagerBasedRLEnv", "AntFiniteHorizonEnvCfg"),
    ("Isaac-Franka-Cabinet-Direct-v0", f"{__name__}:FrankaCabinetEnv", "FrankaCabinetEnvCfg"),
]:
    gym.register(id=task_id, entry_point=entry_point, disable_env_checker=True,
                 kwargs={"env_cfg_entry_point": f"{__name__}:{cfg}"})
