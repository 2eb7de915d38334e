"""Tasks end to end through ``fp.prune`` and ``fp.evaluate``: HuggingFace-style models and
batches, regression, binary classification, language modelling, dense prediction, tuple
and dict outputs, custom losses, every dtype, and per-sample gradients of integer inputs."""

import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import global_methods, same_state, state
from torch import nn

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.data.batches import Samples
from falcon_prune.errors import DataError, ModelError

GRADIENTS = {"n_gradients": 60, "n_validation": 40}
SETTINGS = {
    "mp": {}, "mp_flops": {}, "woodfisher": {"n_gradients": 60}, "chita": {"n_gradients": 60},
    "falcon": GRADIENTS, "falcon++": {**GRADIENTS, "stages": 2},
}


def train(model, batches, loss_fn, steps=150, lr=3e-2):
    """A few full-batch Adam steps; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = loss_fn(model, batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prunable(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def pruned_once(result, before_model, before_state, flops):
    """Checks every pruning result shares: budget, original untouched, masks attached."""
    assert same_state(before_model, before_state)
    assert result.flops_fraction <= flops
    assert fp.masks_of(result.model) and not fp.masks_of(before_model)
    assert any(not bool(mask.all()) for mask in fp.masks_of(result.model).values())


# -- a HuggingFace-style text classifier -----------------------------------------------------
class ModelOutput(collections.OrderedDict):
    """Like transformers' ModelOutput: an OrderedDict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class TinyText(nn.Module):
    """Token embeddings averaged over the attention mask, then two linear layers; returns a
    ModelOutput with ``logits`` and the hidden features."""

    def __init__(self, vocab=20, dim=12, hidden=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        assert not input_ids.is_floating_point()
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1)
        hidden = F.relu(self.fc1(pooled))
        return ModelOutput(logits=self.fc2(hidden), hidden_states=hidden)


