"""Stand-in for Isaac Lab 2.3.2.post1 (Isaac Sim 5.1) in tests: the real one needs an NVIDIA GPU.

With this folder first on the path, `isaaclab` and `isaaclab_tasks` import as the real ones do. What is
copied from the wheel's source (isaaclab/source/...): the import order (only `isaaclab.app` before the
AppLauncher has started the app), the task registration on `import isaaclab_tasks`, `parse_env_cfg`,
and the step contract of ManagerBasedRLEnv and DirectRLEnv. The scene is a toy (a point on a line) behind
real task ids. FAKE_ISAACLAB_FINAL_OBS=1 makes it a later Isaac Lab, whose env configs have the opt-in
`compute_final_obs` flag (IsaacLab PR #6219); 2.3.2 has no way to get the final observation.
"""
