"""A run's files: checkpoints, the gate every loaded checkpoint passes, the run directory, a run."""
