"""Language models end to end: text cut into sequences, perplexity, a HuggingFace directory
pruned layer-wise by the command line and loaded back with ``from_pretrained``."""

import json
import math
from pathlib import Path

import pytest
import torch

import falcon_prune as fp
from falcon_prune.cli import main
from falcon_prune.data.text import perplexity, read_text, split_sequences, token_sequences
from falcon_prune.errors import DataError, MissingFileError
from falcon_prune.models import load_language_model, save_language_model

transformers = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")
TEXT = Path(__file__).resolve().parents[1] / "docs" / "method.md"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama-like model (grouped-query attention) and a byte-level BPE tokenizer
    trained on the project's docs, saved as a HuggingFace directory."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([read_text(TEXT)], vocab_size=300, min_frequency=2,
                            show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    where = tmp_path_factory.mktemp("hf") / "tiny"
    save_language_model(model, tok, where)
    return where


def test_text_becomes_disjoint_sequences(hf_dir):
    _, tok = load_language_model(hf_dir)
    ids = token_sequences(read_text(TEXT), tok, 32)
    assert ids.shape[1] == 32 and len(ids) > 20 and ids.dtype == torch.int64
    calib, held = split_sequences(ids, every=5)
    assert len(calib) + len(held) == len(ids) and len(held) == len(ids) // 5
    assert not any(torch.equal(c, h) for c in calib for h in held[:3])
    assert token_sequences(read_text(TEXT), tok, 32, max_sequences=3).shape == (3, 32)
    with pytest.raises(DataError, match="fewer than one sequence"):
        token_sequences("too short", tok, 512)
    with pytest.raises(MissingFileError):
        read_text(TEXT.with_name("absent.md"))


def test_perplexity_is_the_exponential_of_the_token_loss(hf_dir):
    model, tok = load_language_model(hf_dir)
    ids = token_sequences(read_text(TEXT), tok, 16, max_sequences=6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1))
    assert perplexity(model, ids, batch_size=4) == pytest.approx(math.exp(float(ref)),
                                                                 rel=1e-5)


def test_the_command_line_prunes_a_huggingface_directory_that_loads_back(hf_dir, tmp_path,
                                                                       capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--hf", str(hf_dir), "--text", str(TEXT), "--seq-len", "32",
            "--method", "sparsegpt", "--nnz", "0.5", "--n-calibration", "8", "--output",
            str(out), "--report", str(tmp_path / "r.json"), "--no-progress"]
    assert main(args) == 0
    assert "save_pretrained" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    kept = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    assert kept <= 0.5 + 1e-9
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()
    assert main(["evaluate", "--hf", str(out), "--text", str(TEXT), "--seq-len", "32",
                 "--max-sequences", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_the_command_line_writes_a_structured_model_that_load_pruned_reads(hf_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "narrow"
    assert main(["prune", "--hf", str(hf_dir), "--text", str(TEXT), "--seq-len", "32",
                 "--structure", "channels", "--flops", "0.6", "--n-calibration", "8",
                 "--attention-units", "heads", "--output", str(out), "--no-progress"]) == 0
    assert "save_pretrained" in capsys.readouterr().out
    dense, _ = load_language_model(hf_dir)
    model = fp.models.load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel()
                                                            for p in dense.parameters())
    prompt = torch.tensor([[5, 9, 13]])
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 7)
    assert main(["evaluate", "--hf", str(out), "--text", str(TEXT), "--seq-len", "32",
                 "--max-sequences", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_the_command_line_takes_a_latency_budget_for_a_language_model(hf_dir, tmp_path,
                                                                      shape_clock):
    """--latency with --latency-tokens on a HuggingFace directory: the block-time table's
    prediction and the measurement are in the report (timed on the shape clock)."""
    report = tmp_path / "r.json"
    assert main(["prune", "--hf", str(hf_dir), "--text", str(TEXT), "--seq-len", "32",
                 "--structure", "channels", "--latency", "0.9", "--latency-tokens", "4",
                 "--n-calibration", "8", "--output", str(tmp_path / "fast"), "--report",
                 str(report), "--no-progress"]) == 0
    lat = json.loads(report.read_text())["details"]["latency"]
    assert lat["tokens"] == 4 and lat["predicted_fraction"] <= 0.9 + 1e-9


@pytest.mark.parametrize("extra, match", [
    ([], "--hf takes --text"),
    (["--text", "TEXT", "--model", "resnet20"], "and not --model"),
    (["--text", "TEXT", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["--text", "nowhere.txt"], "does not exist"),
])
def test_language_model_arguments_are_checked_before_any_work(hf_dir, tmp_path, capsys,
                                                              extra, match):
    extra = [str(TEXT) if x == "TEXT" else x for x in extra]
    args = ["prune", "--hf", str(hf_dir), "--nnz", "0.5", "--output", str(tmp_path / "o"),
            "--method", "sparsegpt", *extra]
    assert main(args) == 2
    assert match in capsys.readouterr().err


def test_an_output_directory_that_is_a_file_is_refused(hf_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["prune", "--hf", str(hf_dir), "--text", str(TEXT), "--nnz", "0.5",
                 "--method", "sparsegpt", "--output", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
