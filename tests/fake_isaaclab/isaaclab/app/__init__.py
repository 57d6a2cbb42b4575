"""Fake `isaaclab.app.AppLauncher` (source: isaaclab/app/app_launcher.py of the 2.3.2.post1 wheel).

AppLauncher(launcher_args=None, **kwargs) resolves headless and device (cpu, cuda or cuda:N; anything else
is a ValueError, before any app exists), prints the device and starts the SimulationApp, reachable as
`.app`. Isaac Lab's other modules import only while an app runs.
"""
RUNNING = []  # the started SimulationApps that were not closed yet


class SimulationApp:
    def __init__(self, config):
        self.config, self._exiting = config, False
        RUNNING.append(self)

    def is_running(self):
        return not self._exiting

    def close(self):
        if not self._exiting:
            self._exiting = True
            RUNNING.remove(self)
            print("Simulation App Shutting Down")
            print("Simulation App Shutdown Complete")


class AppLauncher:
    def __init__(self, launcher_args=None, **kwargs):
        launcher_args = dict(vars(launcher_args) if hasattr(launcher_args, "__dict__") else launcher_args or {})
        if set(kwargs) & set(launcher_args):
            raise ValueError(f"Input `launcher_args` and `kwargs` both provided common attributes: "
                             f"{set(kwargs) & set(launcher_args)}.")
        launcher_args.update(kwargs)
        self._headless = bool(launcher_args.get("headless", False))
        device = launcher_args.get("device", "cuda:0")
        if "cuda" not in device and "cpu" not in device:
            raise ValueError(f"Invalid value for input keyword argument `device`: {device}."
                             " Expected: a string with the format 'cuda', 'cuda:<device_id>', or 'cpu'.")
        self.device_id = int(device.split(":")[-1]) if "cuda:" in device else 0
        print(f"[INFO][AppLauncher]: Using device: {device}")
        self._app = SimulationApp({"headless": self._headless, "device": device})

    @property
    def app(self):
        return self._app


def require_running_app(module):
    """Before the app runs, the extension folders are not on the path: the import fails as it would."""
    if not RUNNING:
        raise ModuleNotFoundError(f"No module named '{module}' (launch the app with AppLauncher first)")
