"""Stand-in for Isaac Lab 3.0.0 in tests: the real one needs an NVIDIA GPU (Newton) or Isaac Sim (PhysX).

With this folder first on the path, `isaaclab` and `isaaclab_tasks` import as the real ones do. What is
copied from the 3.0.0 wheel's source (`pip download --no-deps --python-version 3.12 isaaclab==3.0.0`):
- `isaaclab.app.launch_simulation(cfg, launcher_args)`, a context manager (isaaclab/app/sim_launcher.py): a
  Newton physics config starts nothing (kit-less); Isaac Sim PhysX (`PhysxCfg`), no physics config,
  `require_kit` or a Kit visualizer start Kit (isaaclab_physx/app/kit_launcher.py), which exits with status 1
  when Isaac Sim is not installed, and ends the process inside its close with the status it is given;
  the deprecated `AppLauncher` always starts Kit (isaaclab/app/app_launcher.py);
- `isaaclab_tasks` imports before any launch, registers ids without `-v0` (Isaac-Ant, Isaac-Ant-Direct);
  `parse_env_cfg(task, device, num_envs, overrides=["physics=NAME"])` resolves the task's physics preset
  (`newton_mjwarp` by default, `isaacsim_physx`, `physx`);
- the step contract of ManagerBasedRLEnv and DirectRLEnv, with `compute_final_obs`: at a step that resets
  envs, `extras["final_obs"]` gets every group's observation from before the reset; it stays in extras,
  stale, through the steps without a reset. terminated and truncated (and a manager-based reward) are the
  env's own buffers, rewritten in place.
The scene is a toy (a point on a line) behind real task ids. `kit/` holds a fake `isaacsim` (its
`SimulationApp`), put on the path only by tests that want Isaac Sim installed.
"""
