"""Fake `isaacsim` (Isaac Sim 6.2, the `isaaclab[isaacsim]` extra): only its SimulationApp. Tests put the
folder above this one on the path when they want Isaac Sim installed. Closing the app ends the process with
the status it is given, as Kit does (isaaclab_physx/app/kit_launcher.py: "Kit exits 0 from inside close()")."""
import os
import sys


class SimulationApp:
    def __init__(self, config):
        self.config = config

    def close(self, exit_code=0):
        print("[fake isaacsim] SimulationApp closed", flush=True)
        sys.stderr.flush()
        os._exit(exit_code)
