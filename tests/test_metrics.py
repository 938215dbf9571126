"""Each metric on hand-computed tensors."""
import math

import pytest
import torch

from stade_cli.calibration.moments import Moments
from stade_cli.errors import UsageError
from stade_cli.metrics import REGISTRY, get_metric

# two input channels over N = 4 tokens: x0 = [1, 1, 1, 1] (mean 1, std 0), x1 = [0, 2, 0, 2] (mean 1, std 1)
X = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0], [1.0, 2.0]])
W = torch.tensor([[3.0, -2.0], [-1.0, 0.5]])


def test_magnitude():
    assert torch.equal(get_metric("magnitude").score(W, None), W.abs())


def test_wanda_by_hand():
    # ‖x0‖ = 2, ‖x1‖ = sqrt(8)
    expected = torch.tensor([[3 * 2, 2 * math.sqrt(8)], [1 * 2, 0.5 * math.sqrt(8)]])
    assert torch.allclose(get_metric("wanda").score(W, Moments.of(X)), expected)


def test_stade_by_hand():
    # std(x0) = 0, std(x1) = 1: the constant channel scores zero whatever its weight
    expected = torch.tensor([[0.0, 2.0], [0.0, 0.5]])
    assert torch.allclose(get_metric("stade").score(W, Moments.of(X)), expected)


def test_stade_and_wanda_pick_differently():
    # Wanda keeps the large-weight constant channel; STADE keeps the varying one
    m = Moments.of(X)
    w = torch.tensor([[3.0, 2.0]])
    from stade_cli.masks import Unstructured

    assert Unstructured(0.5).mask(get_metric("wanda").score(w, m)).tolist() == [[False, True]]
    assert Unstructured(0.5).mask(get_metric("stade").score(w, m)).tolist() == [[True, False]]


def test_registry_and_unknown_metric():
    assert {"magnitude", "wanda", "stade"} <= set(REGISTRY)
    with pytest.raises(UsageError, match="magnitude"):
        get_metric("nope")
