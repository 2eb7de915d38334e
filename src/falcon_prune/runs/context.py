"""What every step of a run shares: :class:`RunContext`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from falcon_prune.config import PruneConfig
from falcon_prune.data.tasks import Task
from falcon_prune.loss.distributed import Ranks
from falcon_prune.methods import Method, get_method
from falcon_prune.methods.options import SolverTrace


@dataclass
class RunContext:
    """What every step of a run shares: the ``config`` (method, gradients, solver,
    storage), the ``task``, the ``device``, the solver ``trace``, ``notes`` on how X was
    stored and how its rows were computed, and the ``ranks`` that share the work (one
    process unless a ``torch.distributed`` group is initialised)."""

    config: PruneConfig
    task: Task
    device: torch.device
    progress: bool = False
    trace: SolverTrace = field(default_factory=SolverTrace)
    notes: dict = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)

    @property
    def method(self) -> Method:
        """The registered method of the run."""
        return get_method(self.config.method)
