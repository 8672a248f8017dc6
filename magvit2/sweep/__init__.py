"""Submission side: the magvit2 Hydra sweeper (sweeper.py: plan, dedup, launch), the SLURM and local launchers
(launchers.py), sweep records and the member table (state.py), and `python -m magvit2.sweep status` (status.py).
What runs inside a member's job is magvit2.runtime."""
