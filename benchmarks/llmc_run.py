"""One llm-compressor one-shot run (its SparseGPT or Wanda), in llm-compressor's own virtual
environment (benchmarks/.cache/llmc-venv; llm_setup.sh makes it). It does not import
falcon_prune: llm_prune.py starts it, gives it the calibration token sequences, and
measures the saved model's perplexity with the same code as every other row.

    benchmarks/.cache/llmc-venv/bin/python benchmarks/llmc_run.py --model DIR \\
        --calibration calib.pt --method sparsegpt --sparsity 0.5 --mask 0:0 --out OUT

Prints ``RESULT {json}`` with the seconds of the one-shot call and the process's peak
resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--mask", default="0:0", help="n:m mask structure, 0:0 unstructured")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(a.calibration)
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    kind = SparseGPTModifier if a.method == "sparsegpt" else WandaPruningModifier
    recipe = kind(sparsity=a.sparsity, mask_structure=a.mask, targets=["Linear"],
                  ignore=["lm_head"])
    t = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, processor=tokenizer,
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t
    model.save_pretrained(a.out)
    tokenizer.save_pretrained(a.out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import llmcompressor

    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": rss,
                                  "llmcompressor": llmcompressor.__version__,
                                  "torch": torch.__version__}))


if __name__ == "__main__":
    main()
