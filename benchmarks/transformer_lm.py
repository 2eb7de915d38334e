"""One-shot pruning of a character-level GPT-2 trained on real text (needs the [hf] extra).

The text is the documentation of Python's keywords and topics that CPython ships as
``pydoc_data.topics`` (part of the standard library, e.g. Debian's libpython3.11-stdlib):
about 0.47 M characters of English prose and code (Python 3.11). The first 90 % trains the model and
provides the pruning samples; the last 10 % is held out for the perplexity.

The model is HuggingFace's ``GPT2LMHeadModel`` from a small configuration (4 layers, 128
wide, 4 heads, context 64, one token per character), trained once from seed 0 and cached in
``--cache``. Each (method, budget) then prunes it one-shot in its own process (so that its
peak memory is its own) with the library's defaults for the ``language_modeling`` task,
and the table gives the held-out perplexity (exp of the mean next-token cross-entropy),
seconds and peak resident memory. ``flops`` is a fraction of the prunable MACs (every
attention and MLP weight and the output layer, which is tied to the token embedding); the
fraction of the whole network's MACs, attention's weight-free products included, is
reported beside it.

    python benchmarks/transformer_lm.py --budgets 0.5 0.3 \
        --out benchmarks/results/transformer_lm.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from isolated import provenance, run_isolated, write_results

METHODS = ["mp", "woodfisher", "falcon", "falcon++"]
CONTEXT = 64
CACHE = Path(__file__).resolve().parent / ".cache" / "char_gpt2.pt"


def corpus() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(characters, training sequences, held-out sequences), sequences (N, CONTEXT) of
    character ids, cut without overlap from the 90 % / 10 % split of the text."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))

    def seqs(t):
        n = len(t) // CONTEXT
        return t[: n * CONTEXT].view(n, CONTEXT)

    return chars, seqs(ids[:cut]), seqs(ids[cut:])


def build(vocab: int):
    import transformers as T

    cfg = T.GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_positions=CONTEXT,
                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0)
    return T.GPT2LMHeadModel(cfg)


def train_model(steps: int, cache: Path) -> None:
    """Train from seed 0 with Adam and a cosine learning rate; save the state dict."""

    chars, train, _ = corpus()
    torch.manual_seed(0)
    model = build(len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    t = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - t:.0f} s",
                  flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "steps": steps}, cache)


def load(cache: Path):

    chars, train, held = corpus()
    model = build(len(chars))
    model.load_state_dict(torch.load(cache, weights_only=True)["state_dict"])
    return model.eval(), train, held


def perplexity(model, held) -> float:
    import falcon_prune as fp

    return math.exp(fp.evaluate(model, {"input_ids": held}, "language_modeling").loss)


def run_one(method: str, flops: float | None, seed: int, cache: Path) -> dict:
    """Prune (or, with flops None, just evaluate) in this process; one JSON row."""

    import falcon_prune as fp
    from falcon_prune.results import peak_rss_mb

    model, train, held = load(cache)
    if flops is None:
        return {"method": "dense", "perplexity": perplexity(model, held)}
    torch.manual_seed(seed)
    t = time.perf_counter()
    r = fp.prune(model, {"input_ids": train}, flops=flops, method=method, seed=seed,
                 task="language_modeling", progress=False)
    seconds = time.perf_counter() - t
    probe = {"input_ids": held[:1]}
    kept, dense = fp.count_macs(r.model, probe, "language_modeling")
    return {"method": method, "flops_budget": flops, "seed": seed,
            "flops_fraction": r.flops_fraction, "recount_fraction": kept / dense,
            "model_fraction": (kept + r.fixed_macs) / (dense + r.fixed_macs),
            "nnz_fraction": r.nnz_fraction, "fixed_macs": r.fixed_macs,
            "perplexity": perplexity(r.model, held), "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "gradients": r.details.get("gradients"),
            "config": r.config.to_dict(), "times": r.times}


def table(rows: list[dict]) -> str:
    dense = next(r["perplexity"] for r in rows if r["method"] == "dense")
    budgets = sorted({r["flops_budget"] for r in rows if "flops_budget" in r}, reverse=True)
    lines = [f"dense perplexity {dense:.3f}", "",
             "| FLOPs kept | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for b in budgets:
        cells = []
        for m in METHODS:
            r = next((r for r in rows if r.get("flops_budget") == b and r["method"] == m), None)
            cells.append("-" if r is None else
                         f"{r['perplexity']:.3f} ({r['seconds']:.0f} s, "
                         f"{r['peak_rss_mb'] / 1024:.1f} GiB)")
        lines.append(f"| {b:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/transformer_lm.json"))
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "FLOPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("this benchmark needs the [hf] extra: pip install 'falcon-prune[hf]'")
    if a.one:
        flops = None if a.one[1] == "dense" else float(a.one[1])
        print("RESULT " + json.dumps(run_one(a.one[0], flops, a.seed, a.cache)))
        return
    prov = provenance()
    if not a.cache.exists():
        train_model(a.train_steps, a.cache)
    me = str(Path(__file__).resolve())
    common = ["--seed", str(a.seed), "--cache", str(a.cache)]
    rows = [run_isolated(me, ["--one", "dense", "dense", *common])]
    record = {"command": " ".join(["python", *sys.argv]), "train_steps": a.train_steps,
              "rows": rows}
    for flops in a.budgets:
        for method in a.methods:
            rows.append(run_isolated(me, ["--one", method, str(flops), *common]))
            r = rows[-1]
            print(f"{method} {flops}: perplexity {r['perplexity']:.3f}, FLOPs "
                  f"{r['flops_fraction']:.4f} (recount {r['recount_fraction']:.4f}, whole "
                  f"model {r['model_fraction']:.4f}), {r['seconds']:.0f} s, "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
            write_results(a.out, record, prov)
    print(table(rows))


if __name__ == "__main__":
    main()
