"""Fake `isaaclab` (see tests/fake_isaaclab/__init__.py)."""
