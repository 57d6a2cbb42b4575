"""Fake `isaaclab.app` (source, 3.0.0 wheel: isaaclab/app/sim_launcher.py, app_launcher.py and
isaaclab_physx/app/kit_launcher.py).

launch_simulation(cfg, launcher_args) is a context manager. It finds the config's physics and starts the
runtimes it needs: none for Newton (kit-less: nothing starts, nothing is closed), Kit for Isaac Sim PhysX, for
a config without physics, for `require_kit` and for a Kit visualizer. `PhysxAutoCfg` becomes Isaac Sim PhysX
when Kit runs anyway, else OvPhysX. It yields the resolved physics config; on exit it closes what it started
with the status of a SystemExit raised in the block (KeyboardInterrupt 130, another exception 1, else 0).
KitLauncher exits with status 1 after an error log when Isaac Sim is missing, runs headless unless a Kit
visualizer is asked for, and its close ends the process with the status it is given (Kit exits from inside
its close). AppLauncher is deprecated: it always starts Kit and keeps it for the process.
"""
import atexit
import contextlib
import logging
import sys
import traceback

from isaaclab.physics import OvPhysxCfg, PhysicsCfg, PhysxAutoCfg, PhysxCfg

logger = logging.getLogger(__name__)
RUNNING = []  # the Kit apps started and not closed
LAUNCHES = []  # (whether Kit started, the resolved physics config) of every launch, for the tests


class KitLauncher:
    """isaaclab_physx.app.KitLauncher: starts Isaac Sim's SimulationApp."""

    device = None

    def __init__(self, args):
        try:
            import isaacsim
        except ModuleNotFoundError:
            isaacsim = None
        if getattr(isaacsim, "SimulationApp", None) is None:  # _ensure_isaac_sim_available()
            logger.error("\n[ERROR] Isaac Sim is not installed or not found on PYTHONPATH.\n\n"
                         "  This environment requires Isaac Sim and Omniverse Kit.\n"
                         "    PhysX backend and Kit visualizer currently requires Isaac Sim.\n")
            raise SystemExit(1)
        device = args.get("device", "cuda:0")
        if "cuda" not in device and "cpu" not in device:
            raise ValueError(f"Invalid value for input keyword argument `device`: {device}."
                             " Expected: a string with the format 'cuda', 'cuda:<device_id>', or 'cpu'.")
        self.device = device
        # only a Kit visualizer opens a window
        args["headless"] = bool(args.get("headless", False)) or not args.get("kit_visualizer", False)
        self.app = isaacsim.SimulationApp({"headless": args["headless"]})
        RUNNING.append(self.app)
        print("[ISAACLAB] KitLauncher initialization complete", file=sys.__stderr__, flush=True)
        atexit.register(lambda: self.close(1 if getattr(sys, "last_exc", None) is not None else 0))

    def close(self, exit_code=0):
        if self.app in RUNNING:
            RUNNING.remove(self.app)
            self.app.close(exit_code=exit_code)  # Kit ends the process here


def _visualizers(args):
    value = args.get("visualizer")
    names = value.split(",") if isinstance(value, str) else list(value or [])
    return [] if names == ["none"] else names


@contextlib.contextmanager
def launch_simulation(cfg, launcher_args=None):
    args = vars(launcher_args) if hasattr(launcher_args, "__dict__") else launcher_args
    args = {} if args is None else args
    args["visualizer"] = _visualizers(args)
    args["kit_visualizer"] = "kit" in args["visualizer"]
    sim = getattr(cfg, "sim", None)
    physics = cfg if isinstance(cfg, PhysicsCfg) else getattr(sim, "physics", None)
    kit_sources = args["kit_visualizer"] or bool(args.get("require_kit", False))
    if isinstance(physics, PhysxAutoCfg):  # resolved in place
        physics = physics.isaacsim_physx if kit_sources else physics.ovphysx
        if sim is not None:
            sim.physics = physics
    needs_kit = kit_sources or physics is None or isinstance(physics, PhysxCfg)
    if needs_kit and isinstance(physics, OvPhysxCfg):
        raise ValueError("Invalid backend combination: OvPhysX physics (`OvPhysxCfg`) is kitless and cannot be "
                         "used together with Isaac Sim / Kit")
    launchers = [KitLauncher(args)] if needs_kit else []  # NewtonCfg.launcher_type is None: nothing starts
    for launcher in launchers:
        if sim is not None and launcher.device is not None:
            sim.device = launcher.device
    LAUNCHES.append((needs_kit, physics))
    exit_code = 0
    try:
        yield physics
    except KeyboardInterrupt:
        exit_code = 130
        raise
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except Exception:
        exit_code = 1
        traceback.print_exc()
        raise
    finally:
        for launcher in reversed(launchers):
            launcher.close(exit_code)


_RUNTIME = contextlib.ExitStack()


class AppLauncher:
    """Deprecated: starts Kit whatever the physics, for scripts not moved to launch_simulation."""

    def __init__(self, launcher_args=None, **kwargs):
        logger.warning("AppLauncher is deprecated; use isaaclab.app.launch_simulation.")
        args = vars(launcher_args) if hasattr(launcher_args, "__dict__") else dict(launcher_args or {})
        args.update(kwargs, require_kit=True)
        _RUNTIME.enter_context(launch_simulation(None, args))
        self.app = RUNNING[-1]
