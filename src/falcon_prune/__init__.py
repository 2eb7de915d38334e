"""falcon-prune: prune trained PyTorch networks under a FLOP budget and a non-zero budget
at once, with FALCON (Meng et al., AISTATS 2024)."""

from falcon_prune.costs import CostModel, count_macs
from falcon_prune.ilp import CostGroups, ILPResult, solve_ilp

__all__ = ["CostModel", "CostGroups", "ILPResult", "count_macs", "solve_ilp"]
__version__ = "0.1.0"
