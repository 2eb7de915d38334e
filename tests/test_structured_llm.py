"""Structured layer-wise pruning through ``fp.prune(..., structure='channels')``: config-built
Llama (grouped-query attention), Qwen2, OPT, T5, Whisper, ViT and BERT models get smaller,
keep their output shape and stay within the budgets by the recount; the allocation beats a
uniform one on its own objective; a pruned model saves, loads back with ``load_pruned`` and
generates the same tokens."""

import time

import pytest
import torch

import falcon_prune as fp
from falcon_prune.errors import BudgetError, ConfigError, ModelError
from falcon_prune.runs.structured import model_macs

transformers = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")
T = transformers
VOCAB = 64


def seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def ids(n=16, t=16, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def llama(tied=False):
    return seeded(lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=tied)))


def gpt2():
    return seeded(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2)))


def case(name):
    """(model, data, task) of a config-built model of family ``name``."""
    x = ids()
    if name == "llama":
        return llama(), x, "language_modeling"
    if name == "qwen2":
        return seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=3))), x, "language_modeling"
    if name == "gpt2":
        return gpt2(), x, "language_modeling"
    if name == "opt":
        return seeded(lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32))), x, "language_modeling"
    if name == "t5":
        model = seeded(lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)))
        return model, {"input_ids": x, "decoder_input_ids": x, "labels": x}, \
            "language_modeling"
    if name == "whisper":
        model = seeded(lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)))
        feats = torch.randn(16, 8, 32, generator=torch.Generator().manual_seed(2))
        return model, {"input_features": feats, "decoder_input_ids": x[:, :8],
                       "labels": x[:, :8]}, "language_modeling"
    if name == "vit":
        model = seeded(lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=5)))
        g = torch.Generator().manual_seed(3)
        return model, (torch.randn(16, 3, 16, 16, generator=g),
                       torch.randint(0, 5, (16,), generator=g)), "classification"
    if name == "bert":
        model = seeded(lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_labels=3)))
        return model, {"input_ids": x, "labels": torch.arange(16) % 3}, "classification"
    raise KeyError(name)


def output(model, data):
    with torch.no_grad():
        if isinstance(data, dict):
            return model(**{k: v[:2] for k, v in data.items() if k != "labels"}).logits
        if isinstance(data, tuple):
            return model(data[0][:2]).logits
        return model(data[:2]).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt", "t5", "whisper", "vit",
                                  "bert"])
