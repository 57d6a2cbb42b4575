"""Fake `isaaclab_tasks`: importing it registers task ids with gymnasium, as the real package does
(isaaclab_tasks/__init__.py imports every task package once, guarded by a flag on builtins; each calls
gym.register with an entry point and kwargs["env_cfg_entry_point"]). It imports before any launch. Real 3.0
ids, toy scene: Isaac-Ant is manager-based like the real one, Isaac-Ant-Direct a direct env (the locomotion
direct env's action clamp and time-out), Isaac-Cartpole-Camera-Direct a direct env with image observations
(3 x 96 x 96, as the real one's rgb preset); Isaac-Ant-Finite-Horizon (not a real id) sets is_finite_horizon.
Each task's physics is a preset, as the real Ant's AntPhysicsCfg (core/locomotion/ant/ant_common.py):
newton_mjwarp (the default), isaacsim_physx, ovphysx and physx (PhysxAutoCfg over the two).
"""
import builtins
from dataclasses import dataclass, field

import gymnasium as gym

from isaaclab.envs import DirectRLEnv, DirectRLEnvCfg, ManagerBasedRLEnvCfg, SimulationCfg
from isaaclab.physics import NewtonCfg, OvPhysxCfg, PhysxAutoCfg, PhysxCfg
from isaaclab_tasks.utils import PresetCfg


@dataclass
class AntPhysicsCfg(PresetCfg):
    isaacsim_physx: PhysxCfg = field(default_factory=lambda: PhysxCfg(bounce_threshold_velocity=0.2))
    ovphysx: OvPhysxCfg = field(default_factory=OvPhysxCfg)
    physx: PhysxAutoCfg = field(default_factory=lambda: PhysxAutoCfg(PhysxCfg(bounce_threshold_velocity=0.2),
                                                                     OvPhysxCfg()))
    newton_mjwarp: NewtonCfg = field(default_factory=NewtonCfg)
    default: NewtonCfg = field(default_factory=NewtonCfg)


def ant_sim():
    return SimulationCfg(physics=AntPhysicsCfg())


@dataclass
class AntEnvCfg(ManagerBasedRLEnvCfg):
    sim: SimulationCfg = field(default_factory=ant_sim)


@dataclass
class AntFiniteHorizonEnvCfg(AntEnvCfg):
    is_finite_horizon: bool = True


@dataclass
class AntDirectEnvCfg(DirectRLEnvCfg):
    sim: SimulationCfg = field(default_factory=ant_sim)


class AntDirectEnv(DirectRLEnv):
    pass


@dataclass
class CartpoleCameraEnvCfg(AntDirectEnvCfg):  # images: core/cartpole/cartpole_direct_camera_env_cfg.py
    observation_space: list = field(default_factory=lambda: [3, 96, 96])


if not getattr(builtins, "_isaaclab_tasks_registered", False):
    for task_id, entry_point, cfg in [
        ("Isaac-Ant", "isaaclab.envs:ManagerBasedRLEnv", "AntEnvCfg"),
        ("Isaac-Ant-Finite-Horizon", "isaaclab.envs:ManagerBasedRLEnv", "AntFiniteHorizonEnvCfg"),
        ("Isaac-Ant-Direct", f"{__name__}:AntDirectEnv", "AntDirectEnvCfg"),
        ("Isaac-Cartpole-Camera-Direct", f"{__name__}:AntDirectEnv", "CartpoleCameraEnvCfg"),
    ]:
        gym.register(id=task_id, entry_point=entry_point, disable_env_checker=True,
                     kwargs={"env_cfg_entry_point": f"{__name__}:{cfg}"})
    builtins._isaaclab_tasks_registered = True
