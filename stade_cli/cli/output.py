"""Where things go: data on stdout, everything else (progress, logs, errors) on stderr."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rich.console import Console

from ..runtime import StderrReporter


@dataclass
class State:
    """Global options, carried in the Typer context."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    reporter: StderrReporter = field(default_factory=StderrReporter)


DEBUG_ENV = "STADE_DEBUG"


def debug_from_env() -> bool:
    import os

    return os.environ.get(DEBUG_ENV) == "1"


def state(ctx, json_out: bool = False, quiet: bool = False) -> State:
    """The global options (set by the app's callback), merged with the same options given after the command."""
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(debug=debug_from_env())
    st = root.obj
    if json_out:
        st.json = True
    if quiet and not st.quiet:
        st.quiet = True
        st.reporter = StderrReporter(quiet=True)
    return st


def stdout_console() -> Console:
    """Tables on stdout; wide enough for full layer names when piped to a file."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit_line(text: str) -> None:
    sys.stdout.write(f"{text}\n")


def error(message: str) -> None:
    """One line on stderr (markup in the message is printed literally)."""
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "bold red"), f" {message}"))
