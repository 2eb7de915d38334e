"""Structured units of transformer blocks: sites found by probing (grouped-query heads, MLP
channels) on config-built HuggingFace models, removing equals masking, and the group OBS
sweep and least-squares refit against closed-form references."""

import copy
import itertools

import pytest
import torch

from falcon_prune.analysis.blocks import find_blocks
from falcon_prune.analysis.sites import block_output, find_sites, shrink
from falcon_prune.methods.group_obs import damped, refit, remove_units
from falcon_prune.runs.sequential import capture

transformers = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")


def problem(c=24, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * c, c, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(c, dtype=torch.float64) + 0.4 * torch.randn(c, c, generator=g,
                                                                 dtype=torch.float64))
    return torch.randn(r, c, generator=g, dtype=torch.float64), X.T @ X / len(X)


def error(W, Wk, H):
    D = W - Wk
    return float(((D @ H) * D).sum())


def test_refit_is_the_closed_form_least_squares():
    W, H = problem()
    keep = torch.tensor([0, 2, 3, 7, 8, 15, 20])
    Hd = damped(H, 0.01)
    # min ||W X - Wk X_K||² + ridge: normal equations Wk Hd[K,K] = W Hd[:,K]
    want = torch.linalg.lstsq(Hd[keep][:, keep], (W @ Hd[:, keep]).T).solution.T
    assert torch.allclose(refit(W, H, keep), want, rtol=1e-8, atol=1e-10)


def test_one_group_removal_matches_the_brute_force_minimum():
    W, H = problem()
    groups = torch.arange(24).reshape(6, 4)
    Hd = damped(H, 0.01)
    sweep = remove_units(W, H, groups, least=5)
    best, best_err = None, float("inf")
    for u in range(6):
        kept = groups[torch.arange(6) != u].reshape(-1)
        Wk = torch.zeros_like(W)
        Wk[:, kept] = refit(W, H, kept)
        e = error(W, Wk, Hd)
        if e < best_err:
            best, best_err = u, e
    assert int(sweep.order[0]) == best
    assert sweep.errors[1] == pytest.approx(best_err, rel=1e-8)


def test_the_sweep_errors_are_the_refit_errors_of_its_kept_units():
    W, H = problem(c=30)
    groups = torch.arange(30).reshape(10, 3)
    Hd = damped(H, 0.01)
    sweep = remove_units(W, H, groups, least=2)
    assert sweep.after == list(range(9))
    for removed, err in zip(sweep.after, sweep.errors, strict=True):
        keep = sweep.kept(10, 10 - removed)
        cols = groups[keep].reshape(-1)
        Wk = torch.zeros_like(W)
        Wk[:, cols] = refit(W, H, cols)
        assert err == pytest.approx(error(W, Wk, Hd), rel=1e-7, abs=1e-10)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(sweep.errors))


def test_large_layers_remove_several_units_per_step():
    W, H = problem(c=600, r=3)
    sweep = remove_units(W, H, torch.arange(600)[:, None], least=1)
    assert len(sweep.errors) <= 65 and sweep.after[-1] == 599
    assert sorted(sweep.order.tolist()) == sorted(set(sweep.order.tolist()))


# -- sites of config-built models ----------------------------------------------------------
def build(name):
    T = transformers
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(
            vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=3))
    if name == "opt":
        return T.OPTForCausalLM(T.OPTConfig(
            vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32))
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4))
    raise KeyError(name)


def probe(name, tokens=12):
    torch.manual_seed(0)
    model = build(name).eval()
    blocks = find_blocks(model)
    ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(0))
    st = capture(model, blocks, [ids], lambda m, x: m(x), torch.device("cpu"))

    def run(block):
        return block(st.states[0], *st.args[0], **st.kwargs[0])
    return model, blocks, run


@pytest.mark.parametrize("name,kv,q_per_unit", [("llama", 2, 4), ("qwen2", 3, 2),
                                                ("opt", 4, 1), ("bert", 4, 1)])