def test_families_prune_structurally_within_budget(name):
    model, data, task = case(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = time.perf_counter()
    r = fp.prune(model, data, flops=0.6, nnz=0.7, task=task, structure="channels",
                 loss_model="layerwise", n_calibration=16, progress=False)
    assert time.perf_counter() - t < 60
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(p.numel() for p in r.model.parameters()) < sum(p.numel()
                                                             for p in model.parameters())
    assert output(r.model, data).shape == output(model, data).shape
    assert r.flops_fraction <= 0.6 + 1e-9 and r.nnz_fraction <= 0.7 + 1e-9
    assert r.config.loss_model == "layerwise" and r.config.structure == "channels"
    assert r.details["sites"]


def test_t5_keeps_its_attention_whole_and_says_why():
    model, data, task = case("t5")
    r = fp.prune(model, data, flops=0.7, task=task, structure="channels",
                 loss_model="layerwise", n_calibration=16, progress=False)
    assert [s.split(" ")[0] for s in r.details["sites"]] == ["mlp"]
    assert any("attention" in k for k in r.details["left_whole"])


def test_flops_are_recounted_on_the_whole_model_with_flops_of_model():
    model, x, _ = case("llama")
    r = fp.prune(model, x, flops=0.7, task="language_modeling", structure="channels",
                 flops_of="model", progress=False)  # the loss model chosen by itself
    probe = x[:1]
    dense = model_macs(model, probe, lambda m, v: m(v))
    kept = model_macs(r.model, probe, lambda m, v: m(v))
    assert kept / dense == pytest.approx(r.flops_fraction, rel=1e-9)
    assert kept / dense <= 0.7 + 1e-9
    assert r.details["loss_model_choice"].startswith("layer-wise: structured")


def test_the_allocation_is_no_worse_than_uniform_on_its_objective():
    model, x, _ = case("llama")
    common = dict(task="language_modeling", structure="channels", n_calibration=16,
                  progress=False)
    ilp = fp.prune(model, x, flops=0.5, **common)
    uni = fp.prune(model, x, flops=0.5, allocation="uniform", **common)
    assert ilp.details["allocation_error"] >= ilp.details["allocation_lower_bound"] - 1e-12
    assert ilp.flops_fraction <= 0.5 + 1e-9 and uni.flops_fraction <= 0.5 + 1e-9

    def loss(m):
        with torch.no_grad():
            out = m(x, labels=x)
        return float(out.loss)
    assert loss(ilp.model) < loss(uni.model) * 1.05


def test_budgets_below_one_unit_per_site_are_refused():
    model, x, _ = case("llama")
    with pytest.raises(BudgetError, match="one unit of every site"):
        fp.prune(model, x, flops=0.01, task="language_modeling", structure="channels",
                 n_calibration=8, progress=False)
    with pytest.raises(ConfigError, match="passes=1"):
        fp.prune(model, x, flops=0.5, task="language_modeling", structure="channels",
                 n_calibration=8, passes=2, progress=False)
    with pytest.raises(ConfigError, match="obs_rank"):  # not ignored
        fp.prune(model, x, flops=0.7, obs_rank=4, task="language_modeling",
                 structure="channels", n_calibration=8, progress=False)


def test_round_to_and_keep_layers_shape_the_choice():
    """round_to: every site keeps a multiple of that many of its consumer's input
    channels, or all; keep_layers: the sites whose layers it names keep every unit."""
    model, x, _ = case("llama")
    r = fp.prune(model, x, flops=0.6, task="language_modeling", structure="channels",
                 allocation="ilp", round_to=16, keep_layers=["model.layers.1.mlp.*"],
                 n_calibration=8, progress=False)
    rows = {row["layer"]: row for row in r.details["layers"]}
    assert rows["model.layers.1.mlp.down_proj"]["kept"] == 96
    assert all(row["kept"] % 16 == 0 for row in rows.values() if row["kind"] == "mlp")
    assert r.flops_fraction <= 0.6 + 1e-9 and r.config.round_to == 16
    with pytest.raises(ModelError, match="does not have"):
        fp.prune(model, x, flops=0.6, task="language_modeling", structure="channels",
                 keep_layers=["model.nowhere"], n_calibration=8, progress=False)
    with pytest.raises(BudgetError, match="round_to"):  # 64 of 96 channels: over 0.6
        fp.prune(model, x, flops=0.6, task="language_modeling", structure="channels",
                 round_to=64, n_calibration=8, progress=False)


@pytest.mark.parametrize("allocation", ["ilp", "uniform"])
def test_a_latency_budget_is_met_by_measured_block_times(shape_clock, allocation):
    """latency= on a language model: each site's block time measured at a grid of counts
    (here on the shape clock, seconds from MACs, so the test holds on any machine), the
    choice predicted within the budget, the pruned model measured against the dense one
    and within it, counts in multiples of round_to (4 by default), and the sequence
    length reported."""
    model, x, _ = case("llama")
    r = fp.prune(model, x, latency=0.6, task="language_modeling", structure="channels",
                 allocation=allocation, n_calibration=8, progress=False)
    lat = r.details["latency"]
    assert lat["predicted_fraction"] <= 0.6 + 1e-9
    assert lat["measured_fraction"] <= 0.6 + 0.02
    assert lat["tokens"] == r.config.latency_tokens == 16 and lat["batch"] == 1
    assert 0.5 <= lat["calibration"]["scale"] <= 2.0
    assert all(row["kept"] % 4 == 0 for row in r.details["layers"] if row["kind"] == "mlp")
    one = fp.prune(model, x, latency=0.8, flops=0.7, latency_tokens=1,
                   task="language_modeling", structure="channels", allocation=allocation,
                   n_calibration=8, progress=False)
    assert one.details["latency"]["tokens"] == 1 and one.flops_fraction <= 0.7 + 1e-9
    assert one.details["latency"]["predicted_fraction"] <= 0.8 + 1e-9


def test_latency_settings_that_cannot_apply_are_refused(cnn, data):
    model, x, _ = case("llama")
    lm = dict(task="language_modeling", structure="channels", n_calibration=8,
              progress=False)
    with pytest.raises(ConfigError, match="give latency="):
        fp.prune(model, x, flops=0.7, latency_tokens=4, **lm)
    with pytest.raises(ConfigError, match="longer than the calibration"):
        fp.prune(model, x, latency=0.8, latency_tokens=99, **lm)
    with pytest.raises(BudgetError, match="not both"):
        fp.prune(model, x, latency=0.8, nnz=0.5, **lm)
    with pytest.raises(BudgetError, match="raise latency"):
        fp.prune(model, x, latency=0.01, **lm)
    with pytest.raises(ConfigError, match="global loss model"):
        fp.prune(cnn, data, flops=0.7, latency=0.8, latency_tokens=4,
                 structure="channels", progress=False)


def test_wanda_units_without_refit():
    model, x, _ = case("llama")
    r = fp.prune(model, x, flops=0.6, method="wanda", task="language_modeling",
                 structure="channels", n_calibration=16, progress=False)
    assert r.details["unit_choice"].startswith("wanda")
    assert r.flops_fraction <= 0.6 + 1e-9


@pytest.mark.parametrize("build", [lambda: llama(tied=True), gpt2])
def test_a_pruned_model_loads_back_and_generates_the_same_tokens(tmp_path, build):
    model = build()
    x = ids()
    r = fp.prune(model, x, flops=0.5, task="language_modeling", structure="channels",
                 n_calibration=16, progress=False)
    prompt = x[:1, :5]
    want = r.model.generate(prompt, max_new_tokens=12, do_sample=False)
    fp.models.save_language_model(r.model, None, tmp_path)
    back = fp.models.load_pruned(tmp_path)
    got = back.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert torch.allclose(back(x[:2]).logits, r.model(x[:2]).logits, atol=1e-5)
    assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel()
                                                           for p in model.parameters())


