"""falcon_prune.data.batches: drawing a run's samples from every form of data, and the helpers
that work on batches of any structure."""

from collections import UserDict, namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from falcon_prune import errors
from falcon_prune.data.batches import (
    Samples,
    batch_size,
    collect,
    concat,
    leaves,
    map_tensors,
    rebuild,
    take,
)

N = 30


def numbered(n=N):
    """(x (n, 3), y (n,)) where sample i is x[i] = [3i, 3i+1, 3i+2], y[i] = i, so that a
    drawn sample tells which one it is and whether its input and target stayed together."""
    x = torch.arange(3 * n, dtype=torch.float32).reshape(n, 3)
    return x, torch.arange(n)


def ids_of(x, y):
    """The sample numbers of a drawn (x, y), after checking each x row matches its y."""
    assert x.shape == (len(y), 3)
    assert torch.equal(x[:, 0], 3 * y.float()) and torch.equal(x[:, 2], 3 * y.float() + 2)
    return y.tolist()


def check_random_draw(ids, want, total=N):
    assert len(ids) == want and len(set(ids)) == want  # distinct samples
    assert all(0 <= i < total for i in ids)
    assert ids != list(range(want))  # not simply the first ones


class Pairs(Dataset):
    """A map-style dataset of (x, int label) samples that counts the items read."""

    def __init__(self, n=N):
        self.x, self.y = numbered(n)
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


class Stream(IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def batches_of(size, n=N):
    x, y = numbered(n)
    return [(x[a : a + size], y[a : a + size]) for a in range(0, n, size)]


# -- every form of data ----------------------------------------------------------------------
def test_tensor_random_and_first():
    x, _ = numbered()
    d = collect(x, 10, seed=0)
    assert d.sampling == "random" and d.total == N and len(d.samples) == 10
    assert isinstance(d.samples.batch, torch.Tensor)
    rows = (d.samples.batch[:, 0] / 3).long()
    assert torch.equal(d.samples.batch, x[rows])
    check_random_draw(rows.tolist(), 10)
    first = collect(x, 10, sampling="first")
    assert first.sampling == "first" and torch.equal(first.samples.batch, x[:10])


def test_pair_of_tensors_keeps_inputs_with_targets():
    x, y = numbered()
    d = collect((x, y), 12, seed=3)
    assert isinstance(d.samples.batch, tuple) and d.total == N
    check_random_draw(ids_of(*d.samples.batch), 12)
    first = collect((x, y), 12, sampling="first")
    assert ids_of(*first.samples.batch) == list(range(12))


@pytest.mark.parametrize("wrap", [dict, UserDict], ids=["dict", "UserDict"])
def test_dict_of_tensors(wrap):
    x, y = numbered()
    mask = torch.ones(N, 3, dtype=torch.long)
    d = collect(wrap(inputs=x, attention_mask=mask, labels=y), 8, seed=1)
    b = d.samples.batch
    assert isinstance(b, dict) and list(b) == ["inputs", "attention_mask", "labels"]
    assert b["attention_mask"].shape == (8, 3)
    check_random_draw(ids_of(b["inputs"], b["labels"]), 8)
    assert d.sampling == "random" and d.total == N


def test_tensor_dataset():
    x, y = numbered()
    d = collect(TensorDataset(x, y), 10, seed=0)
    assert d.total == N and d.sampling == "random"
    check_random_draw(ids_of(*d.samples.batch), 10)
    first = collect(TensorDataset(x, y), 10, sampling="first")
    assert ids_of(*first.samples.batch) == list(range(10))


def test_dataset_reads_only_the_samples_drawn():
    ds = Pairs()
    d = collect(ds, 7, seed=2)
    assert ds.reads == 7
    x, y = d.samples.batch
    assert y.dtype == torch.long  # Python int labels become a tensor
    check_random_draw(ids_of(x, y), 7)


def test_list_of_samples_with_scalar_labels():
    x, y = numbered()
    samples = [(x[i], int(y[i])) for i in range(N)]
    d = collect(samples, 10, seed=0)
    assert d.total == N and d.sampling == "random"
    bx, by = d.samples.batch
    check_random_draw(ids_of(bx, by), 10)
    first = collect(samples, 5, sampling="first")
    assert ids_of(*first.samples.batch) == [0, 1, 2, 3, 4]
    tensor_labels = [(x[i], y[i]) for i in range(N)]  # 0-d tensor labels are scalars too
    assert collect(tensor_labels, 5, sampling="first").samples.batch[0].shape == (5, 3)


def test_list_of_dict_samples():
    x, y = numbered()
    samples = [{"inputs": x[i], "labels": int(y[i])} for i in range(N)]
    b = collect(samples, 6, sampling="first").samples.batch
    assert set(b) == {"inputs", "labels"} and ids_of(b["inputs"], b["labels"]) == list(range(6))


def test_list_of_batches():
    data = batches_of(8)  # batches of 8, 8, 8 and 6
    d = collect(data, 12, seed=0)
    assert d.total == N and d.sampling == "random"
    check_random_draw(ids_of(*d.samples.batch), 12)
    first = collect(data, 20, sampling="first")
    assert ids_of(*first.samples.batch) == list(range(20))
    everything = collect(data, 100, sampling="first")  # asking for more takes them all
    assert ids_of(*everything.samples.batch) == list(range(N))


def test_dataloader_uses_its_dataset_and_collate_fn():
    def collate(items):
        x = torch.stack([it[0] for it in items])
        return {"inputs": x, "mask": torch.ones(len(items), 3), "labels": torch.tensor(
            [it[1] for it in items])}

    ds = Pairs()
    loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate)
    d = collect(loader, 11, seed=0)
    b = d.samples.batch
    assert set(b) == {"inputs", "mask", "labels"} and b["mask"].shape == (11, 3)
    assert d.total == N and d.sampling == "random" and ds.reads == 11
    check_random_draw(ids_of(b["inputs"], b["labels"]), 11)
    first = collect(loader, 11, sampling="first").samples.batch
    assert ids_of(first["inputs"], first["labels"]) == list(range(11))


