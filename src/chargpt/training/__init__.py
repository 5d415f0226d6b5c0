"""Training: the trainer, optimizers and schedules, time budgets, stopping, logging, trackers."""
