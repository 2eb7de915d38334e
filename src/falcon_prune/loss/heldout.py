"""Held-out scores: the task's loss of a candidate network on samples set aside.

falcon chooses among its candidates (warm starts, ridges, IHT) by the loss of each on
held-out samples: :class:`HeldOutScorer` evaluates flat prunable weights without touching
the model (``torch.func.functional_call``), optionally in bfloat16, optionally with each
candidate's BatchNorm statistics re-estimated first, and with several processes each
scoring its share of the samples.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from falcon_prune.analysis.batchnorm import recalibrate_batchnorm
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.masks import clone_model
from falcon_prune.data.batches import Batch, Samples, map_tensors, to_device
from falcon_prune.data.evaluation import Evaluation, evaluate_batches
from falcon_prune.data.tasks import Task, TaskRunner
from falcon_prune.errors import ConfigError
from falcon_prune.loss.distributed import Ranks


class HeldOutScorer:
    """The task's mean loss on the held-out samples of the network with flat prunable
    weights w (p,) (eval mode); remembers the metric that went with each loss it returned,
    so the stage record of the chosen candidate needs no second pass. With ``bn_inputs``
    (model inputs), each candidate's BatchNorm statistics are re-estimated on them first
    (in a scratch copy of the model, in the model's dtype), so candidates are judged as
    they will be used. With ``precision`` (bfloat16), the forward passes run with the
    weights, buffers and samples cast to it and the loss is taken in float32 from the
    cast-back predictions. With several ``ranks``, each evaluates its share of the
    held-out samples and the sums are reduced, so every rank gets the same loss."""

    def __init__(self, model: nn.Module, cm: CostModel, held: Samples, task: Task,
                 device: torch.device, batch: int = 256, bn_inputs: Batch | None = None,
                 ranks: Ranks | None = None, precision: torch.dtype | None = None):
        self.ranks = ranks or Ranks()
        held = held.take(slice(*self.ranks.bounds(len(held))))
        self.runner, self.cm, self.task = TaskRunner(model, task), cm, task
        self.names = ["model." + lay.name for lay in cm.layers]
        self.prunable = {id(lay.tensor) for lay in cm.layers}  # the parameters themselves
        self.precision = precision
        self.dtypes = [lay.tensor.dtype for lay in cm.layers]
        # on the device once; images channels-last (convolutions ~1.6x faster on CPU)
        self.batches = [map_tensors(to_device(b, device),
                                    lambda t: _channels_last(self._cast(t)))
                        for b in held.chunks(batch)]
        self.metric: dict[float, float | None] = {}
        self.bn_inputs, self.device = bn_inputs, device
        self.scratch = clone_model(model) if bn_inputs is not None else None
        self.scratch_runner = TaskRunner(self.scratch, task) if bn_inputs is not None else None

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.precision) if self.precision and t.is_floating_point() else t

    def _cast_all(self, module: nn.Module, skip: set[int] = frozenset()) -> dict:
        """Every parameter and buffer of ``module`` (names under ``model.``) in
        ``precision``, except the tensors whose ids are in ``skip`` (under any name: a
        weight tied to a prunable one takes its value from it in the call)."""
        named = [*module.named_parameters(), *module.named_buffers()]
        return {"model." + k: self._cast(v.detach()) for k, v in named if id(v) not in skip}

    def _params(self, w: torch.Tensor, overrides: dict | None, cast: bool = True
                ) -> dict[str, torch.Tensor]:
        """{name: tensor} of the prunable weights from ``w`` and the ``overrides``, in the
        model's dtypes, or in ``precision`` if set and ``cast``."""
        params = {n: t.to(self.precision if cast and self.precision else d)
                  for n, t, d in zip(self.names, self.cm.split(w), self.dtypes, strict=True)}
        params.update({"model." + k: self._cast(v) if cast else v
                       for k, v in (overrides or {}).items()})
        return params

    def evaluation(self, w: torch.Tensor, overrides: dict | None = None) -> Evaluation:
        """Loss and metric with flat weights ``w`` (p,) and, optionally, other parameters
        replaced (``overrides``: {parameter name: tensor}), over every rank's share."""
        if not self.ranks.active:
            return self._local(w, overrides)
        ev = self._local(w, overrides) if self.batches else None
        k = 0 if ev is None else ev.samples
        sums = torch.tensor([0.0, 0.0, 0.0] if ev is None else
                            [ev.loss * k, (ev.metric or 0.0) * k, k], dtype=torch.float64)
        loss, metric, n = self.ranks.all_sum(sums).tolist()
        return Evaluation(loss / n, metric / n if self.task.metric is not None else None,
                          self.task.metric_name, int(n))

    def _local(self, w: torch.Tensor, overrides: dict | None) -> Evaluation:
        """:meth:`evaluation` on this rank's held-out samples."""
        if self.scratch is None:
            # in ``precision``, the model's other parameters and buffers as they are now too
            fixed = {} if self.precision is None else self._cast_all(self.runner.model,
                                                                     self.prunable)
            runner, swap = self.runner, {**fixed, **self._params(w, overrides)}
        else:
            own = dict(self.scratch.named_parameters())
            with torch.no_grad():
                for name, value in self._params(w, overrides, cast=False).items():
                    own[name.removeprefix("model.")].copy_(value)
            recalibrate_batchnorm(self.scratch, self.bn_inputs, self.device,
                                  call=self.task.call)
            runner, swap = self.scratch_runner, (
                {} if self.precision is None else self._cast_all(self.scratch))
        try:
            with torch.inference_mode():
                return evaluate_batches(
                    lambda b: self._in_float(functional_call(runner, swap, (b,))),
                    self.batches, self.task)
        except (RuntimeError, TypeError) as e:
            if self.precision is None:
                raise
            raise ConfigError(
                f"the held-out scores could not be computed in {self.precision} ({e}); if "
                "the model runs in float32, pass held_out_precision='model'") from e

    def _in_float(self, out: Batch) -> Batch:
        """(prediction, targets) back in float32 when the pass ran in ``precision``."""
        if self.precision is None:
            return out
        return map_tensors(out, lambda t: t.float() if t.is_floating_point() else t)

    def __call__(self, w: torch.Tensor, overrides: dict | None = None) -> float:
        ev = self.evaluation(w, overrides)
        self.metric[ev.loss] = ev.metric
        return ev.loss


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t
