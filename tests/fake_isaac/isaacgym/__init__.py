"""Stand-in for Isaac Gym in tests: the real one needs an NVIDIA GPU and is not on any registry."""