def text_data(n=300, vocab=20, length=10, seed=0):
    """Padded token sequences; every token votes for the classes with a fixed random score
    vector and the label is the class with the largest mean vote over the real (unpadded)
    tokens: a linear function of the mean-pooled one-hot tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    votes = torch.randn(vocab, 3, generator=g)
    votes = votes - votes[1:].mean(0)  # no class favoured
    votes[0] = 0
    labels = (votes[ids].sum(1) / lengths[:, None]).argmax(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def text():
    """(trained TinyText, its data as a dict batch)."""
    data = text_data()
    torch.manual_seed(0)

    def loss(model, d):
        return F.cross_entropy(model(d["input_ids"], d["attention_mask"]).logits, d["labels"])

    return train(TinyText(), data, loss), data


def test_text_model_is_trained_and_labels_are_balanced(text):
    model, data = text
    counts = torch.bincount(data["labels"], minlength=3)
    assert counts.max() <= 0.45 * 300  # chance is below 0.45
    ev = fp.evaluate(model, data)
    assert ev.metric_name == "accuracy" and ev.metric > 0.9 and ev.samples == 300


@pytest.mark.parametrize("wrap", [dict, collections.UserDict], ids=["dict", "UserDict"])
@pytest.mark.parametrize("method", ["falcon", "falcon++", "mp"])
def test_huggingface_style_model_and_batches(text, method, wrap):
    model, data = text
    batch = wrap(data)
    before = state(model)
    r = fp.prune(model, batch, flops=0.5, method=method, progress=False, **SETTINGS[method])
    pruned_once(r, model, before, 0.5)
    assert r.config.task.name == "classification"
    # the embedding is not prunable
    assert set(fp.masks_of(r.model)) == {"fc1.weight", "fc2.weight"}
    ev = fp.evaluate(r.model, batch)
    assert math.isfinite(ev.loss) and math.isfinite(ev.metric) and ev.samples == 300
    assert ev.metric > 0.5  # well above chance (1/3) at half the FLOPs
    out = r.model(data["input_ids"][:4], data["attention_mask"][:4])
    assert isinstance(out, ModelOutput) and out.logits.shape == (4, 3)


def test_huggingface_style_model_in_a_dataloader(text):
    model, data = text
    items = [{k: v[i] for k, v in data.items()} for i in range(len(data["labels"]))]
    loader = torch.utils.data.DataLoader(items, batch_size=32)
    r = fp.prune(model, loader, flops=0.5, method="falcon", progress=False, **GRADIENTS)
    assert r.flops_fraction <= 0.5 and r.config.sampling == "random"
    assert fp.evaluate(r.model, loader).samples == 300


# -- regression and binary classification ----------------------------------------------------
class MLP(nn.Module):
    def __init__(self, inputs=6, hidden=24, outputs=1):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def regression_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3]
    return x, y


@pytest.fixture(scope="module")
def regressor():
    x, y = regression_data()
    torch.manual_seed(0)
    return train(MLP(), (x, y), lambda m, d: F.mse_loss(m(d[0]).squeeze(1), d[1]),
                 steps=300, lr=1e-2), (x, y)


@pytest.mark.parametrize("method", ["falcon", "falcon++"])
def test_regression(regressor, method):
    model, (x, y) = regressor
    before = state(model)
    dense = fp.evaluate(model, (x, y), task="regression")
    assert dense.metric is None and dense.metric_name is None
    with torch.no_grad():
        mse = float(((model(x).squeeze(1) - y) ** 2).mean())
    assert dense.loss == pytest.approx(mse, rel=1e-5)
    assert dense.loss < 0.3 * float(y.var())  # trained
    r = fp.prune(model, (x, y), flops=0.6, method=method, task="regression", progress=False,
                 **SETTINGS[method])
    pruned_once(r, model, before, 0.6)
    assert r.config.task.name == "regression"
    ev = fp.evaluate(r.model, (x, y), task="regression")
    assert math.isfinite(ev.loss) and ev.loss < float(y.var())  # better than the mean


def test_regression_with_the_classification_task_is_refused(regressor):
    model, (x, y) = regressor
    with pytest.raises(ModelError, match="regression"):
        fp.prune(model, (x, y), flops=0.5, method="falcon", progress=False, **GRADIENTS)
    with pytest.raises(ModelError, match="regression"):
        fp.prune(model, (x, y), flops=0.5, method="mp", progress=False)


def test_regression_targets_must_be_floating_point(regressor):
    model, (x, y) = regressor
    with pytest.raises(DataError, match="floating point"):
        fp.prune(model, (x, y.round().long()), flops=0.5, method="mp", task="regression",
                 progress=False)


@pytest.fixture(scope="module")
def binary():
    x, y = regression_data(seed=1)
    labels = (y > 0).float()
    torch.manual_seed(0)
    return train(MLP(), (x, labels), lambda m, d: F.binary_cross_entropy_with_logits(
        m(d[0]).squeeze(1), d[1]), steps=200, lr=1e-2), (x, labels)


@pytest.mark.parametrize("method", ["falcon", "mp"])
def test_binary_classification(binary, method):
    model, (x, labels) = binary
    before = state(model)
    dense = fp.evaluate(model, (x, labels), task="binary_classification")
    with torch.no_grad():
        hits = ((model(x).squeeze(1) > 0).float() == labels).float().mean()
    assert dense.metric_name == "accuracy" and dense.metric == pytest.approx(float(hits))
    assert dense.metric > 0.85
    r = fp.prune(model, (x, labels.long()), flops=0.5, method=method,
                 task="binary_classification", progress=False, **SETTINGS[method])
    pruned_once(r, model, before, 0.5)
    ev = fp.evaluate(r.model, (x, labels), task="binary_classification")
    assert math.isfinite(ev.loss) and ev.metric > 0.6


def test_one_logit_with_the_classification_task_is_refused(binary):
    model, (x, labels) = binary
    with pytest.raises(ModelError, match="binary_classification"):
        fp.prune(model, (x, labels.long()), flops=0.5, method="mp", progress=False)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        fp.prune(model, (x, 2 * labels), flops=0.5, method="falcon",
                 task="binary_classification", progress=False, **GRADIENTS)


# -- language modelling ----------------------------------------------------------------------
class NextToken(nn.Module):
    """Per-position next-token logits (N, T, V) from each token's embedding."""

    def __init__(self, vocab=8, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(F.relu(self.fc1(self.emb(input_ids))))


class LastToken(NextToken):
    """Logits (N, V) for the last position only: not a language model's (N, T, V)."""

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids)[:, -1]


