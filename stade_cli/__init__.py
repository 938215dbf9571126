"""stade: prune Hugging Face causal language models after training, with no retraining.

Library API (the CLI is a thin layer over these)::

    import stade_cli
    stats = stade_cli.calibrate("path/to/model", "stats/", dataset="wikitext2", nsamples=128)
    report = stade_cli.prune("path/to/model", "out/", metric="stade", sparsity=0.5, stats=stats)
    result = stade_cli.evaluate("out/", dataset="wikitext2")
    summary = stade_cli.inspect("out/")
"""
from __future__ import annotations

from ._version import __version__

__all__ = ["__version__", "calibrate", "prune", "evaluate", "zero_shot", "inspect"]


def __getattr__(name: str):  # lazy: importing the package must not import torch/transformers
    # (no submodule may bear an exported name: importing it would bind the package's attribute to the module)
    if name == "calibrate":
        from .calibration.runner import calibrate

        return calibrate
    if name == "prune":
        from .pruning import prune

        return prune
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name == "zero_shot":
        from .zeroshot import zero_shot

        return zero_shot
    if name == "inspect":
        from .report import inspect

        return inspect
    raise AttributeError(name)
