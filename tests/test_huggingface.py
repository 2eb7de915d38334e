"""HuggingFace models end to end (needs the [hf] extra): a BERT classifier and a GPT-2
language model built from tiny configurations, trained for a few seconds on real data that
a package ships (scikit-learn's digits as token sequences; the Python documentation text
that CPython ships in pydoc_data), pruned from dict batches with the built-in tasks."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel, plain_kernels

T = pytest.importorskip("transformers", reason="HuggingFace tests need the [hf] extra "
                        "(pip install 'falcon-prune[hf]')")
sklearn = pytest.importorskip("sklearn", reason="the digits data come with scikit-learn")


def _train(model, batches, steps: int, loss_of, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        loss = loss_of(model, batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def digits_tokens():
    """scikit-learn's 1,797 digits as sequences of 64 pixel tokens (values 0..16, +1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    ids = torch.tensor(d.images.reshape(len(d.images), -1), dtype=torch.long) + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(d.target, dtype=torch.long)}


@pytest.fixture(scope="module")
def bert(digits_tokens):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # no dropout: its random stream differs between CPU families (MKL's on Intel)
        cfg = T.BertConfig(vocab_size=18, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, num_labels=10, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        model = T.BertForSequenceClassification(cfg)
        data = [{k: v[i:i + 64] for k, v in digits_tokens.items()} for i in range(0, 1400, 64)]
        _train(model, data, 300, lambda m, b: m(**b).loss, lr=1e-3)
    return model


@pytest.fixture(scope="module")
def text_ids():
    """Character ids of 600 sequences of 33 characters of CPython's documentation text."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:200_000]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[: 600 * 33]]).view(600, 33)
    return ids, len(chars)


@pytest.fixture(scope="module")
def gpt2(text_ids):
    ids, vocab = text_ids
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=33,
                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
        model = T.GPT2LMHeadModel(cfg)
        data = [{"input_ids": ids[i:i + 32], "labels": ids[i:i + 32]} for i in range(0, 480, 32)]
        _train(model, data, 150, lambda m, b: m(**b).loss)
    return model


def total_macs(model, inputs):
    with torch.enable_grad(), plain_kernels(model), FlopCounterMode(display=False) as f:
        model(**inputs)
    return f.get_total_flops() / 2


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_dense_totals_match_flop_counter(which, bert, gpt2, digits_tokens, text_ids):
    model = bert if which == "bert" else gpt2
    inputs = ({"input_ids": digits_tokens["input_ids"][:2]} if which == "bert"
              else {"input_ids": text_ids[0][:2]})
    cm = CostModel.from_model(model, inputs)
    assert cm.excluded == []
    assert cm.dense_macs + cm.fixed_macs == pytest.approx(total_macs(model, inputs) / 2)
    if which == "gpt2":
        names = [lay.name for lay in cm.layers]
        assert "transformer.h.0.attn.c_attn.weight" in names  # Conv1D is prunable
        assert names.count("lm_head.weight") == 1  # tied to the token embedding: once


@pytest.mark.parametrize("method", ["falcon", "falcon++"])
def test_bert_classifier_prunes_from_a_dict_batch(method, bert, digits_tokens):
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    data = {k: v[:400] for k, v in digits_tokens.items()}
    kw = {"stages": 2} if method == "falcon++" else {}
    r = fp.prune(bert, data, flops=0.5, method=method, n_gradients=60, n_validation=60,
                 progress=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    assert r.flops_fraction <= 0.5 and r.details["gradients"] == "torch.func.vmap"
    kept, dense = fp.count_macs(r.model, {"input_ids": data["input_ids"][:1]})
    assert r.flops_fraction == pytest.approx(kept / dense)
    test = {k: v[1400:] for k, v in digits_tokens.items()}
    dense_acc, acc = fp.evaluate(bert, test).metric, fp.evaluate(r.model, test).metric
    assert dense_acc > 0.2 and acc > 0.1  # trained beyond chance (0.1), pruned still working


def test_bert_with_padding_falls_back_to_a_backward_per_row_and_says_so(bert, digits_tokens):
    data = {k: v[:200].clone() for k, v in digits_tokens.items()}
    data["attention_mask"][::2, 48:] = 0  # half the sequences padded
    r = fp.prune(bert, data, flops=0.5, n_gradients=40, n_validation=40, progress=False)
    assert r.flops_fraction <= 0.5
    assert r.details["gradients"].startswith("a backward pass per row")


@pytest.mark.parametrize("method", ["falcon", "falcon++"])
def test_gpt2_language_model_prunes(method, gpt2, text_ids):
    ids, _ = text_ids
    data = {"input_ids": ids[:300], "attention_mask": torch.ones_like(ids[:300])}
    kw = {"stages": 2} if method == "falcon++" else {}
    r = fp.prune(gpt2, data, flops=0.5, method=method, task="language_modeling",
                 n_gradients=60, n_validation=60, progress=False, **kw)
    assert r.flops_fraction <= 0.5 and r.config.task.name == "language_modeling"
    held = {"input_ids": ids[500:]}
    dense = fp.evaluate(gpt2, held, "language_modeling").loss
    pruned = fp.evaluate(r.model, held, "language_modeling").loss
    assert math.isfinite(pruned) and dense < math.log(text_ids[1])  # better than uniform
    # a language model's prunable set is its blocks' layers: the tied head stays dense
    assert "lm_head.weight" not in [lay.name for lay in r.layers]
    assert r.model.lm_head.weight is r.model.transformer.wte.weight  # and still tied


def test_an_included_tied_head_is_pruned_once_and_stays_tied(gpt2, text_ids):
    ids, _ = text_ids
    r = fp.prune(gpt2, {"input_ids": ids[:100]}, flops=0.5, method="mp",
                 task="language_modeling", include=["lm_head"], progress=False)
    assert "lm_head.weight" in [lay.name for lay in r.layers]
    assert r.model.lm_head.weight_orig is r.model.transformer.wte.weight_orig


def test_gradual_on_bert(bert, digits_tokens):
    from torch.utils.data import DataLoader, Dataset

    class Tokens(Dataset):
        def __len__(self):
            return 320

        def __getitem__(self, i):
            return {k: v[i] for k, v in digits_tokens.items()}

    r = fp.gradual(bert, DataLoader(Tokens(), batch_size=32), flops=0.5, stages=2,
                   epochs_per_stage=1, final_epochs=1, n_gradients=40, n_validation=40,
                   lr=1e-3, progress=False)
    assert r.flops_fraction <= 0.5
    assert all(math.isfinite(row.get("train_loss", 0.0)) for row in r.history)


def test_bert_channels_remove_whole_attention_heads(bert, digits_tokens):
    """BERT's query/key/value outputs are viewed as heads: their coupled group (with the
    attention output's columns) loses whole heads, the MLP units and the residual width
    (embedding columns included) lose channels, within the budget; keep_layers keeps the
    attention projections whole."""
    data = {k: v[:300] for k, v in digits_tokens.items()}
    r = fp.prune(bert, data, flops=0.4, structure="channels", method="mp", progress=False)
    assert r.flops_fraction <= 0.4
    small = r.model.bert
    assert small.embeddings.word_embeddings.weight.shape[1] < 32  # residual width removed
    heads = []
    for layer in small.encoder.layer:
        att = layer.attention
        width = att.self.query.out_features
        assert width % 16 == 0 and width == att.self.key.out_features \
            == att.self.value.out_features == att.output.dense.in_features
        heads.append(width // 16)
    assert min(heads) == 1  # a head of the two was removed
    assert r.model(input_ids=data["input_ids"][:2]).logits.shape == (2, 10)
    kept = fp.prune(bert, data, flops=0.6, structure="channels", method="mp", progress=False,
                    keep_layers=["*.attention.self.*"])
    assert kept.flops_fraction <= 0.6
    assert kept.model.bert.encoder.layer[0].attention.self.query.out_features == 32