def lm_data(n=240, vocab=8, length=8, seed=0):
    """Sequences following next = (3 * token + 1) % vocab, padded (id 0, mask 0) at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        ids[:, t] = (3 * ids[:, t - 1] + 1) % vocab
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def hand_lm_losses(logits, ids, valid):
    """Per-sequence mean of -log p(token t+1 | position t) over the valid targets."""
    out = []
    for i in range(ids.shape[0]):
        terms = []
        for t in range(ids.shape[1] - 1):
            if valid[i][t + 1]:
                row = [float(v) for v in logits[i, t]]
                log_z = math.log(sum(math.exp(v) for v in row))
                terms.append(log_z - row[int(ids[i, t + 1])])
        out.append(sum(terms) / len(terms))
    return out


def test_language_modeling_loss_by_hand():
    task = fp.tasks.language_modeling()
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5], [2, 5, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs, targets = task.split({"input_ids": ids, "attention_mask": mask})
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert targets.tolist() == [[1, 2, 3, 4, 5], [2, 5, 1, -100, -100]]
    got = task.losses(logits, targets)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(hand_lm_losses(logits, ids, mask.tolist()), rel=1e-9)
    # explicit labels are used as given (not shifted by the caller); -100 is ignored
    labels = torch.tensor([[1, 2, -100, 4, 5], [2, 5, 1, -100, -100]])
    _, targets = task.split({"input_ids": ids, "attention_mask": mask, "labels": labels})
    valid = (labels != -100).tolist()
    assert task.losses(logits, targets).tolist() == pytest.approx(
        hand_lm_losses(logits, ids, valid), rel=1e-9)
    # a tensor batch is its own target
    inputs, targets = task.split(ids[:1])
    assert torch.equal(inputs, ids[:1]) and torch.equal(targets, ids[:1])
    # next-token accuracy: position t predicts token t+1
    hits = task.metric(logits, task.split({"input_ids": ids, "attention_mask": mask})[1])
    best = logits.argmax(2)
    expect = [sum(int(best[i, t]) == int(ids[i, t + 1]) for t in range(n - 1)) / (n - 1)
              for i, n in enumerate((5, 3))]
    assert hits.tolist() == pytest.approx(expect)


@pytest.fixture(scope="module")
def lm():
    data = lm_data()
    task = fp.tasks.language_modeling()
    torch.manual_seed(0)

    def loss(model, d):
        return task.losses(*task.run(model, d)).mean()

    return train(NextToken(), data, loss, steps=100), data


def test_language_modeling_padding_does_not_count(lm):
    model, data = lm
    task = fp.tasks.language_modeling()
    padded = dict(data, input_ids=data["input_ids"].masked_fill(data["attention_mask"] == 0, 7))
    a = task.losses(*task.run(model, data))
    b = task.losses(*task.run(model, padded))
    assert torch.allclose(a, b)
    unmasked = task.losses(*task.run(model, {"input_ids": padded["input_ids"]}))
    assert not torch.allclose(a, unmasked)  # without the mask the padding is scored


def test_language_modeling_prune(lm):
    model, data = lm
    before = state(model)
    dense = fp.evaluate(model, data, task="language_modeling")
    assert dense.metric_name == "next-token accuracy" and dense.metric > 0.9
    r = fp.prune(model, data, flops=0.5, method="falcon", task="language_modeling",
                 progress=False, **GRADIENTS)
    pruned_once(r, model, before, 0.5)
    ev = fp.evaluate(r.model, data, task="language_modeling")
    assert math.isfinite(ev.loss) and 0 <= ev.metric <= 1
    with pytest.raises(ModelError, match="vocabulary"):  # a classifier's (N, C) logits
        fp.prune(LastToken(), data, flops=0.5, method="mp", task="language_modeling",
                 progress=False)


# -- dense prediction ------------------------------------------------------------------------
IGNORE = 255


class TinySeg(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def seg_data(n=160, seed=0):
    """(x (n, 1, 6, 6), labels (n, 6, 6)): the class of a pixel is its value's band; the
    border is labelled IGNORE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0] > -0.4).long() + (x[:, 0] > 0.4).long()
    y[:, 0, :] = IGNORE
    y[:, :, 0] = IGNORE
    return x, y


