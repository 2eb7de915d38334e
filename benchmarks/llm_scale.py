"""Layer-wise pruning at scale: a 7-billion-parameter Llama on one GPU, and memory that does
not grow with depth.

``--size 7b --device cuda``: a Llama-2-7B-shaped model (32 blocks of 4096 wide, 32 heads,
MLP 11008, vocabulary 32000) built from its configuration with seeded random weights in
``--dtype`` (bfloat16) on the CPU, pruned by falcon layer-wise to ``--nnz`` with the blocks
visiting the GPU one at a time; reports seconds per block, the GPU's peak memory and the
process's peak RSS. ``--size tiny`` runs the same code on a small model (a check on any
machine).

``--depth``: two models of the same width, one twice as deep, each pruned in a fresh
process; reports each run's peak RSS above what the model and the working copy hold when
the blocks start (the working memory of the calibration: one block's activations and its
Grams), which must not grow with depth. Each run fixes glibc's mmap threshold at 1 MiB
(``mallopt``), so that a freed tensor goes back to the system at once and the resident
memory measures what is alive, not how the allocator's heap happened to fragment.

    python benchmarks/llm_scale.py --size 7b --device cuda \
        --out benchmarks/results/llm_scale_7b.json
    python benchmarks/llm_scale.py --depth --out benchmarks/results/llm_depth.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

from isolated import provenance, run_isolated, write_results

HERE = Path(__file__).resolve().parent
SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=500),
    "wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=1000),
}


def _vm(key: str) -> float:
    """A /proc/self/status figure in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(size: str, layers: int | None, dtype: str):
    import torch
    import transformers as T

    spec = dict(SIZES[size], max_position_embeddings=4096)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**spec)).to(getattr(torch, dtype)).eval()
    return model, spec


def _fixed_mmap_threshold() -> bool:
    """Tensors of 1 MiB and more mapped on their own, unmapped when freed (glibc only)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def run_one(size: str, layers: int | None, device: str, dtype: str, sequences: int,
            length: int, nnz: float, method: str) -> dict:
    """Prune one model; the peak RSS of the block-by-block work is measured from the
    moment the blocks start (the peak counter reset there)."""
    fixed = _fixed_mmap_threshold()
    import torch

    import falcon_prune as fp
    from falcon_prune.runs import layerwise

    model, spec = build(size, layers, dtype)
    ids = torch.randint(0, spec["vocab_size"], (sequences, length),
                        generator=torch.Generator().manual_seed(1))
    marks = {}
    real_setup = layerwise.setup

    def setup(*args, **kwargs):  # the blocks start when setup returns
        out = real_setup(*args, **kwargs)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        marks["rss_at_blocks_mb"] = _vm("VmRSS")
        return out

    layerwise.setup = setup
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    kw = dict(method=method, nnz=nnz) if method != "falcon" else dict(
        method="falcon", loss_model="layerwise", nnz=nnz)
    r = fp.prune(model, ids, task="language_modeling", n_calibration=sequences,
                 device=device, progress=False, **kw)
    seconds = time.perf_counter() - t
    out = {"size": size, "layers": spec["num_hidden_layers"], "device": device,
           "dtype": dtype, "sequences": sequences, "length": length, "method": method,
           "seconds": seconds, "seconds_per_block": r.times["prune"] / spec[
               "num_hidden_layers"], "nnz_fraction": r.nnz_fraction,
           "parameters": sum(p.numel() for p in model.parameters()),
           "peak_rss_during_blocks_mb": _vm("VmHWM"), **marks,
           "peak_rss_mb": r.peak_rss_mb, "mmap_threshold_fixed": fixed}
    out["working_mb"] = out["peak_rss_during_blocks_mb"] - marks["rss_at_blocks_mb"]
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="7b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--nnz", type=float, default=0.5)
    ap.add_argument("--method", default="falcon", choices=["falcon", "sparsegpt", "wanda"])
    ap.add_argument("--depth", action="store_true",
                    help="compare a model with one twice as deep (peak working memory)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm_scale.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(**json.loads(a.one))))
        return 0
    prov = provenance()
    if a.depth:
        rows = [run_isolated(__file__, ["--one", json.dumps(dict(
            size="wide", layers=depth, device="cpu", dtype="float32", sequences=32,
            length=256, nnz=0.5, method="falcon"))]) for depth in (4, 8)]
        ratio = rows[1]["working_mb"] / rows[0]["working_mb"]
        record = {"rows": rows, "working_memory_ratio_deep_to_shallow": ratio}
    else:
        rows = [run_isolated(__file__, ["--one", json.dumps(dict(
            size=a.size, layers=None, device=a.device, dtype=a.dtype, sequences=a.sequences,
            length=a.length, nnz=a.nnz, method=a.method))])]
        record = {"rows": rows}
    write_results(a.out, {"command": " ".join(["python", *__import__("sys").argv]),
                          **record}, prov)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
