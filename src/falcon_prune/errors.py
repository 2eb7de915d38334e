"""The package's exceptions.

Every refusal of bad input is a :class:`FalconPruneError`. Each class also derives from
the built-in exception a caller would have caught before (``ValueError``, ``TypeError``,
``FileNotFoundError``, ``MemoryError``), so existing ``except`` clauses keep working. The
command line prints one line and exits with status 2 for these, and keeps the traceback
for anything else (a bug). :class:`BudgetViolation` is not a refusal but a bug: a result
that would exceed a budget is never returned.
"""

from __future__ import annotations


class FalconPruneError(Exception):
    """Base class of every error the package raises for bad input."""


class ConfigError(FalconPruneError, ValueError):
    """An option has a value the method cannot use (out of range, unknown name, an option
    the chosen method does not take)."""


class ConfigTypeError(FalconPruneError, TypeError):
    """An argument has the wrong type (a string where a number belongs, ...)."""


class BudgetError(ConfigError):
    """The budgets are malformed or cannot be met (below what the layers that must stay
    need)."""


class DataError(FalconPruneError, ValueError):
    """The data does not fit the model or the task (shapes, labels, NaN/inf, too few
    samples)."""


class DataTypeError(FalconPruneError, TypeError):
    """The data has a form the package cannot read."""


class ModelError(FalconPruneError, ValueError):
    """The model cannot be pruned as given (no prunable layers, on the meta device, ...)."""


class ModelTypeError(FalconPruneError, TypeError):
    """The object given as a model is not a ``torch.nn.Module``."""


class CheckpointError(FalconPruneError, ValueError):
    """A checkpoint file is corrupt, truncated, empty or belongs to another model or run."""


class MissingFileError(FalconPruneError, FileNotFoundError):
    """A file or directory the call needs does not exist."""


class PathError(FalconPruneError, ValueError):
    """A path cannot be used: an output that is a directory, an unwritable directory."""


class MemoryBudgetError(FalconPruneError, MemoryError):
    """Something would not fit in the memory limit; raised before it is allocated."""


class DependencyError(FalconPruneError, ImportError):
    """An optional dependency (torchvision, matplotlib, scikit-learn, ...) is missing."""


class BudgetViolation(RuntimeError):
    """Internal error: a result exceeded a budget. Never expected; please report it."""


class OutputExistsError(FalconPruneError, FileExistsError):
    """An output (a checkpoint of another run) exists and would be overwritten."""


class TrainingDiverged(FalconPruneError, FloatingPointError):
    """Fine-tuning's loss became NaN or inf (usually a learning rate that is too high)."""
