"""Typed, frozen configuration: :class:`PruneConfig` (a ``prune`` run) and
:class:`GradualConfig` (a ``gradual`` run), each method's defaults and falcon++'s presets.

A method's defaults come from the method registry (:mod:`falcon_prune.methods`): every
setting it does not use is ``None`` in its config (passing one is refused, never
ignored), and it may set its own values of the others. ``prune`` and ``gradual`` return
the config they actually used (with the sampling chosen, the held-out count clipped to the
data, 'auto' precisions decided, ...). Validation and resolution of given settings live in
:mod:`falcon_prune.settings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from falcon_prune.data.tasks import Task
from falcon_prune.errors import ConfigError
from falcon_prune.methods import MULTISTAGE_SOLVER, get_method, method_names
from falcon_prune.methods.options import SolverOptions
from falcon_prune.methods.registry import (
    GRADIENT_SETTINGS,
    HELD_OUT_SETTINGS,
    LAYERWISE_SETTINGS,
    MULTISTAGE_SETTINGS,
    STRUCTURES,
)
from falcon_prune.methods.schedules import DEFAULT_SCHEDULE, Schedule

GRADIENT_PRECISIONS = ("model", "bfloat16", "auto")
#: samples whose BatchNorm statistics ``recalibrate_bn=True`` re-estimates
BN_SAMPLES = 1000
#: the settings that only some methods use (a method's registration says which)
OPTIONAL_SETTINGS = (*GRADIENT_SETTINGS, *HELD_OUT_SETTINGS, "solver", *MULTISTAGE_SETTINGS,
                     "obs_rank", *LAYERWISE_SETTINGS, "damp")


@dataclass(frozen=True)
class PruneConfig:
    """Every setting of a pruning run (see docs/api.md for each one).

    - ``method``, ``task`` (how the model is run and its loss), ``seed``, ``device``.
    - Gradients (methods with a loss model): ``n_gradients`` rows of X, each the
      gradient of ``samples_per_gradient`` samples, computed in ``gradient_precision``
      ('model': the working copy's own dtype; 'bfloat16': model, inputs and backward in
      bfloat16, the rows stored as ``dtype``; 'auto': bfloat16 where ``device`` multiplies
      it in hardware and the model is not float64, else 'model', decided when the run
      starts and reported in the result's config); ``ridge`` and ``alpha`` of the
      quadratic model; ``block_size`` (block-diagonal Hessian); X's storage ``dtype``,
      ``storage`` ('auto', 'memory', 'disk'), ``memory_limit`` (bytes), ``scratch_dir``.
    - ``n_validation`` held-out samples that falcon/falcon++ choose hyperparameters on,
      scored in ``held_out_precision`` ('model', 'bfloat16' or 'auto', as for the rows).
    - ``solver``: :class:`~falcon_prune.methods.options.SolverOptions` (chita, falcon, falcon++).
    - falcon++: ``schedule``, ``resample`` (new gradient samples at every stage),
      ``revive`` (let later stages bring pruned weights back).
    - Every method: ``min_density`` (each layer keeps at least this fraction of its
      weights), ``allow_empty_layers`` (let a layer lose every weight; by default each
      keeps at least one), ``recalibrate_bn`` (re-estimate BatchNorm statistics on that
      many samples after pruning; 0: keep them), ``sampling`` ('random', 'first', or None:
      random where the data allows), ``structure``: 'weights' (unstructured masks) or
      'channels' (whole coupled channels removed: a physically smaller network);
      ``include``/``exclude`` (parameter or module names as globs, module types, or
      predicates ``(name, module) -> bool``, or lists of them) change which parameters
      are prunable; ``flops_of``: 'prunable' (the FLOP budget is a fraction of the
      prunable parameters' MACs) or 'model' (of the whole network's, fixed MACs
      included).
    - structure='channels': ``keep_layers`` (modules whose output channels stay whole,
      besides the output layers), ``obs_rank`` (leading eigen-directions of the Fisher
      the group OBS saliency uses; None: all n), ``round_to`` (every group keeps a
      multiple of this many channels, or all: CPU and GPU kernels run faster on such
      counts; 4 by default with a ``latency=`` budget), ``latency_batch`` (the batch size
      a ``latency=`` budget is measured at; 1 when a latency budget is given without it,
      None without one), ``latency_tokens`` (with the layer-wise loss model: the tokens
      per sequence a language model's latency is measured at, 1 for one decoding step's
      matrix-vector products; the calibration length when not given).

    - falcon++: ``effort``, the named preset the defaults came from ('default'; 'best',
      the most accurate in about 2.5 times the time; 'fast', about 0.4 times: see
      :data:`EFFORTS`); settings given beside it are applied over the preset.
    - Methods with a layer solver (falcon, sparsegpt, wanda): ``loss_model`` ('global':
      gradient rows of the whole network; 'layerwise': each linear layer's input Gram,
      block by block; 'auto', falcon's default: layer-wise when the global model would not
      fit the memory limit and the model has repeated blocks, decided when the run starts
      and reported), ``n_calibration`` sequences run through the blocks, ``pattern``
      ('2:4'-like n:m sparsity, or None), ``allocation`` of the layers' densities ('ilp':
      the knapsack of their error curves under both budgets; 'uniform'; 'owl': by their
      share of outlier features), ``blocks`` (the path of the blocks' ``nn.ModuleList``;
      None: found), ``passes`` (2: the error curves measured again on the pruned inputs and
      the densities allocated again), ``damp`` (the OBS sweep's ridge, times the mean
      diagonal of a Gram).
    - structure='channels' with the layer-wise loss model: ``attention_units`` ('groups':
      a key/value head with its query heads; 'heads': the same query head of every
      key/value group, which keeps every group's query count equal and the key/value
      heads whole; the model's code must allow groups of fewer query heads).

    A field the method does not use is None."""

    method: str = "falcon"
    task: Task | None = None
    seed: int = 0
    device: str = "cpu"
    n_gradients: int | None = 1000
    samples_per_gradient: int | None = 1
    n_validation: int | None = 1000
    ridge: float | None = 1e-3
    alpha: float | None = 0.0
    block_size: int | None = None
    solver: SolverOptions | None = SolverOptions()
    schedule: Schedule | None = None
    resample: bool | None = None
    revive: bool | None = None
    min_density: float = 0.0
    allow_empty_layers: bool = False
    recalibrate_bn: int = 0
    sampling: str | None = None
    dtype: torch.dtype | None = torch.float32
    gradient_precision: str | None = "model"
    held_out_precision: str | None = "model"
    storage: str | None = "auto"
    memory_limit: int | None = None
    scratch_dir: str | None = None
    structure: str = "weights"
    include: Any = None
    exclude: Any = None
    flops_of: str = "prunable"
    keep_layers: tuple[str, ...] | None = None
    obs_rank: int | None = None
    round_to: int | None = None
    latency_batch: int | None = None
    latency_tokens: int | None = None
    effort: str | None = None
    loss_model: str | None = "layerwise"
    n_calibration: int | None = 128
    pattern: str | None = None
    allocation: str | None = "uniform"
    blocks: str | None = None
    passes: int | None = 1
    damp: float | None = 0.01
    attention_units: str | None = None

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with some settings changed (validated by ``prune``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready settings (the task by name, dtypes and schedules as text)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Task):
                v = v.name
            elif f.name in ("include", "exclude") and v is not None:
                v = _describe(v)
            elif isinstance(v, torch.dtype):
                v = str(v).replace("torch.", "")
            elif isinstance(v, (SolverOptions, Schedule)):
                v = {k: list(x) if isinstance(x, tuple) else x
                     for k, x in dataclasses.asdict(v).items()}
            out[f.name] = v
        return out


def _describe(v: object) -> object:
    """A JSON-ready description of a selector."""
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_describe(x) for x in v]
    if isinstance(v, type):
        return f"type {v.__module__}.{v.__qualname__}"
    if isinstance(v, str):
        return v
    return f"function {getattr(v, '__qualname__', repr(v))}"


class _MethodNames(Sequence):
    """The names of the registered methods, as registered now (a live view)."""

    def __getitem__(self, i):
        return method_names()[i]

    def __len__(self) -> int:
        return len(method_names())

    def __repr__(self) -> str:
        return repr(method_names())


class _Defaults(Mapping):
    """{method: its default PruneConfig for structure='weights'} of the registered methods
    (a live view; :func:`defaults` also gives structure='channels' and the presets)."""

    def __getitem__(self, method: str) -> PruneConfig:
        if method not in method_names():
            raise KeyError(method)
        return defaults(method)

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())


#: the registered methods' names
METHODS: Sequence[str] = _MethodNames()
#: each registered method's defaults (structure='weights')
DEFAULTS: Mapping[str, PruneConfig] = _Defaults()

#: falcon++'s named presets: the changes to its defaults (docs/tuning.md has the runs that
#: chose them and their cost). 'default': 8 cubic stages of 1,000 two-sample rows,
#: magnitude warm starts, 1,000 held-out samples, rows and scores in bfloat16 where the
#: hardware has it; 'best': 12 stages, OBS warm starts, 500 held-out samples, in the
#: model's precision (the most accurate, about 2.5 times the time); 'fast': 6 stages of
#: 500 rows and 500 held-out samples (about 0.4 times the time).
EFFORTS: dict[str, dict[str, Any]] = {
    "default": {},
    "best": {"schedule": Schedule(12, "cubic", min_step=0.01), "n_validation": 500,
             "gradient_precision": "model", "held_out_precision": "model",
             "solver": MULTISTAGE_SOLVER.replace(saliencies=("obs",))},
    "fast": {"schedule": Schedule(6, "cubic", min_step=0.01), "n_gradients": 500,
             "n_validation": 500},
}


def defaults(method: str = "falcon", structure: str = "weights",
             effort: str = "default") -> PruneConfig:
    """The default :class:`PruneConfig` of the registered ``method`` for ``structure``
    ('weights' or 'channels'); for falcon++, ``effort`` names a preset of
    :data:`EFFORTS`."""
    m = get_method(method)
    if structure not in STRUCTURES:
        raise ConfigError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if effort != "default":
        if effort not in EFFORTS:
            raise ConfigError(f"effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
        if method != "falcon++" or structure != "weights":
            raise ConfigError(f"effort={effort!r} is a preset of falcon++ with "
                              "structure='weights'; drop it")
    if structure not in m.structures:
        only = "single weights" if m.structures == ("weights",) else " or ".join(m.structures)
        raise ConfigError(f"structure={structure!r} supports "
                          f"{', '.join(method_names(structure))}; {method!r} chooses "
                          f"{only} only")
    unused = {k: None for k in OPTIONAL_SETTINGS if k != "stages" and k not in m.uses}
    cfg = PruneConfig(method=method).replace(**unused, **m.defaults)
    if m.multistage and cfg.schedule is None:
        cfg = cfg.replace(schedule=DEFAULT_SCHEDULE)
    if structure == "channels":  # units: no n:m pattern, one pass
        cfg = cfg.replace(structure="channels", keep_layers=(), pattern=None,
                          attention_units="groups",
                          **({"passes": 1} if cfg.passes is not None else {}),
                          **m.channel_defaults)
    if effort != "default":
        cfg = cfg.replace(effort=effort, **EFFORTS[effort])
    return cfg


def multistage_options(**changes: Any) -> SolverOptions:
    """falcon++'s default :class:`SolverOptions` with ``changes`` applied, e.g.
    ``multistage_options(ridges=(1e-3,))`` to change one choice and keep the others."""
    return MULTISTAGE_SOLVER.replace(**changes)


@dataclass(frozen=True)
class GradualConfig:
    """Every setting of a gradual run: the budget ``schedule`` (default 5 cubic stages),
    ``epochs_per_stage`` fine-tuning epochs after each pruning step and ``final_epochs`` at
    the target, ``batch_size``, the default optimizer's ``lr``, ``momentum`` and
    ``weight_decay`` (SGD, cosine LR per epoch), ``bn_batches`` training batches that
    BatchNorm statistics are re-estimated on after each step, and ``step``: the
    :class:`PruneConfig` of every pruning step (method, gradients, held-out samples,
    solver, floors, task, seed, device)."""

    step: PruneConfig
    schedule: Schedule = Schedule(5, "cubic")
    epochs_per_stage: int = 1
    final_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_batches: int = 20

    def replace(self, **changes: Any) -> GradualConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["step"] = self.step.to_dict()
        out["schedule"] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(self.schedule).items()}
        return out


def gradual_defaults(method: str = "falcon", structure: str = "weights") -> GradualConfig:
    """The default :class:`GradualConfig` of ``method`` (any single-stage method) and
    ``structure``; its steps use 500 gradients and 500 held-out samples."""
    if get_method(method).multistage:
        raise ConfigError(f"{method} is multi-stage one-shot pruning; gradual's steps use a "
                          "single-stage method (e.g. method='falcon')")
    step = defaults(method, structure)
    if step.n_gradients is not None:
        step = step.replace(n_gradients=500)
    if step.n_validation is not None:
        step = step.replace(n_validation=500)
    return GradualConfig(step=step)
