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
    if other_rank():
        quiet = True
    if quiet and not st.quiet:
        st.quiet = True
        st.reporter = StderrReporter(quiet=True)
    return st


def stdout_console() -> Console:
    """Tables on stdout; wide enough for full layer names when piped to a file."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def help_console() -> Console:
    """Help text, recorded to be printed once without trailing spaces: as wide as ``--help`` (the terminal, or
    COLUMNS, or 80 columns where stdout is not a terminal)."""
    import os
    import shutil

    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else (
        shutil.get_terminal_size().columns if sys.stdout.isatty() else 80)
    return Console(file=open(os.devnull, "w"), width=width, record=True, highlight=False)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit_line(text: str) -> None:
    sys.stdout.write(f"{text}\n")


def error(message: str) -> None:
    """One line on stderr (markup in the message is printed literally); under a launcher it names the rank."""
    from rich.text import Text

    world = launched_world()
    where = f"rank {world.rank}: " if world is not None and world.several else ""
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "bold red"), f" {where}{message}"))


def launched_world():
    """The launcher's ``World`` (``distributed.launched``), or None where its environment is malformed: that is
    itself what an error line may be reporting."""
    from ..distributed import launched

    try:
        return launched()
    except Exception:  # noqa: BLE001 - a malformed environment: no launcher to speak of
        return None


def other_rank() -> bool:
    """Launched by torchrun/accelerate as a rank other than 0: it prints nothing on stdout and no progress."""
    from ..distributed import launched

    return not launched().main
