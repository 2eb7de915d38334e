"""Structured pruning of a transformer: attention heads and MLP units removed, accuracy and
measured latency of the physically smaller network.

The network is a HuggingFace ``BertForSequenceClassification`` (4 layers, 128 wide, 4 heads
of 32, MLP 512; 0.8 M parameters) trained from scratch on scikit-learn's bundled digits
(1,797 real 8 x 8 images of handwritten digits; each image is a sequence of 64 pixel
tokens with 17 grey levels; 80 % train, 20 % test, split by seed). It is pruned one-shot
with ``structure="channels"`` to 70, 50 and 30 % of the prunable FLOPs by group magnitude
(``mp``) and by ``falcon`` (gradients of the training images), then fine-tuned for the
same few epochs. Per budget: the recounted MACs and parameters, the heads and MLP units
kept, test accuracy one-shot and after fine-tuning, and CPU latency at batch 1 and 32 in
torch eager, measured interleaved with the dense network in one process (median of
repeats).

    python benchmarks/structured_transformer.py --out benchmarks/results/structured_transformer.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from isolated import provenance, write_results
from structured_speed import interleaved


def digits(seed: int):
    """(train, test) dicts of pixel-token ids (N, 64) and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    ids = torch.tensor(d.images.reshape(len(d.images), -1), dtype=torch.long)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return {"input_ids": ids[tr], "labels": y[tr]}, {"input_ids": ids[te], "labels": y[te]}


def bert(seed: int):
    import transformers as T

    cfg = T.BertConfig(vocab_size=17, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=512,
                       max_position_embeddings=64, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T.BertForSequenceClassification(cfg)


def train(model, data: dict, epochs: int, lr: float, seed: int) -> None:
    """AdamW, linear warm-up over the first 10 % of the steps then linear decay, batches of
    32 in a seeded order; the model ends in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    n = len(data["labels"])
    steps = epochs * ((n + 31) // 32)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for a in range(0, n, 32):
            idx = order[a:a + 32]
            loss = model(input_ids=data["input_ids"][idx], labels=data["labels"][idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(model, data: dict) -> float:
    with torch.inference_mode():
        pred = model(input_ids=data["input_ids"]).logits.argmax(-1)
    return float((pred == data["labels"]).double().mean())


def shape_of(model) -> dict:
    """Heads and MLP units kept per layer, and the residual width."""
    layers = model.bert.encoder.layer
    return {"heads": [lay.attention.self.query.out_features // 32 for lay in layers],
            "mlp_units": [lay.intermediate.dense.out_features for lay in layers],
            "width": model.bert.embeddings.word_embeddings.weight.shape[1]}


def macs_params(model, ids) -> tuple[float, int]:
    import falcon_prune as fp

    kept, _ = fp.count_macs(model, {"input_ids": ids})
    return kept, sum(p.numel() for p in model.parameters())


def latencies(models: dict, batches: tuple[int, ...], repeats: int, seed: int) -> dict:
    """{name: {"eager_b1": seconds, ...}}: every network timed in turn inside each repeat
    (interleaved, one process), median of the repeats; a repeat lasts about 50 ms."""
    out: dict = {k: {} for k in models}
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(0, 17, (b, 64), generator=g)
            runs = {k: (lambda x, m=m: m(input_ids=x), ids) for k, m in models.items()}
            for k, seconds in interleaved(runs, repeats, repeat_seconds=0.05).items():
                out[k][f"eager_b{b}"] = seconds
    return out


def main() -> None:
    import falcon_prune as fp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=["mp", "falcon"])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the dense net")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/structured_transformer.json"))
    a = ap.parse_args()
    prov = provenance()
    tr, te = digits(a.seed)
    base = bert(a.seed)
    t = time.perf_counter()
    train(base, tr, a.epochs, 5e-4, a.seed)
    dense_acc = accuracy(base, te)
    print(f"dense: test accuracy {dense_acc:.4f} after {time.perf_counter() - t:.0f} s",
          flush=True)
    dense = macs_params(base, te["input_ids"][:1])
    models, rows = {"dense": base}, []
    for flops in a.budgets:
        for method in a.methods:
            t = time.perf_counter()
            r = fp.prune(base, tr, flops=flops, method=method, structure="channels",
                         seed=a.seed, progress=False)
            seconds = time.perf_counter() - t
            small = r.model
            row = {"flops_budget": flops, "method": method, "seconds": seconds,
                   "oneshot_accuracy": accuracy(small, te), **shape_of(small)}
            macs, params = macs_params(small, te["input_ids"][:1])
            row.update(flops_fraction=macs / dense[0], params_fraction=params / dense[1],
                       reported_flops_fraction=r.flops_fraction)
            tuned = copy.deepcopy(small)
            train(tuned, tr, a.ft_epochs, 2e-4, a.seed)
            row["finetuned_accuracy"] = accuracy(tuned, te)
            models[(flops, method)] = small
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
    lat = latencies(models, (1, 32), a.repeats, a.seed)
    for row in rows:
        key = (row["flops_budget"], row["method"])
        row["latency"] = lat[key]
        row["latency_ratio"] = {k: lat[key][k] / lat["dense"][k] for k in lat[key]}
        print(row["flops_budget"], row["method"],
              {k: round(v, 3) for k, v in row["latency_ratio"].items()}, flush=True)
    write_results(a.out, {"command": " ".join(["python", *sys.argv]),
                          "dense": {"test_accuracy": dense_acc, "macs": dense[0],
                                    "params": dense[1], "latency": lat["dense"],
                                    **shape_of(base)},
                          "rows": rows}, prov)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