@pytest.fixture(scope="module")
def seg():
    x, y = seg_data()
    torch.manual_seed(0)
    return train(TinySeg(), (x, y), lambda m, d: F.cross_entropy(m(d[0]), d[1],
                                                                 ignore_index=IGNORE),
                 steps=150, lr=2e-2), (x, y)


def test_dense_prediction_loss_ignores_positions():
    task = fp.tasks.dense_prediction(ignore_index=IGNORE)
    torch.manual_seed(2)
    pred = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([[[0, 1], [IGNORE, 2]], [[IGNORE, IGNORE], [1, 1]]])
    logp = pred.log_softmax(1)
    expect = []
    for i in range(2):
        terms = [-float(logp[i, y[i, a, b], a, b]) for a in range(2) for b in range(2)
                 if y[i, a, b] != IGNORE]
        expect.append(sum(terms) / len(terms))
    assert task.losses(pred, y).tolist() == pytest.approx(expect, rel=1e-9)
    changed = pred.clone()
    changed[0, :, 1, 0] += 5.0  # an ignored pixel
    assert torch.equal(task.losses(changed, y), task.losses(pred, y))
    task.check(pred, y)  # IGNORE is not out of the class range
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        task.check(pred, torch.where(y == 2, 3, y))


def test_dense_prediction_prune(seg):
    model, (x, y) = seg
    task = fp.tasks.dense_prediction(ignore_index=IGNORE)
    before = state(model)
    dense = fp.evaluate(model, (x, y), task=task)
    assert dense.metric_name == "pixel accuracy" and dense.metric > 0.85
    r = fp.prune(model, (x, y), flops=0.5, method="falcon", task=task, progress=False,
                 **GRADIENTS)
    pruned_once(r, model, before, 0.5)
    ev = fp.evaluate(r.model, (x, y), task=task)
    assert math.isfinite(ev.loss) and ev.metric > 0.5
    with pytest.raises(DataError, match="class indices"):  # default -100: 255 out of range
        fp.prune(model, (x, y), flops=0.5, method="mp", task="dense_prediction",
                 progress=False)


# -- outputs ---------------------------------------------------------------------------------
class TupleOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.detach().sum(1)


class DictOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        scores = self.net(x)
        return {"scores": scores, "features": x.flatten(1)}


def test_tuple_output_uses_its_first_element(cnn, data):
    model = TupleOut(copy.deepcopy(cnn))
    r = fp.prune(model, data, flops=0.4, method="falcon", progress=False, **GRADIENTS)
    plain = fp.prune(cnn, data, flops=0.4, method="falcon", progress=False, **GRADIENTS)
    assert r.flops_fraction <= 0.4
    masks, expect = fp.masks_of(r.model), fp.masks_of(plain.model)
    assert all(torch.equal(masks["net." + k], v) for k, v in expect.items())
    assert fp.evaluate(r.model, data).metric == pytest.approx(
        fp.evaluate(plain.model, data).metric)


