"""Streaming moments equal a direct computation, merge across batches, and never overflow."""
import torch

from stade_cli.calibration.moments import Moments


def test_streaming_equals_direct():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 8, generator=g) * 3 + 1 for _ in range(4)]
    m = Moments.zeros(8)
    for b in batches:
        m.update(b)
    x = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    assert m.count == x.shape[0]
    assert torch.allclose(m.sum, x.sum(0))
    assert torch.allclose(m.sumsq, (x * x).sum(0))
    assert torch.allclose(m.mean, x.mean(0))
    assert torch.allclose(m.std, x.std(0, unbiased=False))
    assert torch.allclose(m.norm, x.norm(dim=0))


def test_merge_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 4, generator=g), torch.randn(7, 4, generator=g)
    merged = Moments.of(a).merge(Moments.of(b))
    whole = Moments.of(torch.cat([a, b]))
    assert merged.count == whole.count
    assert torch.allclose(merged.sum, whole.sum) and torch.allclose(merged.sumsq, whole.sumsq)


def test_float16_near_max_does_not_overflow():
    x = torch.full((64, 4), 60000.0, dtype=torch.float16)
    m = Moments.of(x)
    assert torch.isfinite(m.sumsq).all()
    assert torch.allclose(m.sumsq, torch.full((4,), 64 * 60000.0**2, dtype=torch.float64))
    assert torch.allclose(m.std, torch.zeros(4, dtype=torch.float64))


def test_variance_clamped_at_zero():
    m = Moments(3, torch.tensor([3.0], dtype=torch.float64), torch.tensor([2.9999999], dtype=torch.float64))
    assert m.var.item() == 0.0
