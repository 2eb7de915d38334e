"""Pruning methods: registered solvers over a pruning space, and their schedules.

Built in: ``mp`` and ``mp_flops`` (magnitude, plain and FLOP-aware), ``woodfisher`` (OBS
saliency and update), ``chita`` (sparsity-only IHT), ``falcon`` (warm starts chosen on
held-out samples, then IHT with the ILP projection; with the layer-wise loss model, an OBS
sweep, exact refit and hard thresholding per layer, and each layer's density chosen by the
knapsack of error curves under both budgets), ``falcon++`` (falcon over a multi-stage
schedule), and the layer-wise ``sparsegpt`` and ``wanda``. :func:`register_method` adds one
(docs/extending.md).
"""

from falcon_prune.methods import reconstruction, sparsegpt, wanda
from falcon_prune.methods.chita import chita
from falcon_prune.methods.falcon import falcon
from falcon_prune.methods.magnitude import magnitude, magnitude_flops
from falcon_prune.methods.obs import woodfisher
from falcon_prune.methods.options import SolverOptions, SolverResult, SolverTrace
from falcon_prune.methods.registry import (
    Method,
    Problem,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from falcon_prune.methods.schedules import DEFAULT_SCHEDULE, Schedule

#: falcon++'s solver options: warm starts only (no IHT), one ridge, three exponents
MULTISTAGE_SOLVER = SolverOptions(max_iter=0, ridges=(1e-4,), cost_exponents=(0.25, 0.5, 0.75),
                                  saliencies=("magnitude",))
_UNITS_SALIENCIES = ("magnitude", "obs", "fisher")


def _register_builtins() -> None:
    both = ("weights", "channels")
    register_method("mp", magnitude, structures=both, builtin=True,
                    summary="global magnitude: the longest prefix by |w| that fits")
    register_method("mp_flops", magnitude_flops, structures=both, cost_aware=True,
                    builtin=True, summary="FLOP-aware magnitude: the ILP on w^2")
    register_method("woodfisher", woodfisher, gradients=True, builtin=True,
                    summary="OBS saliency prefix, then the exact OBS update")
    register_method("chita", chita, gradients=True, options=True, builtin=True,
                    summary="sparsity-only IHT with back-solve (CHITA)")
    register_method(
        "falcon", falcon, gradients=True, held_out=True, options=True, structures=both,
        cost_aware=True, settings=("obs_rank", "damp"), builtin=True,
        layerwise=reconstruction.solve_layer,
        defaults={"loss_model": "auto", "allocation": "ilp"},
        channel_defaults={"solver": SolverOptions(max_iter=0, saliencies=_UNITS_SALIENCIES),
                          "obs_rank": 256, "n_gradients": 500, "n_validation": 500,
                          "loss_model": "auto"},
        summary="FALCON: warm starts scored on held-out samples, IHT with the ILP")
    register_method(
        "falcon++", falcon, gradients=True, held_out=True, options=True, structures=both,
        multistage=True, cost_aware=True, settings=("obs_rank",), builtin=True,
        defaults={"samples_per_gradient": 2, "n_validation": 1000, "alpha": 0.01,
                  "solver": MULTISTAGE_SOLVER, "schedule": DEFAULT_SCHEDULE,
                  "resample": True, "revive": False, "gradient_precision": "auto",
                  "held_out_precision": "auto", "effort": "default"},
        channel_defaults={"solver": MULTISTAGE_SOLVER.replace(saliencies=_UNITS_SALIENCIES),
                          "obs_rank": 256, "revive": None, "n_gradients": 500,
                          "samples_per_gradient": 1, "n_validation": 500,
                          "schedule": Schedule(4, "cubic", min_step=0.01),
                          "gradient_precision": "model", "held_out_precision": "model"},
        summary="FALCON over a multi-stage schedule, gradients recomputed at every stage")
    register_method("sparsegpt", None, layerwise=sparsegpt.solve_layer, cost_aware=True,
                    settings=("damp",), builtin=True, defaults={"allocation": "uniform"},
                    summary="layer-wise OBS column sweeps (SparseGPT), uniform densities")
    register_method("wanda", None, layerwise=wanda.solve_layer, cost_aware=True,
                    structures=both, builtin=True, defaults={"allocation": "uniform"},
                    summary="layer-wise |w| x input norm per row (Wanda), uniform densities")


_register_builtins()

__all__ = ["MULTISTAGE_SOLVER", "Method", "Problem", "Schedule", "SolverOptions",
           "SolverResult", "SolverTrace", "get_method", "method_names", "register_method",
           "unregister_method"]
