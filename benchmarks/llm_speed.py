"""Tokens per second of SmolLM2-135M, dense and structurally pruned, measured side by side.

Both models are in this process, in float32 on the CPU with PyTorch's default threads;
their measurements alternate (dense, pruned, dense, ...) so that a change in the machine's
load falls on both, and each figure is the median of ``--repeats``:

- prefill: one forward pass over a batch of 1 x 512 tokens (the prompt, the key/value cache
  being built), tokens/s = 512 / seconds;
- decode: 128 new tokens at batch 1, greedy, with the key/value cache, after a prompt of
  16 tokens (``min_new_tokens`` makes every run generate all 128), tokens/s = 128 /
  (seconds of the generation less one prefill of the prompt).

The pruned model is the one llm_structured.py saved (``--pruned DIR``), loaded with
``falcon_prune.models.load_pruned``; its greedy tokens are checked against the ones the
pruning run's model generated before saving when the directory records them.

    python benchmarks/llm_structured.py --seeds 0 --rows "falcon flops 0.7"
    python benchmarks/llm_speed.py --out benchmarks/results/llm_speed.json
    python benchmarks/llm_speed.py \
        --pruned benchmarks/.cache/smollm2-structured/flops-0.7-nnz-0.55 \
        --out benchmarks/results/llm_speed_nnz.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from isolated import provenance, write_results
from llm_data import MODEL_DIR, held_out

HERE = Path(__file__).resolve().parent


def prefill_seconds(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(ids, use_cache=True)
        return time.perf_counter() - t


def decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    """Seconds of ``new`` greedy tokens after ``prompt`` (the prompt's prefill taken off)."""
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new
    return total - prefill_seconds(model, prompt)


def main() -> int:
    from transformers import AutoModelForCausalLM

    from falcon_prune.models import load_pruned
    from falcon_prune.runs.structured import model_macs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pruned", type=Path,
                    default=HERE / ".cache" / "smollm2-structured" / "flops-0.7")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm_speed.json")
    a = ap.parse_args()
    prov = provenance()
    dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    pruned = load_pruned(a.pruned)
    ids = held_out()[:1]
    prompt = ids[:, :16]
    models = {"dense": dense, "pruned": pruned}
    for m in models.values():  # warm up both
        prefill_seconds(m, ids)
        decode_seconds(m, prompt, 8)
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []}
                                                for k in models}
    for _ in range(a.repeats):
        for name, m in models.items():
            times[name]["prefill"].append(prefill_seconds(m, ids))
            times[name]["decode"].append(decode_seconds(m, prompt, a.new_tokens))
    out = {}
    for name, m in models.items():
        pre = statistics.median(times[name]["prefill"])
        dec = statistics.median(times[name]["decode"])
        out[name] = {"prefill_tokens_per_s": ids.shape[1] / pre,
                     "decode_tokens_per_s": a.new_tokens / dec,
                     "prefill_seconds": times[name]["prefill"],
                     "decode_seconds": times[name]["decode"],
                     "parameters": sum(p.numel() for p in m.parameters()),
                     "macs_per_token": model_macs(m, ids, lambda x, v: x(v)) / ids.shape[1]}
    with torch.no_grad():
        greedy = {k: m.generate(prompt, max_new_tokens=32, do_sample=False)[0].tolist()
                  for k, m in models.items()}
    before = a.pruned / "greedy_before_saving.json"
    same = json.loads(before.read_text()) == greedy["pruned"] if before.exists() else None
    ratios = {"prefill": out["pruned"]["prefill_tokens_per_s"]
              / out["dense"]["prefill_tokens_per_s"],
              "decode": out["pruned"]["decode_tokens_per_s"]
              / out["dense"]["decode_tokens_per_s"],
              "macs": out["pruned"]["macs_per_token"] / out["dense"]["macs_per_token"]}
    write_results(a.out, {"command": "python benchmarks/llm_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()), "pruned": str(a.pruned),
        "threads": torch.get_num_threads(), "models": out, "ratios": ratios,
        "greedy_tokens": greedy, "same_tokens_as_before_saving": same}, prov)
    print(f"prefill x{ratios['prefill']:.2f}  decode x{ratios['decode']:.2f}  "
          f"(MACs per token x{ratios['macs']:.2f}, {torch.get_num_threads()} threads); "
          f"greedy tokens as before saving: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
