"""docs/extending.md's examples run as written: a method, a prunable layer type, an
operation's MAC formula and a task, each added through the public registries."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import flop_registry

import falcon_prune as fp
from falcon_prune.analysis import macs, prunable
from falcon_prune.methods import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def blocks() -> list[str]:
    """The document's python code blocks, in order."""
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def registries():
    """Every registry the examples add to, restored afterwards."""
    targets = (registry._REGISTRY, prunable.PRUNABLE, macs.MAC_FORMULAS, macs.LOOKUPS,
               flop_registry)
    saved = [target.copy() for target in targets]
    yield
    for target, before in zip(targets, saved, strict=True):
        target.clear()
        target.update(before)


def test_the_document_has_an_example_of_each_extension():
    text = "\n".join(blocks())
    for call in ("fp.register_method(", "fp.register_prunable(", "fp.register_macs(",
                 "fp.Task("):
        assert call in text, call


def test_the_examples_run(registries):
    namespace: dict = {}
    for code in blocks():
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102
    assert "fisher_flops" in fp.METHODS
    assert torch.ops.aten.mv in macs.MAC_FORMULAS


def test_the_registries_are_restored_after_the_examples():
    assert "fisher_flops" not in fp.METHODS
    assert torch.ops.aten.mv not in macs.MAC_FORMULAS
