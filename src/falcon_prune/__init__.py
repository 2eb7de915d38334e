"""falcon-prune: prune trained PyTorch networks under a FLOP budget and a non-zero budget at
once, with FALCON (Meng et al., AISTATS 2024).

Subpackages, from the model up (docs/method.md has the map):
:mod:`~falcon_prune.data` (batches, tasks, evaluation, datasets),
:mod:`~falcon_prune.analysis` (what a model costs and how it is built),
:mod:`~falcon_prune.loss` (the loss model), :mod:`~falcon_prune.selection` (choosing what to
keep under both budgets), :mod:`~falcon_prune.spaces` (weights or channel units),
:mod:`~falcon_prune.methods` (registered solvers and schedules) and
:mod:`~falcon_prune.runs` (one-shot, multi-stage and gradual runs); :func:`prune`,
:func:`gradual` and the command line on top.
"""

from falcon_prune import errors, methods, models
from falcon_prune.analysis.batchnorm import recalibrate_batchnorm
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.macs import register_macs
from falcon_prune.analysis.masks import apply_weights, clone_model, make_permanent, masks_of
from falcon_prune.analysis.prunable import register_prunable
from falcon_prune.api import count_macs, prune
from falcon_prune.config import (
    DEFAULTS,
    EFFORTS,
    METHODS,
    GradualConfig,
    PruneConfig,
    defaults,
    gradual_defaults,
    multistage_options,
)
from falcon_prune.data import tasks
from falcon_prune.data.evaluation import Evaluation, evaluate
from falcon_prune.data.tasks import Task
from falcon_prune.errors import FalconPruneError, MemoryBudgetError
from falcon_prune.loss import distributed
from falcon_prune.loss.gradients import gradient_matrix, gradient_store
from falcon_prune.loss.planning import StoragePlan, plan_storage
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.storage import GradientStore
from falcon_prune.methods import register_method, unregister_method
from falcon_prune.methods.options import SolverOptions, SolverTrace
from falcon_prune.methods.schedules import Schedule
from falcon_prune.results import GradualResult, LayerReport, PruneResult
from falcon_prune.runs.gradual import gradual
from falcon_prune.selection.groups import CostGroups
from falcon_prune.selection.ilp import ILPResult, solve_ilp

__all__ = [
    "DEFAULTS",
    "EFFORTS",
    "METHODS",
    "CostGroups",
    "CostModel",
    "Evaluation",
    "FalconPruneError",
    "GradientStore",
    "GradualConfig",
    "GradualResult",
    "ILPResult",
    "LayerReport",
    "MemoryBudgetError",
    "PruneConfig",
    "PruneResult",
    "QuadraticModel",
    "Schedule",
    "SolverOptions",
    "SolverTrace",
    "StoragePlan",
    "Task",
    "apply_weights",
    "clone_model",
    "count_macs",
    "defaults",
    "distributed",
    "errors",
    "evaluate",
    "gradient_matrix",
    "gradient_store",
    "gradual",
    "gradual_defaults",
    "make_permanent",
    "masks_of",
    "methods",
    "models",
    "multistage_options",
    "plan_storage",
    "prune",
    "recalibrate_batchnorm",
    "register_macs",
    "register_method",
    "register_prunable",
    "solve_ilp",
    "tasks",
    "unregister_method",
]
__version__ = "0.3.0"
