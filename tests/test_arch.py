"""Blocks and target linears are found generically for every supported layout."""
import pytest
from transformers import AutoConfig

from stade_cli.arch import context_length, describe, meta_model
from conftest import TINY

EXPECTED_PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "gemma3": 7, "opt": 6}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_blocks_and_targets(arch, tiny_factory):
    path = tiny_factory(arch)
    a = describe(meta_model(AutoConfig.from_pretrained(path)))
    assert len(a.blocks) == len({t.block for t in a.targets.values()})
    assert len(a.targets) == len(a.blocks) * EXPECTED_PER_BLOCK[arch]
    assert all(".layers." in name for name in a.targets)
    assert not any("lm_head" in name or "embed" in name for name in a.targets)
    assert {t.block for t in a.targets.values()} == set(range(len(a.blocks)))


def test_only_and_skip(tiny_llama):
    model = meta_model(AutoConfig.from_pretrained(tiny_llama))
    assert set(describe(model, only=r"\.mlp\.").targets) == {
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    assert all(not n.startswith("model.layers.0.") for n in describe(model, skip=r"layers\.0\.").targets)


def test_context_length(tiny_llama):
    assert context_length(AutoConfig.from_pretrained(tiny_llama)) == 256
