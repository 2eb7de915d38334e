"""How much the loss feels an error in each layer's outputs: the weights that make the
layer-wise errors of different layers comparable.

Pruning a linear layer W (r, d) to Ŵ changes its output at token t by δ_t = (Ŵ − W) x_t.
To second order, with the Fisher (Gauss-Newton) model that the global loss model rests on
too, the loss changes by about ½ Σ_t δ_tᵀ F_t δ_t, where F_t = E[g_t g_tᵀ] and g_t is the
gradient of the loss with respect to the layer's output y_t. Taking F_t ≈ s·I, with s the
mean of g² over the layer's outputs and tokens (an isotropic, K-FAC-like approximation),
the change is s·T·tr((Ŵ − W) H (Ŵ − W)ᵀ) for T tokens and H the mean of x xᵀ: the layer's
reconstruction error times its sensitivity s. The allocation adds these weighted errors up
across layers; the plain errors are in each layer's own units (a layer that writes into a
large residual stream, or one that the final norm divides down, would otherwise look as
important as any other).

:func:`output_sensitivity` measures s for every prunable layer from backward passes on a few
calibration sequences, one at a time, with each block checkpointed: only the blocks' inputs
are kept through the forward pass, and a block's activations are recomputed when the
backward pass reaches it, so that the memory is one block's activations however deep the
model is. No parameter gradient is computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from falcon_prune.analysis.blocks import Blocks, state_key
from falcon_prune.data.batches import Batch, to_device
from falcon_prune.data.tasks import Task, batch_sum
from falcon_prune.loss.distributed import Ranks


@contextmanager
def _checkpointed(blocks: Blocks, device: torch.device) -> Iterator[None]:
    """Within: every block runs on ``device`` under activation checkpointing (its inputs
    kept, its activations recomputed in the backward pass), then goes back home."""
    originals = [block.forward for block in blocks.modules]
    own = ["forward" in vars(block) for block in blocks.modules]  # e.g. an offload hook's

    def wrap(block: nn.Module, forward):
        def run(*args, **kwargs):
            home = next((p.device for p in block.parameters()), device)
            block.to(device)
            try:
                return forward(*args, **kwargs)
            finally:
                block.to(home)

        def checkpointed(*args, **kwargs):
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return checkpointed

    try:
        for block, forward in zip(blocks.modules, originals, strict=True):
            block.forward = wrap(block, forward)
        yield
    finally:
        for block, forward, mine in zip(blocks.modules, originals, own, strict=True):
            if mine:
                block.forward = forward
            else:
                del block.forward  # the class's own forward again


@contextmanager
def _grad_from_first_block(model: nn.Module, blocks: Blocks) -> Iterator[None]:
    """Within: no parameter asks for a gradient, and the hidden states entering the first
    block do, so that the backward pass reaches every block and stops there."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        key = state_key(args, kwargs)
        if key == 0:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        kwargs[key] = kwargs[key].detach().requires_grad_()
        return args, kwargs

    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _gradient_hooks(layers: dict[str, nn.Module], sums: dict[str, torch.Tensor],
                    counts: dict[str, int]) -> list:
    """Forward hooks that add each layer's output gradient's squares, per output feature
    (r,), to ``sums`` (and its tokens to ``counts``) when the backward pass goes through
    it."""
    def hook_of(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and out.requires_grad):
                return

            def add(grad: torch.Tensor) -> None:
                g = grad.detach().double()
                sums[name] = sums[name] + g.pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
                counts[name] += g.numel() // g.shape[-1]
            out.register_hook(add)
        return hook

    return [m.register_forward_hook(hook_of(n)) for n, m in layers.items()]


def output_sensitivity(model: nn.Module, blocks: Blocks, layers: dict[str, nn.Module],
                       batches: list[Batch], task: Task, device: torch.device,
                       ranks: Ranks, progress: bool = False, per_output: bool = False
                       ) -> dict[str, float] | dict[str, torch.Tensor]:
    """{layer name: s}, s the mean over tokens, outputs and sequences of the squared
    gradient of the summed per-sample loss with respect to the layer's outputs (units:
    loss² per output²), from the ``batches`` (this process's; summed over the processes).
    ``per_output``: s is instead a float64 vector (r,), the mean over tokens and sequences
    of each output feature's squared gradient (a diagonal rather than an isotropic Fisher
    on the layer's outputs). The model is run in evaluation mode and left unchanged."""
    sums = {n: torch.zeros((), dtype=torch.float64) for n in layers}
    counts = dict.fromkeys(layers, 0)
    was = model.training
    model.eval()
    with ExitStack() as stack:
        stack.enter_context(_checkpointed(blocks, device))
        stack.enter_context(_grad_from_first_block(model, blocks))
        handles = _gradient_hooks(layers, sums, counts)
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(lambda: model.train(was))
        for batch in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress):
            with torch.enable_grad():
                pred, targets = task.run(model, to_device(batch, device))
                loss = batch_sum(task.losses(pred, targets), pred.shape[0])
                loss.backward()
    names = sorted(layers)
    # every layer's width from the processes whose backward passes reached it, then all the
    # sums in one reduction and the token counts in another
    widths = ranks.all_max(torch.tensor([float(sums[n].numel()) for n in names])).long()
    local = torch.cat([sums[n].reshape(-1) if sums[n].numel() == w
                       else torch.zeros(int(w), dtype=torch.float64)
                       for n, w in zip(names, widths.tolist(), strict=True)])
    total = ranks.all_sum(local).split(widths.tolist())
    tokens = ranks.all_sum(torch.tensor([float(counts[n]) for n in names],
                                        dtype=torch.float64))
    means = [t / max(1.0, float(c)) for t, c in zip(total, tokens, strict=True)]
    return {n: m if per_output else float(m.mean()) for n, m in zip(names, means, strict=True)}
