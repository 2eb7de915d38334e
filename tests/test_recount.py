"""The independent recount (FlopCounterMode) and the public fp.count_macs."""

import pytest
import torch
from helpers import SmallCNN, same_state, state
from torch import nn
from torch.nn.utils import prune as torch_prune

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.analysis.recount import recount
from falcon_prune.data.tasks import call_model
from falcon_prune.errors import ModelError
from falcon_prune.models import MLPNet, resnet20

TOKENS, D = 5, 16


class AttentionBlock(nn.Module):
    """nn.MultiheadAttention (out_proj used through F.linear) and a feed-forward layer."""

    def __init__(self, d=D, heads=4, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Linear(d, 2 * d)
        self.head = nn.Linear(2 * d, 3)
        self.need_weights = need_weights

    def forward(self, x):
        y = x + self.attn(x, x, x, need_weights=self.need_weights)[0]
        return self.head(torch.relu(self.ff(y)).mean(1))


class ScaledWeight(nn.Module):
    """fc's weight is read by aten.mul before any product: no FLOP formula sees it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x @ (self.fc.weight * 2).T)


class TokenModel(nn.Module):
    """Takes keyword inputs, as a HuggingFace model does."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask):
        return self.out(self.emb(input_ids) * attention_mask[..., None])


def tokens(b=2):
    return torch.randn(b, TOKENS, D)


CASES = {
    "small_cnn": (SmallCNN, lambda: torch.randn(3, 1, 8, 8)),
    "resnet20": (resnet20, lambda: torch.randn(1, 3, 32, 32)),
    "mlp": (MLPNet, lambda: torch.randn(2, 784)),
    "attention": (AttentionBlock, tokens),
    "attention_weights": (lambda: AttentionBlock(need_weights=True), tokens),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dense_totals_agree_with_the_cost_model(case):
    make, inputs = CASES[case]
    model, x = make().eval(), inputs()
    cm = CostModel.from_model(model, x)
    count = recount(model, x, call_model)
    assert count.dense == pytest.approx(cm.dense_macs, rel=1e-12)
    assert count.kept == pytest.approx(count.dense, rel=1e-12)  # random weights: no zeros
    assert count.uncounted == {}
    assert fp.count_macs(model, x) == pytest.approx((count.kept, count.dense), rel=1e-12)


def test_trained_cnn_totals(cnn, data):
    x = data[0][:2]
    cm = CostModel.from_model(cnn, x)
    kept, dense = fp.count_macs(cnn, x)
    assert dense == cm.dense_macs == 54 * 64 + 432 * 16 + 32 * 1
    assert kept == dense


def test_zeroing_part_of_a_weight_lowers_kept_exactly(cnn, data):
    model = fp.clone_model(cnn)
    x = data[0][:2]
    kept0, dense = fp.count_macs(model, x)
    with torch.no_grad():
        model.c2.weight[:3] = 0  # 3 * 6 * 3 * 3 weights, each used at 4 x 4 positions
        model.fc.weight[:, :4] = 0  # 16 weights, one MAC each
    kept, dense_after = fp.count_macs(model, x)
    assert dense_after == dense
    assert kept == kept0 - 162 * 16 - 16 * 1
    assert recount(model, x, call_model).kept == kept


def test_zeroing_out_proj_rows_lowers_kept_by_tokens():
    model = AttentionBlock().eval()
    x = tokens()
    kept0, dense = fp.count_macs(model, x)
    with torch.no_grad():
        model.attn.out_proj.weight[:4] = 0  # 4 rows of D weights, used once per token
    kept, _ = fp.count_macs(model, x)
    assert kept == kept0 - 4 * D * TOKENS


def test_weight_read_without_a_flop_formula_is_uncounted():
    model = ScaledWeight()
    x = torch.randn(3, 4)
    count = recount(model, x, call_model)
    assert count.uncounted == {"fc.weight": "aten.mul"}
    assert count.dense == 3 * 2  # only head's weights are seen in a product
    with pytest.raises(ModelError, match=r"fc\.weight is read by aten\.mul"):
        fp.count_macs(model, x)
    excluded = recount(model, x, call_model, exclude=["fc.weight"])
    assert excluded.uncounted == {} and excluded.dense == count.dense


def test_attention_bmm_is_fixed():
    model = AttentionBlock(need_weights=True).eval()
    count = recount(model, tokens(), call_model)
    in_proj = TOKENS * D * 3 * D  # a plain parameter of the attention: prunable too
    scores_and_mix = 2 * TOKENS * TOKENS * D  # q k^T and weights @ v over every head
    assert count.fixed == scores_and_mix
    out_proj, ff, head = TOKENS * D * D, TOKENS * D * 2 * D, 2 * D * 3
    assert count.dense == in_proj + out_proj + ff + head


def test_excluded_modules_count_as_fixed():
    model = SmallCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    full = recount(model, x, call_model)
    assert full.fixed == 0
    part = recount(model, x, call_model, exclude=("c2.weight",))
    assert part.dense == full.dense - 432 * 16
    assert part.fixed == 432 * 16


def test_masked_model_is_counted_without_modifying_it(cnn, data):
    model = fp.clone_model(cnn)
    torch_prune.l1_unstructured(model.c2, "weight", amount=0.5)  # 216 of 432 weights
    model.train()
    before = state(model)
    x = data[0][:2]
    kept, dense = fp.count_macs(model, x)
    assert dense == 54 * 64 + 432 * 16 + 32
    assert kept == dense - 216 * 16
    assert torch_prune.is_pruned(model) and hasattr(model.c2, "weight_orig")
    assert same_state(model, before) and model.training


def test_recount_restores_mode_and_requires_grad():
    model = SmallCNN().train()
    model.fc.weight.requires_grad_(False)
    recount(model, torch.randn(2, 1, 8, 8), call_model)
    assert model.training and not model.fc.weight.requires_grad
    assert model.c1.weight.requires_grad


def test_count_macs_runs_the_task_on_keyword_inputs():
    model = TokenModel()
    inputs = {"input_ids": torch.randint(0, 11, (2, 6)), "attention_mask": torch.ones(2, 6)}
    kept, dense = fp.count_macs(model, inputs, task="language_modeling")
    assert dense == 6 * 8 * 11 and kept == dense  # the embedding lookup has no MACs


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = SmallCNN()
    with pytest.raises(ModelError, match="meta device"):
        recount(model, torch.randn(1, 1, 8, 8), call_model)
