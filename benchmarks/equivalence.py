"""Do two commits prune the same way? Masks and weights of falcon and falcon++ compared.

A refactor that claims to keep behaviour must give, for the same seeds, identical masks
(for structure='channels': the same channels removed, the same shapes) and weights equal
to 1e-6 relative. This script runs the same cases on each commit, in a fresh process whose
``falcon_prune`` comes from that commit (a ``git worktree``), and compares what they
returned:

- the shared CIFAR-10 ResNet20 at 40, 30 and 20 % of the FLOPs, falcon and falcon++, with
  structure='weights' and 'channels' (default settings, seed 0);
- a small transformer (HuggingFace BERT, 4 layers of 128 with 4 heads, built from its
  config with seeded random weights) on scikit-learn's digits as pixel tokens, at 50 %,
  the same four (method, structure) pairs.

    python benchmarks/equivalence.py --before d764c1e --after HEAD \
        --out benchmarks/results/equivalence.json

``--before``/``--after`` take any git revision; ``WORKTREE`` (the working tree, committed or
not) is accepted for ``--after``. ``--cases resnet20`` or ``transformer`` runs a part.
``--cache DIR`` keeps each commit's capture there (``<commit>-<cases>.pt``) and reuses it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from isolated import provenance, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
PAIRS = [("falcon", "weights"), ("falcon++", "weights"), ("falcon", "channels"),
         ("falcon++", "channels")]
RESNET_BUDGETS = (0.4, 0.3, 0.2)


def _resnet20():
    try:
        from falcon_prune.data.datasets import load_cifar10
    except ImportError:  # before the restructure: one module, falcon_prune/data.py
        from falcon_prune.data import load_cifar10
    from falcon_prune.models import load_checkpoint, resnet20

    npz = SHARED / "data" / "cifar10_subset.npz"
    model = load_checkpoint(resnet20(), SHARED / "checkpoints" / "resnet20_cifar10.pth.tar")
    return model.eval(), load_cifar10(npz, "train").tensors


def _transformer():
    import torch
    import transformers as T
    from sklearn.datasets import load_digits

    d = load_digits()
    ids = torch.tensor(d.images.reshape(len(d.images), -1), dtype=torch.long)
    data = {"input_ids": ids, "labels": torch.tensor(d.target, dtype=torch.long)}
    cfg = T.BertConfig(vocab_size=17, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=512,
                       max_position_embeddings=64, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return T.BertForSequenceClassification(cfg).eval(), data


def capture(cases: list[str], out: Path) -> None:
    """Run every case with the ``falcon_prune`` on the path; save masks and state dicts."""
    import torch

    import falcon_prune as fp

    print(f"falcon_prune from {fp.__file__}", file=sys.stderr, flush=True)
    saved = {}
    for case in cases:
        model, data = _resnet20() if case == "resnet20" else _transformer()
        budgets = RESNET_BUDGETS if case == "resnet20" else (0.5,)
        for method, structure in PAIRS:
            for flops in budgets:
                key = f"{case} {method} {structure} {flops}"
                print(key, file=sys.stderr, flush=True)
                r = fp.prune(model, data, flops=flops, method=method, structure=structure,
                             seed=0, progress=False)
                state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
                saved[key] = {"masks": {k: m.clone() for k, m in fp.masks_of(r.model).items()},
                              "state": state, "flops_fraction": r.flops_fraction,
                              "nnz_fraction": r.nnz_fraction,
                              "removed": r.details.get("removed_channels")}
    torch.save(saved, out)


def _revision_tree(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` under ``where`` (the working tree itself for 'WORKTREE')."""
    if rev == "WORKTREE":
        return ROOT
    tree = where / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    return tree


def run_revision(rev: str, cases: list[str], where: Path, cache: Path | None) -> Path:
    """Capture the cases with the ``falcon_prune`` of ``rev`` in a fresh process (or take
    the capture of the same commit from ``cache``)."""
    sha = rev if rev == "WORKTREE" else subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
        text=True).stdout.strip()
    out = (cache or where) / f"{sha}-{'-'.join(cases)}.pt"
    if cache is not None and out.exists() and rev != "WORKTREE":
        return out
    tree = _revision_tree(sha, where)
    env_path = str(tree / "src")
    code = (f"import sys; sys.path.insert(0, {env_path!r}); sys.path.insert(1, {str(HERE)!r});"
            f" import equivalence as e; e.capture({cases!r}, __import__('pathlib').Path("
            f"{str(out)!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(where))
    if tree != ROOT:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=True, capture_output=True)
    return out


def _relative(a, b) -> float:
    scale = float(b.double().abs().max()) if b.numel() else 0.0
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare(before: dict, after: dict) -> list[dict]:
    """Per case: masks identical, shapes identical, largest relative weight difference."""
    rows = []
    for key in before:
        b, a = before[key], after.get(key)
        if a is None:
            rows.append({"case": key, "present": False, "same": False})
            continue
        masks = b["masks"].keys() == a["masks"].keys() and all(
            torch_equal(b["masks"][k], a["masks"][k]) for k in b["masks"])
        shapes = b["state"].keys() == a["state"].keys() and all(
            b["state"][k].shape == a["state"][k].shape for k in b["state"])
        rel = max((_relative(a["state"][k], b["state"][k]) for k in b["state"]
                   if shapes and b["state"][k].is_floating_point()), default=0.0)
        same = masks and shapes and b["removed"] == a["removed"] and rel <= 1e-6
        rows.append({"case": key, "present": True, "masks_identical": masks,
                     "shapes_identical": shapes, "removed_identical": b["removed"] == a["removed"],
                     "max_relative_weight_difference": rel,
                     "flops_fraction": [b["flops_fraction"], a["flops_fraction"]],
                     "same": same})
    return rows


def torch_equal(x, y) -> bool:
    import torch

    return x.shape == y.shape and bool(torch.equal(x, y))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--cases", nargs="+", default=["resnet20", "transformer"],
                    choices=["resnet20", "transformer"])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "equivalence.json")
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args()
    if "resnet20" in a.cases and not (SHARED / "data" / "cifar10_subset.npz").exists():
        sys.exit(f"the ResNet20 cases need {SHARED}/data and checkpoints (../shared)")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        if a.cache is not None:
            a.cache.mkdir(parents=True, exist_ok=True)
        before = torch.load(run_revision(a.before, a.cases, where, a.cache),
                            weights_only=False)
        after = torch.load(run_revision(a.after, a.cases, where, a.cache), weights_only=False)
    rows = compare(before, after)
    for r in rows:
        print(json.dumps(r))
    write_results(a.out, {"command": " ".join(["python", *sys.argv]), "before": a.before,
                          "after": a.after, "rows": rows}, provenance())
    print(f"{sum(r['same'] for r in rows)} of {len(rows)} cases identical; {a.out}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
