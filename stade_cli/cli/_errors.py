"""One table from exceptions to what the user sees: one line on stderr and an exit code.

Known failures (``StadeError``) carry their message and code; a method's error (``MethodError``) is
rendered with the command line's flag names; interrupts unwind to 130 / 128 + signal; anything else is
still one line, with the traceback only under ``--debug`` / ``STADE_DEBUG=1``.
"""
from __future__ import annotations

from typing import Callable

import typer

from ..errors import Interrupted, MethodError, StadeError, signal_received
from .options import cli_flag
from .output import error, launched_world

# click's UsageError, whether typer uses click itself or its own vendored copy
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

INTERRUPTED = ("no partial output is left, and the output path holds what it held before "
               "(unless the new output was complete)")


def _interrupted(exc: Interrupted) -> str:
    line = f"interrupted by {exc.name}: {INTERRUPTED}"
    world = launched_world()
    if exc.name == "SIGTERM" and world is not None and world.several:
        # torchrun / accelerate stop the other ranks with SIGTERM when one fails: say where the cause is told
        line += " (a launcher stops every rank this way when one of them fails: its report names which)"
    return line


_GLOBAL_ONLY = ("--debug", "--version")        # options of `stade` itself, not of its commands


def _usage(exc) -> str:
    ctx = exc.ctx
    command = f"stade {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "stade --help"
    option = getattr(exc, "option_name", None)
    if option in _GLOBAL_ONLY and ctx is not None and ctx.parent is not None:
        return (f"{exc.format_message()} after the command: {option} is an option of stade itself "
                f"(`stade {option} {ctx.info_name} ...`)")
    return f"{exc.format_message()} (see `{command}`)"


def _method(exc: MethodError) -> str:
    message, hint = exc.render(cli_flag)
    return f"{message} ({hint})" if hint else message


def _unexpected(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first} (set STADE_DEBUG=1 for the traceback)"


# (exception type, exit code, the line, shown as is even with --debug)
TABLE: list[tuple[type, Callable[[BaseException], int], Callable[[BaseException], str], bool]] = [
    (KeyboardInterrupt, lambda e: 130, lambda e: f"interrupted: {INTERRUPTED}", True),
    (Interrupted, lambda e: e.exit_code, _interrupted, True),
    (UsageError, lambda e: e.exit_code, _usage, True),
    (MethodError, lambda e: 2, _method, False),          # before StadeError: it is one, with flags to name
    (StadeError, lambda e: e.exit_code, str, False),
    (MemoryError, lambda e: 1, lambda e: "out of memory; try a smaller --batch-size, --nsamples or --seqlen", False),
    (Exception, lambda e: 1, _unexpected, False),
]


def report(exc: BaseException, debug: bool) -> int:
    """Print the line for ``exc`` and return its exit code; with ``debug``, raise it again (traceback).

    After a stop signal, whatever error the unwinding met is reported as the interrupt it is."""
    got = signal_received()
    if got is not None and not isinstance(exc, (KeyboardInterrupt, Interrupted)):
        import signal

        exc = KeyboardInterrupt() if got == signal.SIGINT else Interrupted(got)
    for kind, code, line, always in TABLE:
        if isinstance(exc, kind):
            if debug and not always:
                raise exc
            if not (isinstance(exc, UsageError) and not exc.format_message()):   # bare `stade`: the help said it
                error(line(exc))
            return code(exc)
    raise exc
