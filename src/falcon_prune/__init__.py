"""falcon-prune: prune trained PyTorch networks under a FLOP budget and a non-zero budget
at once, with FALCON (Meng et al., AISTATS 2024)."""

from falcon_prune.api import (
    METHODS,
    LayerReport,
    PruneResult,
    apply_weights,
    make_permanent,
    masks_of,
    multistage_options,
    prune,
)
from falcon_prune.costs import CostModel, count_macs
from falcon_prune.fisher import MemoryBudgetError, gradient_matrix, gradient_store
from falcon_prune.gradual import GradualResult, gradual
from falcon_prune.ilp import CostGroups, ILPResult, solve_ilp
from falcon_prune.quadratic import QuadraticModel
from falcon_prune.schedules import Schedule
from falcon_prune.solvers import SolverOptions
from falcon_prune.storage import GradientStore, StoragePlan, plan_storage

__all__ = [
    "METHODS",
    "CostGroups",
    "CostModel",
    "GradientStore",
    "GradualResult",
    "ILPResult",
    "LayerReport",
    "MemoryBudgetError",
    "PruneResult",
    "QuadraticModel",
    "Schedule",
    "SolverOptions",
    "StoragePlan",
    "apply_weights",
    "count_macs",
    "gradient_matrix",
    "gradient_store",
    "gradual",
    "make_permanent",
    "masks_of",
    "multistage_options",
    "plan_storage",
    "prune",
    "solve_ilp",
]
__version__ = "0.1.0"
