"""Launching training runs: local torchrun, Slurm sbatch, optionally through nemo-run."""
