"""Fake physics configs of Isaac Lab 3.0.0, in one module. In the wheel: PhysicsCfg and PhysxAutoCfg in
isaaclab/physics/physics_manager_cfg.py, NewtonCfg in isaaclab_newton/physics/newton_manager_cfg.py,
PhysxCfg in isaaclab_physx/physics/physx_manager_cfg.py, OvPhysxCfg in isaaclab_ov/physics.
A config's `launcher_type` names the runtime it needs: none for Newton, Kit for Isaac Sim PhysX."""
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class PhysicsCfg:
    launcher_type: ClassVar = None
    deterministic: bool = False


@dataclass
class NewtonCfg(PhysicsCfg):  # the MuJoCo-Warp solver by default; kit-less
    njmax: int = 45


@dataclass
class PhysxCfg(PhysicsCfg):  # Isaac Sim PhysX: runs inside Kit
    launcher_type: ClassVar = "isaaclab_physx.app:KitLauncher"
    bounce_threshold_velocity: float = 0.5


@dataclass
class OvPhysxCfg(PhysicsCfg):  # kit-less PhysX (the `ovphysx` extra)
    pass


@dataclass
class PhysxAutoCfg(PhysicsCfg):
    """Resolved at launch: Isaac Sim PhysX when Kit runs anyway, else OvPhysX."""
    isaacsim_physx: PhysxCfg = None
    ovphysx: OvPhysxCfg = None
