"""The ``stade`` console script: torch is bound lazily (imported on first use), so that building the CLI
from the method registry, ``--help`` and ``--version`` stay fast; then ``app.main``."""
from __future__ import annotations

import importlib.util
import sys


def _lazy(name: str) -> None:
    """Bind ``name`` in sys.modules to a module that is executed on first attribute access."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> None:
    _lazy("torch")
    from .app import main as run

    run(argv)
