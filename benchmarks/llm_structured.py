"""SmolLM2-135M made smaller: structured pruning (attention head groups, MLP channels) at 70 %
and 50 % of the model's FLOPs, beside Torch-Pruning.

Every row prunes the pretrained SmolLM2-135M-Instruct (llm_data.py) one-shot with the same
128 calibration sequences of 512 tokens (drawn by seed) and measures the held-out
perplexity (32 other sequences of 512 tokens) with the same code as llm_prune.py. The FLOP
budget is a fraction of the whole model's MACs per token at 512 tokens (``flops_of=
'model'``: the embeddings' lookups are free, the tied output head and attention's own
products count), recounted on the pruned model with PyTorch's FLOP counter. Rows:

- ``falcon``: this library's structured layer-wise pruning (group OBS with a least-squares
  refit of o_proj and down_proj; each block's head groups and channels from the knapsack
  over the blocks' error curves, with its certificate);
- ``falcon uniform``: the same, every block keeping the same fraction of its units;
- ``wanda uniform``: units scored by |W| times the input norm, no refit, one fraction;
- ``falcon flops 0.7 decode latency 0.75``: the FLOP budget and a latency budget of 75 %
  of the dense model's measured time per forward at 1 sequence of 1 token (a decoding
  step's matrix-vector products; the block-time table of ``latency_tokens=1``), the
  model's time measured on this machine (run it with nothing else heavy running);
- ``torch-pruning``: Torch-Pruning's LLM recipe (BasePruner over the dependency graph, the
  model's head counts given, group L2 magnitude, uniform per layer), with a time limit: a
  failure or a run past it records its message instead of a perplexity.

    bash benchmarks/llm_setup.sh     # once: model and text
    python benchmarks/llm_structured.py --seeds 0 1 2 --out benchmarks/results/llm_structured.json

The 70 % falcon rows of seed 0 also save their models for llm_speed.py, in ``--save DIR``
(default benchmarks/.cache/smollm2-structured): ``falcon flops 0.7`` in ``DIR/flops-0.7``,
``falcon flops 0.7 nnz 0.55`` (the same FLOP budget and 55 % of the blocks' parameters: at
batch 1 decoding reads every weight once per token, so its speed follows the parameters)
in ``DIR/flops-0.7-nnz-0.55``, and the decode-latency row in ``DIR/flops-0.7-decode-0.75``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from isolated import run_rows

HERE = Path(__file__).resolve().parent
SAVED = HERE / ".cache" / "smollm2-structured"
#: rows of seed 0 whose model is saved, and the folder under --save
SAVED_ROWS = {"falcon flops 0.7": "flops-0.7", "falcon flops 0.7 nnz 0.55": "flops-0.7-nnz-0.55",
              "falcon flops 0.7 decode latency 0.75": "flops-0.7-decode-0.75"}
#: seconds Torch-Pruning gets before its row records a time-out
TP_LIMIT = 900

COMMON = {"structure": "channels", "loss_model": "layerwise", "flops_of": "model"}
ROWS = {
    "dense": {},
    "falcon flops 0.7": {**COMMON, "method": "falcon", "flops": 0.7, "allocation": "ilp"},
    "falcon uniform flops 0.7": {**COMMON, "method": "falcon", "flops": 0.7,
                                 "allocation": "uniform"},
    "wanda uniform flops 0.7": {**COMMON, "method": "wanda", "flops": 0.7,
                                "allocation": "uniform"},
    "torch-pruning flops 0.7": {"tp": 0.7},
    "falcon flops 0.7 nnz 0.55": {**COMMON, "method": "falcon", "flops": 0.7, "nnz": 0.55,
                                  "allocation": "ilp"},
    # a latency budget measured at one token per sequence (a decoding step's matrix-vector
    # products) beside the FLOP budget
    "falcon flops 0.7 decode latency 0.75": {**COMMON, "method": "falcon", "flops": 0.7,
                                             "latency": 0.75, "latency_tokens": 1,
                                             "allocation": "ilp"},
    "falcon flops 0.5": {**COMMON, "method": "falcon", "flops": 0.5, "allocation": "ilp"},
    "falcon uniform flops 0.5": {**COMMON, "method": "falcon", "flops": 0.5,
                                 "allocation": "uniform"},
    "wanda uniform flops 0.5": {**COMMON, "method": "wanda", "flops": 0.5,
                                "allocation": "uniform"},
    "torch-pruning flops 0.5": {"tp": 0.5},
}


def _measure(model, dense_macs: float | None = None) -> dict:
    """Held-out perplexity, MACs per token (FLOP counter, 512 tokens) and parameters."""
    from llm_data import held_out

    from falcon_prune.data.text import perplexity
    from falcon_prune.runs.structured import model_macs

    ids = held_out()
    macs = model_macs(model, ids[:1], lambda m, x: m(x)) / ids.shape[1]
    row = {"perplexity": perplexity(model, ids), "macs_per_token": macs,
           "parameters": sum(p.numel() for p in model.parameters())}
    if dense_macs:
        row["flops_fraction"] = macs / dense_macs
    return row


def _dense():
    import torch
    from llm_data import MODEL_DIR
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def run_ours(label: str, seed: int, save: Path | None) -> dict:
    """One of this library's rows, in this process."""
    import torch
    from llm_data import calibration

    import falcon_prune as fp
    from falcon_prune.results import peak_rss_mb
    from falcon_prune.runs.structured import model_macs

    model = _dense()
    dense = model_macs(model, calibration(0, 1), lambda m, x: m(x)) / 512
    row = {"label": label, "seed": seed, "peer": "falcon-prune"}
    if label == "dense":
        return {**row, **_measure(model, dense)}
    torch.manual_seed(seed)
    t = time.perf_counter()
    r = fp.prune(model, calibration(seed), task="language_modeling", n_calibration=128,
                 seed=seed, progress=False, **ROWS[label])
    row.update(seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb(),
               config=r.config.to_dict(), times=r.times, allocation_gap=r.ilp_gap,
               reported_flops_fraction=r.flops_fraction,
               details={k: v for k, v in r.details.items() if k != "layers"},
               layers=r.details["layers"])
    if save is not None and label in SAVED_ROWS and seed == 0:
        save = save / SAVED_ROWS[label]
        from llm_data import held_out

        fp.models.save_language_model(r.model, None, save)
        with torch.no_grad():  # what the model generated before saving, for llm_speed.py
            greedy = r.model.generate(held_out()[:1, :16], max_new_tokens=32,
                                      do_sample=False)[0].tolist()
        (save / "greedy_before_saving.json").write_text(json.dumps(greedy))
        row["saved"] = str(save)
    return {**row, **_measure(r.model, dense)}