def test_sites_are_found_with_the_models_own_key_value_groups(name, kv, q_per_unit):
    model, blocks, run = probe(name)
    sites, dropped = find_sites(list(blocks.modules), run, tokens=12)
    assert not dropped
    att = next(s for s in sites if s.kind == "attention")
    mlp = next(s for s in sites if s.kind == "mlp")
    assert att.units == kv
    d = att.columns.shape[1] // q_per_unit
    q = next(n for n in att.producers if len(att.producers[n][0]) == q_per_unit * d) \
        if q_per_unit > 1 else None
    if q is not None:  # unit u: query heads u*n_rep ... (u+1)*n_rep - 1 (repeat_kv's order)
        heads = att.producers[q][:, ::d] // d
        assert torch.equal(heads, torch.arange(kv * q_per_unit).reshape(kv, q_per_unit))
    assert mlp.units == 48 and mlp.columns.shape[1] == 1
    assert att.macs > att.params  # the attention's own products count too
    assert mlp.macs == pytest.approx(mlp.params - (mlp.params % 2 if name in ("opt", "bert")
                                                   else 0), abs=1)


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt"])
def test_removing_units_equals_zeroing_them(name):
    model, blocks, run = probe(name)
    sites, _ = find_sites(list(blocks.modules), run, tokens=12)
    block = blocks.modules[1]
    for site in sites:
        g = torch.Generator().manual_seed(3)
        keep = torch.rand(site.units, generator=g) < 0.5
        keep[0] = True
        keep[-1] = False
        zero = torch.ones(block.get_submodule(site.consumer).in_features)
        zero[site.columns[~keep].reshape(-1)] = 0
        h = block.get_submodule(site.consumer).register_forward_pre_hook(
            lambda m, a, z=zero: (a[0] * z,))
        with torch.no_grad():
            want = block_output(run(block))
        h.remove()
        cut = copy.deepcopy(block)
        shrink(cut, site, keep)
        with torch.no_grad():
            got = block_output(run(cut))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        n = sum(p.numel() for p in block.parameters()) - sum(p.numel() for p in cut.parameters())
        assert n == site.params * int((~keep).sum())


def test_t5_attention_is_left_whole_with_the_reason():
    T = transformers
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8)).eval()
    blocks = find_blocks(model)
    ids = torch.randint(0, 64, (1, 10))
    st = capture(model, blocks, [ids], lambda m, x: m(input_ids=x, decoder_input_ids=x),
                 torch.device("cpu"))
    sites, dropped = find_sites(list(blocks.modules),
                                lambda b: b(st.states[0], *st.args[0], **st.kwargs[0]), 10)
    assert [s.kind for s in sites] == ["mlp"]
    assert len(dropped) == 1 and "attention" in next(iter(dropped))


def test_query_head_units_take_the_same_head_of_every_group():
    model, blocks, run = probe("llama")  # 8 query heads in 2 groups of 4
    sites, dropped = find_sites(list(blocks.modules), run, tokens=12,
                                attention_units="heads")
    assert not dropped
    q = next(s for s in sites if s.kind == "query heads")
    assert list(q.producers) == ["self_attn.q_proj"] and q.units == 4
    heads = q.producers["self_attn.q_proj"][:, ::8] // 8
    assert torch.equal(heads, torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]]))
    assert q.counters == {"self_attn.num_key_value_groups": 1}  # the group size lowered
    block = blocks.modules[1]
    keep = torch.tensor([True, False, True, False])
    zero = torch.ones(64)
    zero[q.columns[~keep].reshape(-1)] = 0
    h = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] * zero,))
    with torch.no_grad():
        want = block_output(run(block))
    h.remove()
    cut = copy.deepcopy(block)
    shrink(cut, q, keep)
    assert cut.self_attn.num_key_value_groups == 2 and cut.self_attn.k_proj.out_features == 16
    with torch.no_grad():
        assert torch.allclose(block_output(run(cut)), want, rtol=1e-4, atol=1e-5)


def test_query_head_units_without_groups_are_the_heads():
    model, blocks, run = probe("opt")  # one query head per key/value head
    sites, _ = find_sites(list(blocks.modules), run, tokens=12, attention_units="heads")
    assert {s.kind for s in sites} == {"mlp", "attention"}
