"""The pruning methods: one file each in this package, found without a list (see ``base.py``).

Adding a method is one new file here with a function decorated by ``@scorer``, ``@solver`` or ``@update`` (and its
own options dataclass and ``validate``), plus its test; nothing else changes. A package of your own can
add methods too, through the ``stade.methods`` entry-point group.
"""
from __future__ import annotations

from collections.abc import Mapping

from .base import (SCORER, SOLVER, UPDATE, LayerContext, LayerStats, Metric, MethodError, NoOptions, OptionSpec,
                   build_options, flat_options, get_metric, get_update, methods, metrics, option_specs, scorer,
                   solver, update, updates)

__all__ = ["REGISTRY", "SCORER", "SOLVER", "UPDATE", "LayerContext", "LayerStats", "Metric", "MethodError",
           "NoOptions", "OptionSpec", "build_options", "flat_options", "get_metric", "get_update", "methods",
           "metrics", "option_specs", "scorer", "solver", "update", "updates"]


class _Registry(Mapping):
    """name → Metric, every method found (read-only; the files are imported on first use)."""

    def __getitem__(self, name: str) -> Metric:
        return methods()[name]

    def __iter__(self):
        return iter(methods())

    def __len__(self) -> int:
        return len(methods())


REGISTRY = _Registry()