def test_dataloader_with_default_collate():
    x, y = numbered()
    d = collect(DataLoader(TensorDataset(x, y), batch_size=5), 9, seed=4)
    assert d.total == N
    check_random_draw(ids_of(*d.samples.batch), 9)


def test_generator_takes_the_first_samples_and_reads_no_further():
    read = []

    def gen():
        for b in batches_of(4):
            read.append(1)
            yield b

    d = collect(gen(), 10)
    assert d.sampling == "first" and d.total is None
    assert ids_of(*d.samples.batch) == list(range(10))
    assert len(read) == 3  # 3 batches of 4 hold the 10 samples asked for
    assert ids_of(*collect(gen(), 6, sampling="first").samples.batch) == list(range(6))


def test_iterable_dataset_loader_is_a_stream():
    loader = DataLoader(Stream(batches_of(5)), batch_size=None)
    d = collect(loader, 7)
    assert d.sampling == "first" and d.total is None
    assert ids_of(*d.samples.batch) == list(range(7))


@pytest.mark.parametrize("make", [
    lambda: iter(batches_of(4)),
    lambda: DataLoader(Stream(batches_of(4)), batch_size=None),
], ids=["generator", "iterable-dataset"])
def test_random_sampling_of_a_stream_is_refused(make):
    with pytest.raises(errors.ConfigError, match="random access"):
        collect(make(), 10, sampling="random")


# -- seed, sampling and sizes ----------------------------------------------------------------
@pytest.mark.parametrize("form", ["tensors", "dataset", "samples"])
def test_seed_decides_the_random_draw(form):
    x, y = numbered()
    data = {"tensors": (x, y), "dataset": TensorDataset(x, y),
            "samples": [(x[i], int(y[i])) for i in range(N)]}[form]

    def ids(seed):
        return ids_of(*collect(data, 10, seed=seed, sampling="random").samples.batch)

    assert ids(5) == ids(5)
    draws = {tuple(sorted(ids(s))) for s in range(4)}
    assert len(draws) == 4  # different seeds draw different samples
    assert ids_of(*collect(data, 10, seed=5, sampling="first").samples.batch) == list(range(10))
    assert ids_of(*collect(data, 10, seed=6, sampling="first").samples.batch) == list(range(10))


@pytest.mark.parametrize("form", ["tensors", "dataset", "samples", "batches", "generator"])
def test_too_few_samples(form):
    x, y = numbered()
    data = {"tensors": (x, y), "dataset": TensorDataset(x, y),
            "samples": [(x[i], int(y[i])) for i in range(N)], "batches": batches_of(7),
            "generator": iter(batches_of(7))}[form]
    with pytest.raises(errors.DataError, match=f"only {N}"):
        collect(data, 50, minimum=N + 1)


def test_enough_samples_for_the_minimum_pass():
    x, y = numbered()
    assert len(collect((x, y), 50, minimum=N).samples) == N


