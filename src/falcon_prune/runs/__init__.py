"""Running a prune: setup, one step over a space, one-shot and multi-stage runs, latency
budgets, gradual pruning with fine-tuning and checkpoints, and layer-wise runs that take
calibration data through a large model one block at a time."""
