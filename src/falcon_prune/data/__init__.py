"""Data in, batches through the model: sampling batches, tasks (how a batch runs and its
per-sample loss), evaluation, and the bundled dataset loaders."""
