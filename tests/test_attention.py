"""The refinement's grouped causal attention (``attention.py``) against slow references and sdpa itself."""
from __future__ import annotations

import pytest
import torch

from stade_cli import attention
from stade_cli.attention import causal_attention, faster, grouped_causal

# transformers' attention registry and its sdpa function (≥ 4.48): before it, blocks keep their own attention
registry = pytest.mark.skipif(not attention._registered(), reason="transformers < 4.48 has no attention registry")


def _slow(query, key, value, scale):
    """Head by head, position by position: query head h reads key/value head h // (H / KV); position i attends
    to positions 0..i."""
    b, h, t, d = query.shape
    g = h // key.shape[1]
    out = torch.zeros(b, h, t, value.shape[-1], dtype=torch.float64)
    for n in range(b):
        for head in range(h):
            k, v = key[n, head // g].double(), value[n, head // g].double()
            for i in range(t):
                s = (k[: i + 1] @ query[n, head, i].double()) * scale
                w = torch.exp(s - s.max())
                out[n, head, i] = (w / w.sum()) @ v[: i + 1]
    return out


@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4), (3, 1)])
def test_grouped_causal_is_causal_attention_with_shared_key_value_heads(heads, groups):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 7, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, groups, 7, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, groups, 7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(grouped_causal(q, k, v, 0.37), _slow(q, k, v, 0.37), rtol=1e-12, atol=1e-12)


class _Module:
    num_key_value_groups = 3
    is_causal = True


def _qkv(b=2, h=6, kv=2, t=16, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, kv, t, d, generator=g),
            torch.randn(b, kv, t, d, generator=g))


@registry
def test_causal_attention_matches_sdpa_under_bfloat16_autocast():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, none = causal_attention(_Module(), q, k, v, None, scaling=0.3)
        theirs, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.3)
    assert none is None and ours.shape == theirs.shape == (2, 16, 6, 8) and ours.is_contiguous()
    exact = _slow(q, k, v, 0.3).transpose(1, 2)
    # both in bfloat16 products: each within bfloat16's rounding of the exact attention
    assert float((ours.double() - exact).norm() / exact.norm()) < 1e-2
    assert float((theirs.double() - exact).norm() / exact.norm()) < 1e-2


@registry
@pytest.mark.parametrize("case", ["float32", "mask", "not causal", "dropout", "one query", "longer keys", "too large"])
def test_causal_attention_hands_every_other_case_to_sdpa(monkeypatch, case):
    """Outside the causal, unmasked, bfloat16 case on the CPU the call is sdpa's, with the same arguments."""
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append((a, kw)) or ("sdpa", None))
    q, k, v = _qkv()
    mask, kwargs = None, {}
    if case == "mask":
        mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    elif case == "not causal":
        kwargs["is_causal"] = False
    elif case == "dropout":
        kwargs["dropout"] = 0.1
    elif case == "one query":
        q = q[:, :, :1]
    elif case == "longer keys":
        q = q[:, :, :8]
    elif case == "too large":
        monkeypatch.setattr(attention, "LARGEST", 2 * 6 * 16 * 16 - 1)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case != "float32" else torch.no_grad()
    with context:
        out = causal_attention(_Module(), q, k, v, mask, **kwargs)
    assert out == ("sdpa", None) and len(calls) == 1 and calls[0][0][1] is q and calls[0][0][4] is mask


def _tiny_block(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    return model, model.model.layers[0]


def _block_pass(model, block, x):
    positions = torch.arange(x.shape[1])[None]
    rope = model.model.rotary_emb(x, positions)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, attention_mask=None, position_ids=positions, position_embeddings=rope)
    return (out[0] if isinstance(out, tuple) else out).float()


@registry
def test_faster_switches_a_block_that_agrees_and_puts_the_setting_back():
    model, block = _tiny_block()
    x = torch.randn(2, 12, 48, generator=torch.Generator().manual_seed(2))
    before = _block_pass(model, block, x)
    seen = []
    with faster(block, lambda: _block_pass(model, block, x), torch.bfloat16, torch.device("cpu")) as on:
        seen.append(model.config._attn_implementation)
        during = _block_pass(model, block, x)
    assert on and seen == [attention.NAME] and model.config._attn_implementation == "sdpa"
    assert float((during - before).norm() / before.norm()) < attention.AGREE
    assert not torch.equal(during, before)          # it did run the other function


def test_faster_keeps_sdpa_where_the_function_disagrees(monkeypatch):
    model, block = _tiny_block()
    x = torch.randn(2, 12, 48, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(attention, "grouped_causal", lambda q, k, v, scale: torch.zeros_like(q))   # a wrong one
    with faster(block, lambda: _block_pass(model, block, x), torch.bfloat16, torch.device("cpu")) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("products,device", [(torch.float32, "cpu"), (torch.bfloat16, "meta")])
def test_faster_is_off_for_float32_products_and_off_the_cpu(products, device):
    model, block = _tiny_block()
    probes = []
    with faster(block, lambda: probes.append(1), products, torch.device(device)) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    assert probes == []


def test_faster_puts_the_setting_back_after_an_error():
    model, block = _tiny_block()
    x = torch.randn(1, 8, 48)
    with pytest.raises(KeyboardInterrupt):
        with faster(block, lambda: _block_pass(model, block, x), torch.bfloat16, torch.device("cpu")):
            raise KeyboardInterrupt
    assert model.config._attn_implementation == "sdpa"


def test_faster_keeps_sdpa_for_a_block_that_never_calls_the_function():
    """A block whose config says sdpa but whose code does not dispatch through transformers' registry: the probe
    sees no call of causal_attention, so the block keeps its own attention."""

    class Config:
        _attn_implementation = "sdpa"
        sub_configs: dict = {}

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    block = Block()
    x = torch.randn(2, 4)
    with faster(block, lambda: block(x), torch.bfloat16, torch.device("cpu")) as on:
        assert not on and block.config._attn_implementation == "sdpa"
    assert block.config._attn_implementation == "sdpa"
