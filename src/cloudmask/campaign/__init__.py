"""After and around runs: seeded repeats and grids (experiments.py), SLURM submission, reports and plots,
MLPerf-style results packages, and `cloudmask doctor`."""
