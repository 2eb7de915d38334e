"""falcon-prune: prune trained PyTorch networks under a FLOP budget and a non-zero budget
at once, with FALCON (Meng et al., AISTATS 2024)."""

from falcon_prune import distributed, errors, tasks
from falcon_prune.api import count_macs, prune
from falcon_prune.batchnorm import recalibrate_batchnorm
from falcon_prune.config import (
    DEFAULTS,
    EFFORTS,
    METHODS,
    PruneConfig,
    defaults,
    multistage_options,
)
from falcon_prune.costs import CostModel
from falcon_prune.errors import FalconPruneError, MemoryBudgetError
from falcon_prune.evaluation import Evaluation, evaluate
from falcon_prune.fisher import gradient_matrix, gradient_store
from falcon_prune.gradual import GradualResult, gradual
from falcon_prune.ilp import CostGroups, ILPResult, solve_ilp
from falcon_prune.masks import apply_weights, clone_model, make_permanent, masks_of
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.results import LayerReport, PruneResult
from falcon_prune.schedules import Schedule
from falcon_prune.solvers import SolverOptions, SolverTrace
from falcon_prune.storage import GradientStore, StoragePlan, plan_storage
from falcon_prune.tasks import Task

__all__ = [
    "DEFAULTS",
    "METHODS",
    "CostGroups",
    "CostModel",
    "Evaluation",
    "FalconPruneError",
    "GradientStore",
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
    "EFFORTS",
    "errors",
    "evaluate",
    "gradient_matrix",
    "gradient_store",
    "gradual",
    "make_permanent",
    "masks_of",
    "multistage_options",
    "plan_storage",
    "prune",
    "recalibrate_batchnorm",
    "solve_ilp",
    "tasks",
]
__version__ = "0.2.0"