def test_dict_output_without_logits_needs_output(cnn, data):
    model = DictOut(copy.deepcopy(cnn))
    with pytest.raises(ModelError, match=r"output=lambda out: out\['scores'\]"):
        fp.prune(model, data, flops=0.4, method="falcon", progress=False, **GRADIENTS)
    with pytest.raises(ModelError, match="no 'logits'"):
        fp.evaluate(model, data)
    task = fp.tasks.classification(output=lambda out: out["scores"])
    r = fp.prune(model, data, flops=0.4, method="falcon", task=task, progress=False,
                 **GRADIENTS)
    assert r.flops_fraction <= 0.4 and r.config.task.name == "classification"
    ev = fp.evaluate(r.model, data, task=task)
    assert math.isfinite(ev.loss) and ev.metric > 0.5


# -- custom losses ---------------------------------------------------------------------------
def per_sample_ce(pred, y):
    return F.cross_entropy(pred, y, reduction="none")


def mean_ce(pred, y):
    return F.cross_entropy(pred, y)


@pytest.mark.parametrize("loss", [per_sample_ce, mean_ce], ids=["per-sample", "batch-mean"])
def test_custom_loss_function(cnn, data, loss):
    before = state(cnn)
    r = fp.prune(cnn, data, flops=0.4, method="falcon", task=loss, progress=False,
                 **GRADIENTS)
    pruned_once(r, cnn, before, 0.4)
    assert r.config.task.name == "custom" and r.config.task.loss is loss
    # cross-entropy written by hand is the built-in classification task
    builtin = fp.prune(cnn, data, flops=0.4, method="falcon", progress=False, **GRADIENTS)
    masks, expect = fp.masks_of(r.model), fp.masks_of(builtin.model)
    assert all(torch.equal(masks[k], v) for k, v in expect.items())
    ev = fp.evaluate(r.model, data, task=loss, batch_size=50)
    assert ev.metric is None
    assert ev.loss == pytest.approx(fp.evaluate(r.model, data).loss, rel=1e-5)


def test_custom_task_with_a_metric(cnn, data):
    task = fp.Task(loss=per_sample_ce, metric=lambda p, y: (p.argmax(1) == y).float())
    ev = fp.evaluate(cnn, data, task=task)
    assert ev.metric_name == "metric"
    assert ev.metric == pytest.approx(fp.evaluate(cnn, data).metric)


# -- labels (N, 1) ---------------------------------------------------------------------------
def test_column_labels_work_like_flat_ones(cnn, data):
    x, y = data
    flat = fp.prune(cnn, (x, y), flops=0.4, method="falcon", progress=False, **GRADIENTS)
    col = fp.prune(cnn, (x, y[:, None]), flops=0.4, method="falcon", progress=False,
                   **GRADIENTS)
    assert col.flops_fraction <= 0.4
    masks, expect = fp.masks_of(col.model), fp.masks_of(flat.model)
    assert all(torch.equal(masks[k], v) for k, v in expect.items())
    a, b = fp.evaluate(flat.model, (x, y)), fp.evaluate(col.model, (x, y[:, None]))
    assert (a.loss, a.metric) == pytest.approx((b.loss, b.metric))
    with pytest.raises(DataError, match=r"\(N, 1\) are fine"):
        fp.prune(cnn, (x, torch.stack([y, y], 1)), flops=0.4, method="mp", progress=False)


def test_int32_labels_work_like_int64(cnn, data):
    x, y = data
    assert fp.evaluate(cnn, (x, y.int())) == fp.evaluate(cnn, (x, y))
    r = fp.prune(cnn, (x, y.int()), flops=0.4, method="falcon", progress=False, **GRADIENTS)
    assert r.flops_fraction <= 0.4