def run_tp(label: str, seed: int) -> dict:
    """Torch-Pruning's LLM recipe in a child process with a time limit."""
    cmd = [sys.executable, __file__, "--tp-child", str(ROWS[label]["tp"]), str(seed)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TP_LIMIT)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"label": label, "seed": seed, "peer": "torch-pruning",
                "failed": f"no answer within {TP_LIMIT} s (killed)",
                "stack_before_the_limit": _last_stack(err),
                "seconds": time.perf_counter() - t}
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        return {"label": label, "seed": seed, "peer": "torch-pruning",
                "failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                else f"exit {proc.returncode}", "seconds": time.perf_counter() - t}
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def _last_stack(stderr: str) -> list[str]:
    """The frames of the main thread in the last stack dump of ``stderr`` (faulthandler's,
    innermost first): where Torch-Pruning was when its time ran out."""
    dumps = stderr.split("Thread 0x")
    main = [d for d in dumps if "tp_child" in d or "<module>" in d]
    return [ln.strip() for ln in (main[-1] if main else "").splitlines()[1:] if ln.strip()]


def tp_child(flops: float, seed: int) -> dict:
    """Torch-Pruning 1.6 on SmolLM2: its LLM example's settings (the model's head counts,
    GQA heads pruned whole, group L2 magnitude, the output head ignored), one pruning
    ratio for every layer chosen by bisection so the recounted MACs meet ``flops``."""
    import faulthandler

    import torch_pruning as tp
    from llm_data import calibration

    from falcon_prune.runs.structured import model_macs

    faulthandler.dump_traceback_later(TP_LIMIT - 30)  # where it is, if it runs out of time
    dense_model = _dense()
    x = calibration(seed, 1)[:, :64]
    dense = model_macs(dense_model, calibration(0, 1), lambda m, v: m(v)) / 512

    def pruned(ratio: float):
        model = _dense()
        cfg = model.config
        heads = {}
        for m in model.modules():
            if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                heads[m.q_proj] = cfg.num_attention_heads
                heads[m.k_proj] = heads[m.v_proj] = cfg.num_key_value_heads
        pruner = tp.pruner.BasePruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
            output_transform=lambda out: out.logits, round_to=4)
        pruner.step()
        for m in model.modules():
            if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features
        return model

    t = time.perf_counter()
    lo, hi, best = 0.0, 0.9, None
    for _ in range(6):
        ratio = (lo + hi) / 2
        model = pruned(ratio)
        frac = model_macs(model, calibration(0, 1), lambda m, v: m(v)) / 512 / dense
        if frac <= flops:
            best, hi = (ratio, model), ratio
        else:
            lo = ratio
    if best is None:
        raise SystemExit(f"no pruning ratio up to 0.9 reaches {flops} of the FLOPs")
    ratio, model = best
    return {"label": f"torch-pruning flops {flops}", "seed": seed, "peer": "torch-pruning",
            "ratio": ratio, "seconds": time.perf_counter() - t, **_measure(model, dense)}


def summary(rows: list[dict]) -> list[dict]:
    """Per label: the median perplexity over its seeds (rows that ran)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label and "perplexity" in r]
        if mine:
            out.append({"label": label, "seeds": [r["seed"] for r in mine],
                        "perplexity": statistics.median(r["perplexity"] for r in mine),
                        "flops_fraction": statistics.median(r["flops_fraction"]
                                                            for r in mine)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    metavar="LABEL")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm_structured.json")
    ap.add_argument("--save", type=Path, default=SAVED)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("LABEL", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--tp-child", nargs=2, metavar=("FLOPS", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tp_child:
        print("RESULT " + json.dumps(tp_child(float(a.tp_child[0]), int(a.tp_child[1]))))
        return 0
    if a.one:
        label, seed = a.one[0], int(a.one[1])
        row = run_tp(label, seed) if "tp" in ROWS[label] else run_ours(label, seed, a.save)
        print("RESULT " + json.dumps(row, default=str))
        return 0
    rows = run_rows(__file__, a.rows, a.seeds, a.out, a.append,
                    ("label", "seed", "perplexity", "flops_fraction", "seconds", "failed"),
                    ["--save", str(a.save)])
    for s in summary(rows):
        print(f"{s['label']:<28} ppl {s['perplexity']:8.2f}  flops {s['flops_fraction']:.3f}"
              f"  seeds {s['seeds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
