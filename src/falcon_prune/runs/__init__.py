"""Running a prune: setup, one step over a space, one-shot and multi-stage runs, latency
budgets, and gradual pruning with fine-tuning and checkpoints."""
