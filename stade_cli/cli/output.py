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
