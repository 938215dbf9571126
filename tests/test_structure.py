"""The shape of the code: no import cycle anywhere in stade_cli (lazy imports inside functions count too),
every module imports on its own, the CLI starts without importing torch, and a method comes from one file."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stade_cli"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str], source: str | None = None) -> set[str]:
    """The stade_cli modules that ``name`` imports, anywhere in its body (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod; `from pkg import name` on pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:          # `from .x import y`: y may be a name, not a module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    # the old layout's pattern: a package __init__ importing the submodule that imports names from it
    src = {"pkg": "from . import sub\n", "pkg.sub": "from . import helper_name\n"}
    known = set(src)
    graph = {n: imports(n, Path(f"/x/{n.replace('.', '/')}{'/__init__' if n == 'pkg' else ''}.py"), known, src[n])
             for n in src}
    assert find_cycle(graph) == ["pkg", "pkg.sub", "pkg"]


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert "stade_cli.pruning" in graph and graph["stade_cli.cli.app"] >= {"stade_cli.cli.prune", "stade_cli.cli.calibrate"}


def test_command_modules_do_not_import_the_app():
    mods = modules()
    for name in ("calibrate", "prune", "eval", "inspect", "demo"):
        full = f"stade_cli.cli.{name}"
        assert "stade_cli.cli.app" not in imports(full, mods[full], set(mods)), full


@pytest.mark.parametrize("name", sorted(set(modules()) - {"stade_cli.__main__"}))   # that one runs the CLI
def test_every_module_imports_alone(name):
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_starts_without_importing_torch():
    """`stade --help` and the other commands' parsing do not import torch; `stade prune --help-method NAME`
    lists a method's options, from the registry."""
    code = ("import sys; from stade_cli.cli.app import app; app(args=['--help'], prog_name='stade', "
            "standalone_mode=False); print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["False", "False"], proc.stdout
    assert "prune" in proc.stdout and "Score every target linear" in proc.stdout
    for method, flag in (("ria", "--ria-alpha"), ("sparsegpt", "--percdamp"), ("dsnot", "--dsnot-cycles"),
                         ("r2dsnot", "--r2-gamma2")):
        help_text = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "--help-method", method],
                                   capture_output=True, text=True, timeout=120,
                                   env={**os.environ, "COLUMNS": "200"}).stdout
        assert flag in help_text, flag