# -- every dtype -----------------------------------------------------------------------------
DTYPES = [torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("method", global_methods())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_and_method(cnn, data, dtype, method):
    model = copy.deepcopy(cnn).to(dtype)
    before = state(model)
    x, y = data[0].to(dtype), data[1]
    r = fp.prune(model, (x, y), flops=0.4, method=method, progress=False, **SETTINGS[method])
    pruned_once(r, model, before, 0.4)
    assert [m.weight.dtype for m in prunable(r.model)] == [dtype] * 3  # before any forward
    assert {p.dtype for p in r.model.parameters()} == {dtype}
    assert {b.dtype for n, b in r.model.named_buffers() if n.endswith("_mask")} == {dtype}
    out = r.model(x[:5])
    assert out.dtype == dtype and torch.isfinite(out).all()
    plain = fp.make_permanent(fp.clone_model(r.model))
    assert all(m.weight.dtype == dtype for m in prunable(plain))
    kept, dense = fp.count_macs(plain, x[:1])
    assert kept / dense == pytest.approx(r.flops_fraction)
    ev = fp.evaluate(r.model, (x, y))
    assert math.isfinite(ev.loss) and 0 <= ev.metric <= 1


def test_float64_magnitude_pruning_keeps_weights_exactly(cnn, data):
    model = copy.deepcopy(cnn).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for m in prunable(model):  # weights that float32 cannot hold
            m.weight.add_(1e-12 * torch.randn(m.weight.shape, generator=g,
                                              dtype=torch.float64))
    r = fp.prune(model, (data[0].double(), data[1]), flops=0.5, method="mp", progress=False)
    plain = fp.make_permanent(fp.clone_model(r.model))
    for before, after in zip(prunable(model), prunable(plain), strict=True):
        kept = after.weight != 0
        assert torch.equal(after.weight[kept], before.weight[kept])


# -- per-sample gradients of integer inputs --------------------------------------------------
def test_gradient_rows_of_token_inputs_do_not_depend_on_the_batch(text):
    model, data = copy.deepcopy(text[0]).double(), text[1]  # float64: rounding far below
    task = fp.tasks.classification()
    batch = {k: v[:24] for k, v in data.items()}
    cm = CostModel.from_model(model, {k: batch[k][:2] for k in ("input_ids",
                                                                "attention_mask")},
                              task.call)
    kw = {"task": task, "dtype": torch.float64, "progress": False}
    whole = fp.gradient_matrix(model, cm, Samples(batch), 24, chunk=64, **kw)
    assert whole.shape == (24, cm.num_weights) and bool(whole.abs().sum(1).gt(0).all())
    for chunk in (1, 5):
        rows = fp.gradient_matrix(model, cm, Samples(batch), 24, chunk=chunk, **kw)
        assert torch.allclose(rows, whole, rtol=1e-9, atol=1e-12)
    # the rows of samples 10..19 alone, and in reverse order, are the same rows
    part = Samples({k: v[10:20] for k, v in batch.items()})
    assert torch.allclose(fp.gradient_matrix(model, cm, part, 10, **kw), whole[10:20],
                          rtol=1e-9, atol=1e-12)
    back = Samples({k: v[10:20].flip(0) for k, v in batch.items()})
    assert torch.allclose(fp.gradient_matrix(model, cm, back, 10, **kw),
                          whole[10:20].flip(0), rtol=1e-9, atol=1e-12)
    # and a row is the plain autograd gradient of that one sample's loss
    j = 7
    loss = F.cross_entropy(model(batch["input_ids"][j : j + 1],
                                 batch["attention_mask"][j : j + 1]).logits,
                           batch["labels"][j : j + 1])
    ref = torch.autograd.grad(loss, [m.weight for m in (model.fc1, model.fc2)])
    assert torch.allclose(whole[j], torch.cat([g.reshape(-1) for g in ref]),
                          rtol=1e-9, atol=1e-12)
    # rows over pairs of samples are the means of the single-sample rows
    pairs = fp.gradient_matrix(model, cm, Samples(batch), 12, samples_per_gradient=2, **kw)
    assert torch.allclose(pairs, whole.reshape(12, 2, -1).mean(1), rtol=1e-9, atol=1e-12)


def test_model_outputs_of_token_inputs_do_not_depend_on_the_batch(text):
    model, data = text
    task = fp.tasks.classification()
    whole, _ = task.run(model, data)
    part, _ = task.run(model, {k: v[100:110] for k, v in data.items()})
    assert torch.allclose(whole[100:110], part, atol=1e-6)
