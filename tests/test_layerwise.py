"""Layer-wise pruning: the OBS sweep against a direct reference, n:m patterns, the
allocation's certificate, and sequential pruning of a tiny Llama-like model (grouped-query
attention) through ``fp.prune``."""

import itertools

import pytest
import torch
from torch import nn

import falcon_prune as fp
from falcon_prune.errors import BudgetError, ConfigError, ModelError
from falcon_prune.loss.layerwise import Grams
from falcon_prune.methods.reconstruction import improve, layer_error, refit
from falcon_prune.methods.sparsegpt import damped, error_curve, sweep
from falcon_prune.methods.wanda import wanda
from falcon_prune.selection.allocation import Curve, allocate, outlier_weighted, uniform

transformers = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")


def problem(d=40, r=6, seed=0, spread=1.0):
    """W (r, d) and a Gram H (d, d) of correlated inputs whose scales spread by
    exp(``spread`` x a normal sample)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * d, d, generator=g, dtype=torch.float64) * torch.exp(
        spread * torch.randn(d, generator=g, dtype=torch.float64))
    X = X @ (torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g,
                                                                 dtype=torch.float64))
    return torch.randn(r, d, generator=g, dtype=torch.float64), X.T @ X / len(X)


def reference_sweep(W, H, keep):
    """Sequential OBS with explicit inverses: at column j the weights of j..d-1 compensate
    for the pruned weight of column j, with (H[j:, j:])^-1."""
    out = W.clone()
    for j in range(W.shape[1]):
        inverse = torch.linalg.inv(H[j:, j:])
        for i in range(W.shape[0]):
            if not keep[i, j]:
                out[i, j:] -= out[i, j] / inverse[0, 0] * inverse[:, 0]
    return out


@pytest.mark.parametrize("d", [40, 300])  # one block of columns, and several (lazy updates)
def test_the_sweep_equals_the_direct_obs_reference(d):
    W, H = problem(d, spread=0.2)  # well conditioned: the two routes agree to rounding
    W_hat, keep = sweep(W, H, [d * 6 // 2, d * 6 // 5], damp=0.0)
    for k in range(2):
        assert torch.allclose(W_hat[k], reference_sweep(W, H, keep[k]), rtol=1e-7, atol=1e-9)
    assert keep.sum((1, 2)).tolist() == [d * 3, d * 6 // 5]


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_n_m_patterns_hold_in_every_row(pattern):
    W, H = problem(48, 10)
    n, m = pattern
    for keep in (sweep(W, H, pattern=pattern)[1][0], wanda(W, H, pattern=pattern)[1],
                 fp.methods.reconstruction.solve_layer(
                     W.float(), H, None, pattern, fp.defaults("sparsegpt"))[1]):
        assert (keep.view(10, -1, m).sum(-1) == n).all()


def test_refit_is_the_least_squares_answer_on_its_support():
    W, H = problem(30, 4)
    _, keep = wanda(W, H, count=50)
    A = damped(H, 0.01)
    got = refit(W, A, keep, W * keep, iterations=60)
    for i in range(4):
        S = keep[i]
        direct = torch.linalg.solve(A[S][:, S], (A @ W[i])[S])
        assert torch.allclose(got[i, S], direct, rtol=1e-6, atol=1e-8)
        assert (got[i, ~S] == 0).all()


def test_improve_never_worsens_the_sweep():
    W, H = problem(64, 8)
    W_hat, keep = sweep(W, H, [200])
    better, kept = improve(W.float(), H, W_hat[0], keep[0])
    assert int(kept.sum()) == 200
    assert float(layer_error(W, better, H).sum()) <= float(layer_error(W, W_hat[0], H).sum())


def test_error_curves_fall_to_zero_with_every_weight_kept():
    W, H = problem(40, 4)
    errors = error_curve(W, H, [20, 80, 120, 160])
    assert errors[-1] == pytest.approx(0.0, abs=1e-9) and errors[0] > errors[1] > 0


def brute_force(curves, F, S):
    best = None
    for choice in itertools.product(*[range(len(c.kept)) for c in curves]):
        cost = sum(c.cost * c.kept[j] for c, j in zip(curves, choice, strict=True))
        count = sum(c.size(c.kept[j]) for c, j in zip(curves, choice, strict=True))
        if cost <= F and count <= S * (1 + 1e-12):
            err = sum(c.errors[j] for c, j in zip(curves, choice, strict=True))
            best = err if best is None else min(best, err)
    return best


def random_curves(g, count):
    """``count`` (numel, kept grid, falling errors ending at 0) of random layers."""
    out = []
    for _ in range(count):
        n = int(torch.randint(50, 200, (1,), generator=g))
        kept = sorted({int(n * f) for f in (0.1, 0.3, 0.5, 0.7, 1.0)})
        drops = torch.rand(len(kept), generator=g).sort(descending=True).values
        out.append((n, kept, (drops.cumsum(0).flip(0) - drops[-1]).tolist()))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_the_allocation_meets_both_budgets_with_a_valid_certificate(seed):
    g = torch.Generator().manual_seed(seed)
    curves = [Curve(f"l{i}", n, float(torch.rand(1, generator=g)) + 0.5, kept, errors)
              for i, (n, kept, errors) in enumerate(random_curves(g, 5))]
    F = 0.5 * sum(c.cost * c.numel for c in curves)
    S = 0.45 * sum(c.numel for c in curves)
    a = allocate(curves, F, S)
    assert sum(c.cost * a.kept[c.name] for c in curves) <= F * (1 + 1e-12)
    assert sum(a.kept.values()) <= S
    optimum = brute_force(curves, F, S)
    assert a.lower_bound <= optimum + 1e-9 <= a.error + 2e-9
    for rule in (uniform(curves, F, S), outlier_weighted(
            curves, {c.name: i // 2 for i, c in enumerate(curves)}, {0: 0.1, 1: 0.3, 2: 0.2},
            F, S)):
        assert sum(c.cost * rule[c.name] for c in curves) <= F * (1 + 1e-12)
        assert sum(rule.values()) <= S


@pytest.mark.parametrize("seed", range(5))
def test_a_second_budget_in_measured_seconds_is_met(seed):
    """Sizes that are not the counts (a latency budget's seconds: a fixed step when a
    kernel changes, not proportional to the weights): the knapsack, one fraction for
    every layer and the interpolation between grid counts all keep within both
    budgets, and the knapsack's error is within 10 % of the best choice of grid counts."""
    g = torch.Generator().manual_seed(seed)
    curves = []
    for i, (n, kept, errors) in enumerate(random_curves(g, 4)):
        jump = float(torch.rand(1, generator=g)) * 20
        sizes = [0.4 * k + (jump if k > n // 2 else 0.0) for k in kept]
        curves.append(Curve(f"l{i}", n, 1.0, kept, errors, sizes=sizes))
    c = curves[0]
    mid = (c.kept[0] + c.kept[1]) // 2
    assert c.sizes[0] <= c.size(mid) <= c.sizes[1] and c.size(c.kept[2]) == c.sizes[2]
    F = 0.6 * sum(c.cost * c.numel for c in curves)
    S = 0.5 * sum(c.size(c.numel) for c in curves)
    a = allocate(curves, F, S)
    assert sum(c.size(a.kept[c.name]) for c in curves) <= S * (1 + 1e-12)
    assert sum(c.cost * a.kept[c.name] for c in curves) <= F * (1 + 1e-12)
    assert a.error <= 1.1 * brute_force(curves, F, S) + 1e-9
    one = uniform(curves, F, S)
    assert sum(c.size(one[c.name]) for c in curves) <= S * (1 + 1e-12)


@pytest.mark.parametrize("fraction, heads", [(0.7, 2), (0.5, 1)])
def test_uniform_rounds_a_coarse_layer_and_fills_the_budget_with_the_fine_ones(fraction,
                                                                                heads):
    """A layer of 3 units (head groups of 64 weights) beside one of 1,536 single units: one
    fraction for both, the coarse layer's count rounded, and the fine layer takes what is
    left, so the budget is used to within one fine unit (floor rounding of every layer
    would have left the coarse one at 1 of 3 and the budget a third unused there)."""
    attn = Curve("attn", 3 * 64, 2.0, [64, 192], [1.0, 0.0], step=64)
    mlp = Curve("mlp", 1536, 1.0, [1, 1536], [1.0, 0.0])
    F = fraction * (attn.cost * attn.numel + mlp.cost * mlp.numel)
    kept = uniform([attn, mlp], F, None)
    cost = attn.cost * kept["attn"] + mlp.cost * kept["mlp"]
    assert kept["attn"] == heads * 64
    assert F - mlp.cost <= cost <= F


def test_an_allocation_below_the_floors_is_refused():
    curves = [Curve("a", 10, 1.0, [5, 10], [1.0, 0.0])]
    with pytest.raises(BudgetError, match="least each layer keeps"):
        allocate(curves, 3.0, None)


# -- a tiny Llama-like model -----------------------------------------------------------------
def tiny_llama(layers=3, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (24, 16), generator=torch.Generator().manual_seed(1))


def test_grams_of_layers_fed_one_tensor_are_shared_and_exact(llama, ids):
    block = llama.model.layers[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    grams = Grams(layers)
    seen = []
    hook = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with grams.attached(), torch.no_grad():
        llama(ids[:4], use_cache=False)
        llama(ids[4:10], use_cache=False)
    hook.remove()
    assert grams.shared == {"self_attn.k_proj": "self_attn.q_proj",
                            "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}
    x = torch.cat([s.reshape(-1, 128) for s in seen]).double()
    assert torch.allclose(grams.gram("mlp.down_proj"), x.T @ x / len(x), rtol=1e-5, atol=1e-9)
    assert torch.equal(grams.gram("self_attn.v_proj"), grams.gram("self_attn.q_proj"))


@pytest.mark.parametrize("kw", [
    dict(method="sparsegpt", nnz=0.5),
    dict(method="wanda", flops=0.5),
    dict(method="sparsegpt", pattern="2:4"),
    dict(method="falcon", loss_model="layerwise", flops=0.5, nnz=0.45),
    dict(method="falcon", loss_model="layerwise", nnz=0.4, allocation="owl"),
])
def test_sequential_pruning_of_a_grouped_query_llama(llama, ids, kw):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    r = fp.prune(llama, ids, task="language_modeling", n_calibration=12, progress=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert r.config.loss_model == "layerwise"
    if "flops" in kw:
        assert r.flops_fraction <= kw["flops"] + 1e-9
    if "nnz" in kw:
        assert r.nnz_fraction <= kw["nnz"] + 1e-9
    names = [lay.name for lay in r.layers]
    assert names and all(n.startswith("model.layers.") for n in names)  # head stays dense
    assert len(names) == 3 * 7
    assert fp.masks_of(r.model) == {}  # plain zeros: no masks doubling a large model
    if "pattern" in kw:
        for name in names:
            w = r.model.get_parameter(name)
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    rows = r.details["layers"]
    assert [row["layer"] for row in rows] == names and all(0 <= row["error"] for row in rows)
    assert r.details["fixed_macs_per_token"] > 0 and r.details["tokens_per_sequence"] == 16
    out = r.model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_the_ilp_allocation_spreads_densities_and_reports_its_certificate(llama, ids):
    r = fp.prune(llama, ids, task="language_modeling", method="falcon", loss_model="layerwise",
                 nnz=0.4, n_calibration=12, progress=False)
    densities = {row["density"] for row in r.details["layers"]}
    assert len(densities) > 1  # not uniform
    assert all(row["sensitivity"] > 0 for row in r.details["layers"])
    assert r.times["sensitivity"] > 0 and "sensitivity" in r.details["error_weights"]
    head, _, first = r.table().splitlines()[:3]
    assert head.split()[-1] == "error"
    assert float(first.split()[-1]) == pytest.approx(r.details["layers"][0]["error"], rel=1e-2)
    assert r.ilp_gap is not None and r.ilp_gap >= 0
    assert r.details["allocation_lower_bound"] <= r.details["allocation_error"] + 1e-12


def test_a_second_pass_is_reported(llama, ids):
    r = fp.prune(llama, ids, task="language_modeling", method="falcon", loss_model="layerwise",
                 nnz=0.4, passes=2, n_calibration=12, progress=False)
    passes = r.details["passes"]
    assert len(passes) == 2 and "changed_layers" in passes[1]
    assert r.nnz_fraction <= 0.4 + 1e-9


def test_auto_chooses_the_layerwise_model_when_the_global_one_would_not_fit(llama, ids):
    r = fp.prune(llama, ids, task="language_modeling", method="falcon", flops=0.5,
                 memory_limit=2**20, progress=False, n_calibration=None)
    assert r.config.loss_model == "layerwise" and r.config.n_gradients is None
    assert "would not fit" in r.details["loss_model_choice"]
    small = fp.prune(llama, ids, task="language_modeling", method="falcon", flops=0.5,
                     n_gradients=8, n_validation=8, progress=False)
    assert small.config.loss_model == "global" and small.config.n_calibration is None
    assert "given" in small.details["loss_model_choice"]


def test_language_models_keep_embeddings_and_head_dense_by_default(llama, ids):
    r = fp.prune(llama, ids, task="language_modeling", method="mp", flops=0.5, progress=False)
    assert all(lay.name.startswith("model.layers.") for lay in r.layers)
    head = fp.prune(llama, ids, task="language_modeling", method="mp", flops=0.5,
                    include=["lm_head"], progress=False)
    assert "lm_head.weight" in [lay.name for lay in head.layers]


@pytest.mark.parametrize("kw, error, match", [
    (dict(method="sparsegpt", loss_model="global"), ConfigError, "runs with loss_model"),
    (dict(method="sparsegpt", n_gradients=10), ConfigError, "does not use n_gradients"),
    (dict(method="falcon", loss_model="layerwise", n_gradients=10), ConfigError,
     "belong to the other loss model"),
    (dict(method="falcon", loss_model="global", pattern="2:4"), ConfigError,
     "belong to the other loss model"),
    (dict(method="sparsegpt", pattern="4:2"), ConfigError, "0 < n < m"),
    (dict(method="sparsegpt", pattern="half"), ConfigError, "must look like"),
    (dict(method="sparsegpt", allocation="best"), ConfigError, "allocation must be one of"),
    (dict(method="sparsegpt", passes=2), ConfigError, "passes=2"),
    (dict(method="sparsegpt", blocks="model.nowhere"), ConfigError, "not an nn.ModuleList"),
    (dict(method="sparsegpt", include=["lm_head"]), ConfigError, "inside the blocks"),
    (dict(method="falcon", loss_model="auto", pattern="2:4", n_gradients=10), ConfigError,
     "settings of the layer-wise loss model"),
    (dict(method="mp", pattern="2:4"), ConfigError, "does not use pattern"),
])
def test_bad_layerwise_settings_are_refused(llama, ids, kw, error, match):
    with pytest.raises(error, match=match):
        fp.prune(llama, ids, task="language_modeling", flops=0.5, progress=False, **kw)


def test_a_model_without_repeated_blocks_is_refused(ids):
    model = nn.Sequential(nn.Embedding(96, 16), nn.Linear(16, 96))
    with pytest.raises(ModelError, match="no repeated blocks"):
        fp.prune(model, ids, task="language_modeling", method="sparsegpt", flops=0.5,
                 progress=False)


class KeywordBlocks(nn.Module):
    """Blocks called with their input under a keyword the layer-wise runs cannot find."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(96, 16)
        self.layers = nn.ModuleList(KeywordBlock() for _ in range(2))
        self.head = nn.Linear(16, 96)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(x=h)
        return self.head(h)


class KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(x)


@pytest.mark.parametrize("allocation", ["ilp", "uniform"])  # with and without sensitivities
def test_blocks_called_without_their_input_in_reach_are_refused(ids, allocation):
    with pytest.raises(ModelError, match="positional input or hidden_states"):
        fp.prune(KeywordBlocks(), ids, task="language_modeling", method="falcon",
                 loss_model="layerwise", allocation=allocation, nnz=0.5, n_calibration=8,
                 progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_layerwise_pruning_keeps_the_models_dtype(ids, dtype):
    model = tiny_llama(layers=2).to(dtype)
    r = fp.prune(model, ids, task="language_modeling", method="sparsegpt", nnz=0.5,
                 n_calibration=8, progress=False)
    assert all(p.dtype == dtype for p in r.model.parameters())
    assert r.nnz_fraction <= 0.5 + 1e-9
    assert torch.isfinite(r.model(ids[:2]).logits).all()


def test_output_sensitivity_equals_a_plain_backward_and_leaves_the_model_alone(llama, ids):
    from falcon_prune.analysis.blocks import find_blocks
    from falcon_prune.data.tasks import language_modeling
    from falcon_prune.loss.distributed import Ranks
    from falcon_prune.loss.sensitivity import output_sensitivity

    task = language_modeling()
    layers = {n: m for n, m in llama.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("model.layers.")}
    outs, grads = {}, {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o))
             for n, m in layers.items()]
    for n in layers:
        grads[n] = [0.0, 0]
    per = {}  # per output feature
    for k in range(3):  # the reference: a plain backward per sequence, gradients kept
        batch = ids[k:k + 1]
        pred, targets = task.run(llama, batch)
        for o in outs.values():
            o.retain_grad()
        task.losses(pred, targets).sum().backward()
        for n, o in outs.items():
            grads[n][0] += float(o.grad.double().pow(2).sum())
            grads[n][1] += o.grad.numel()
            per[n] = per.get(n, 0) + o.grad.double().pow(2).reshape(-1, o.shape[-1]).sum(0)
    for h in hooks:
        h.remove()
    llama.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    flags = [p.requires_grad for p in llama.parameters()]
    s = output_sensitivity(llama, find_blocks(llama), layers, [ids[k:k + 1] for k in range(3)],
                           task, torch.device("cpu"), Ranks.current())
    assert set(s) == set(layers)
    for n, (total, count) in grads.items():
        assert s[n] == pytest.approx(total / count, rel=1e-5), n
    vec = output_sensitivity(llama, find_blocks(llama), layers,
                             [ids[k:k + 1] for k in range(3)], task, torch.device("cpu"),
                             Ranks.current(), per_output=True)
    for n, v in vec.items():  # the diagonal: each output feature's mean over the tokens
        tokens = grads[n][1] // v.numel()
        assert torch.allclose(v, per[n] / tokens, rtol=1e-5, atol=1e-30), n
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert [p.requires_grad for p in llama.parameters()] == flags
    assert all(p.grad is None for p in llama.parameters())
    assert all("forward" not in vars(b) for b in llama.model.layers)
