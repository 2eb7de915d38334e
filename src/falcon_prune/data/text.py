"""Text for language models: a text file (or several) cut into token sequences, with fixed
disjoint calibration and held-out parts, and the perplexity of a model on sequences.

Sequences are consecutive, non-overlapping windows of ``length`` tokens of the tokenised
text, in order; :func:`split_sequences` keeps every ``every``-th window for the held-out
part, so the two parts never share a token and both cover the whole text.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from falcon_prune.errors import DataError, MissingFileError


def read_text(paths: str | Path | list) -> str:
    """The text of one file, or of several joined by blank lines (in the order given)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise MissingFileError(f"text file {path} does not exist")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def token_sequences(text: str, tokenizer, length: int = 512,
                    max_sequences: int | None = None) -> torch.Tensor:
    """(N, ``length``) int64: the tokenised text cut into consecutive windows (the last,
    shorter one dropped); at most ``max_sequences``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // length
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one sequence of "
                        f"{length}; pass more text or a shorter sequence length")
    if max_sequences is not None:
        n = min(n, max_sequences)
    return ids[: n * length].reshape(n, length).clone()


def split_sequences(ids: torch.Tensor, every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) parts of sequences ``ids`` (N, L): every ``every``-th
    sequence is held out."""
    held = torch.arange(len(ids)) % every == every - 1
    return ids[~held], ids[held]


def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 2) -> float:
    """exp of the mean next-token cross-entropy of a causal language model (a HuggingFace
    ``*ForCausalLM``: ``model(input_ids=..., use_cache=False).logits``) over the L - 1
    predicted tokens of every sequence of ``ids`` (N, L), in batches of ``batch_size``
    sequences (a batch's logits are batch x L x vocabulary floats)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for a in range(0, len(ids), batch_size):
                b = ids[a:a + batch_size].to(device)
                logits = model(input_ids=b, use_cache=False).logits[:, :-1]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1),
                    reduction="sum"))
                count += b[:, 1:].numel()
    finally:
        model.train(was)
    if count == 0:
        raise DataError("there are no sequences to evaluate on")
    return math.exp(total / count)