@pytest.mark.parametrize("make", [
    lambda x, y: (x, y[:-2]),
    lambda x, y: {"inputs": x[:-1], "labels": y},
    lambda x, y: [(x[:10], y[:10]), (x[10:], y[10:-1])],
    lambda x, y: iter([(x[:10], y[:9])]),
], ids=["tuple", "dict", "list-of-batches", "generator"])
def test_tensors_of_a_batch_must_agree_in_batch_size(make):
    x, y = numbered()
    with pytest.raises(errors.DataError, match="first \\(batch\\) dimension"):
        collect(make(x, y), 5)


def test_bad_sampling_and_bad_data_are_refused():
    x, y = numbered()
    with pytest.raises(errors.ConfigError, match="sampling must be one of"):
        collect((x, y), 5, sampling="shuffled")
    with pytest.raises(errors.DataTypeError, match="got int"):
        collect(5, 5)
    with pytest.raises(errors.DataError, match="no batches"):
        collect(iter([]), 5)


# -- structure helpers -----------------------------------------------------------------------
Pair = namedtuple("Pair", ["image", "target"])


def nested(n=N):
    x, y = numbered(n)
    return (
        Pair(x, {"mask": x > 4, "name": "text"}),
        {"labels": y, "extra": [y * 2, None], "scale": 0.5},
    )


def same(a, b):
    """Structural equality of two batches: same containers, equal tensors and leaves."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_leaves_order_and_rebuild_round_trip():
    b = nested()
    ls = leaves(b)
    x, y = numbered()
    assert len(ls) == 4
    assert torch.equal(ls[0], x) and torch.equal(ls[2], y) and torch.equal(ls[3], y * 2)
    assert same(rebuild(b, ls), b)
    doubled = rebuild(b, [t * 2 for t in ls])
    assert isinstance(doubled[0], Pair) and doubled[0].target["name"] == "text"
    assert doubled[1]["extra"][1] is None and doubled[1]["scale"] == 0.5
    assert torch.equal(doubled[1]["labels"], 2 * y)
    assert not same(doubled, b)


def test_map_tensors_keeps_structure_and_other_leaves():
    b = nested()
    out = map_tensors(b, lambda t: t[:3])
    assert isinstance(out, tuple) and isinstance(out[0], Pair)
    assert isinstance(out[1]["extra"], list) and out[1]["extra"][1] is None
    assert out[0].target["name"] == "text" and batch_size(out) == 3
    assert same(out, take(b, slice(0, 3)))
    assert same(take(b, torch.tensor([4, 1])), map_tensors(b, lambda t: t[[4, 1]]))


def test_concat_of_parts_gives_the_batch_back():
    b = nested()
    parts = [take(b, slice(0, 7)), take(b, slice(7, 20)), take(b, slice(20, N))]
    assert same(concat(parts), b)
    assert same(concat(list(Samples(b).chunks(8))), b)
    assert [batch_size(c) for c in Samples(b).chunks(8)] == [8, 8, 8, 6]


def test_concat_refuses_batches_of_different_shapes_or_structure():
    x, y = numbered()
    with pytest.raises(errors.DataError, match="differs in shape"):
        concat([(x[:5], y[:5]), (x[5:, :2], y[5:])])
    with pytest.raises(errors.DataError, match="differ in structure"):
        concat([(x[:5], y[:5]), (x[5:],)])


def test_batch_size_refuses_empty_and_0d():
    with pytest.raises(errors.DataError, match="no tensor"):
        batch_size({"name": "text"})
    with pytest.raises(errors.DataError, match="0-d tensor"):
        batch_size((torch.zeros(3, 2), torch.tensor(1.0)))


# -- known bugs ------------------------------------------------------------------------------
def test_concat_pairs_dict_entries_by_key():
    a = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)}
    b = {"attention_mask": torch.ones(1, 3), "input_ids": torch.zeros(1, 3)}
    out = concat([a, b])
    assert torch.equal(out["input_ids"], torch.zeros(3, 3))
    assert torch.equal(out["attention_mask"], torch.ones(3, 3))


def test_list_of_samples_with_numpy_labels():
    x, y = numbered()
    samples = [(x[i], np.int64(y[i])) for i in range(N)]
    d = collect(samples, 5, sampling="first")
    assert d.total == N
    assert ids_of(*d.samples.batch) == list(range(5))


def test_dataloader_without_automatic_batching():
    x, y = numbered()
    d = collect(DataLoader(TensorDataset(x, y), batch_size=None), 5, sampling="first")
    b = d.samples.batch
    assert len(b) == 2, f"{len(b)} entries in the batch, not (inputs, targets)"
    assert ids_of(*b) == list(range(5))