def test_onnx_export_of_a_pruned_model(tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package ([onnx] extra)")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime ([onnx] extra)")
    model = llama()
    x = ids()
    r = fp.prune(model, x, flops=0.5, task="language_modeling", structure="channels",
                 n_calibration=16, progress=False)

    class Logits(torch.nn.Module):  # with the attention mask given (no mask inference)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, v, mask):
            return self.m(input_ids=v, attention_mask=mask, use_cache=False).logits

    path = tmp_path / "pruned.onnx"
    mask = torch.ones_like(x[:1])
    torch.onnx.export(Logits(r.model), (x[:1], mask), str(path), input_names=["ids", "mask"],
                      output_names=["logits"], dynamo=False)
    got = ort.InferenceSession(str(path)).run(None, {"ids": x[:1].numpy(),
                                                      "mask": mask.numpy()})[0]
    with torch.no_grad():
        want = r.model(x[:1]).logits.numpy()
    assert got.shape == want.shape and abs(got - want).max() < 1e-3


@pytest.mark.parametrize("name", ["opt", "t5", "whisper"])
def test_the_global_loss_model_takes_tied_or_apart_output_heads(name):
    model, data, task = case(name)  # their head's weight is an embedding's, or proj_out
    r = fp.prune(model, data, flops=0.6, task=task, structure="channels",
                 loss_model="global", n_gradients=16, n_validation=8, progress=False)
    assert r.flops_fraction <= 0.6 + 1e-9


def test_the_global_loss_model_refuses_grouped_query_attention_at_once():
    model, x, _ = case("llama")
    t = time.perf_counter()
    with pytest.raises(ModelError, match="grouped-query attention.*loss_model='layerwise'"):
        fp.prune(model, x, flops=0.6, task="language_modeling", structure="channels",
                 loss_model="global", n_gradients=16, n_validation=8, progress=False)
    assert time.perf_counter() - t < 30


def test_query_head_units_prune_a_grouped_query_llama():
    model, x, _ = case("llama")
    r = fp.prune(model, x, flops=0.6, task="language_modeling", structure="channels",
                 attention_units="heads", n_calibration=16, progress=False)
    assert r.config.attention_units == "heads"
    assert any(site.startswith("query heads") for site in r.details["sites"])
    assert r.flops_fraction <= 0.6 + 1e-9
    for block in r.model.model.layers:  # key/value heads whole, groups of equal size
        att = block.self_attn
        assert att.k_proj.out_features == 2 * 8
        assert att.q_proj.out_features == 2 * 8 * att.num_key_value_groups
    with pytest.raises(ConfigError, match="apply to structure='channels'"):
        fp.prune(model, x, nnz=0.5, task="language_modeling", attention_units="heads",
                 progress=False)


def test_block_time_table_predicts_and_calibrates():
    """SiteTimes: the ratio follows the site's fitted line, a choice's prediction is the
    dense time less each block's saving, and the calibration scales the savings to one
    measured choice (within [0.5, 2])."""
    from falcon_prune.analysis.site_timing import SiteTimes, time_grid

    grid = time_grid(96, 4, 4)
    assert grid[0] == 4 and grid[-1] == 96 and all(k % 4 == 0 for k in grid)
    assert len(grid) <= 18 and grid == sorted(set(grid))
    t = SiteTimes(total=10.0, inside=[2.0, 2.0], units={"mlp": 16}, slopes={"mlp": 1.0})
    assert t.ratio("mlp", 8) == pytest.approx(0.5) and t.ratio("mlp", 16) == 1.0
    assert t.ratio("mlp", 12) == pytest.approx(0.75)
    assert t.seconds({(0, "mlp"): 8, (1, "mlp"): 12}) == pytest.approx(10 - 1.0 - 0.5)
    t.calibrate({(0, "mlp"): 8, (1, "mlp"): 8}, measured=0.7)  # table: 0.8
    assert t.scale == pytest.approx(1.5)
    assert t.seconds({(0, "mlp"): 8, (1, "mlp"): 8}) == pytest.approx(7.0)
    t.calibrate({(0, "mlp"): 8, (1, "mlp"): 8}, measured=0.1)
    assert t.scale == 2.0


def test_measured_ratios_are_fitted_by_a_line_through_the_whole_count():
    from falcon_prune.analysis.site_timing import line_fit

    # the slope b of r(k) = 1 - b (1 - k / U): exact on a line, rising through noise,
    # flat (never a count predicted slower than all units) when the timings fall
    assert line_fit([0, 50, 100], [0.5, 0.75, 1.0]) == pytest.approx(0.5)
    assert line_fit([0, 25, 50, 75, 100], [0.52, 0.6, 0.77, 0.86, 1.0]) > 0
    assert line_fit([0, 50, 100], [1.1, 1.05, 1.0]) == 0.0
