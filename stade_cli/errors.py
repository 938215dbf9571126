"""One exception hierarchy. Every error a user can cause carries a one-line message and an exit code.

The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``; the library raises them.
"""
from __future__ import annotations

from typing import Callable


class StadeError(Exception):
    """Base class: a known failure with a user-facing message (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line: message plus what to do
        return f"{self.message} ({self.hint})" if self.hint else self.message


def as_percent(value: float, name: str = "") -> str | None:
    """For a share given as a percentage by mistake (1 < value < 100): ``"70% is 0.7"`` (``name`` before the
    fraction: ``"70% is --sparsity 0.7"``); else None."""
    return f"{value:g}% is {name + ' ' if name else ''}{value / 100:g}" if 1 < value < 100 else None


class UsageError(StadeError):
    """Options that contradict each other or are out of range (exit code 2)."""

    exit_code = 2


class MethodError(UsageError, ValueError):
    """An option or the data do not allow a method (or a pattern) to run: exit code 2. ``{name}`` in the
    text stands for the option ``name``; ``render(flag)`` spells it (the CLI: ``--name``), ``str()`` plainly.
    Math raises it without knowing the command line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.template, self.hint_template = message, hint

    def render(self, flag: Callable[[str], str]) -> tuple[str, str | None]:
        names = _Names(flag)
        return self.template.format_map(names), (self.hint_template.format_map(names) if self.hint_template else None)

    def __str__(self) -> str:
        message, hint = self.render(lambda name: name)
        return f"{message} ({hint})" if hint else message


class _Names(dict):
    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def __missing__(self, key):
        return self.flag(key)


class ModelError(StadeError):
    """MODEL cannot be found, read or used."""


class StatsError(StadeError):
    """A STATS directory is missing, malformed or made for another model."""


class DataError(StadeError):
    """Calibration or evaluation text cannot be loaded or is too short."""


class OutputError(StadeError):
    """The output directory cannot be written."""


class DeviceError(StadeError):
    """The requested device is not available."""


_RECEIVED: list[int] = []      # the signals that asked this process to stop, first first (set by the CLI's handlers)


def note_signal(signum: int) -> None:
    """Record that the process was asked to stop; see ``signal_received``."""
    _RECEIVED.append(signum)


def signal_received() -> int | None:
    """The first stop signal this process received, if any. The exception a handler raises can surface inside
    a library's C code, which may turn it into another error (torch: "could not determine the shape of
    object type ..."): the record, not the exception, says the run was interrupted."""
    return _RECEIVED[0] if _RECEIVED else None


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised where the process is so that it unwinds like Ctrl-C (exit 128 + signal).

    A BaseException, like KeyboardInterrupt: ``except Exception`` does not swallow it, ``finally`` runs.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}   # a value type, in words


def check_types(function, values: dict, skip: tuple[str, ...] = ()) -> None:
    """Refuse, naming the argument, a value of the wrong Python type for an argument of ``function`` whose
    annotation is made of bool, int, float, str and None only (``sparsity="0.5"``, ``nsamples=2.5``), before it
    reaches the maths as a bare TypeError. An int is a float; a bool is neither a number nor text."""
    import typing

    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - annotations that cannot be resolved here: nothing to check against
        return
    for name, value in values.items():
        hint = hints.get(name)
        if name in skip or hint is None or value is None:
            continue
        kinds = set(typing.get_args(hint)) - {type(None)} if typing.get_args(hint) else {hint}
        if not kinds or not kinds <= set(KINDS):
            continue
        if isinstance(value, bool):
            ok = bool in kinds
        elif isinstance(value, int):
            ok = bool(kinds & {int, float})
        else:
            ok = isinstance(value, float) and float in kinds or isinstance(value, str) and str in kinds
        if not ok:
            raise UsageError(f"{name} must be {' or '.join(KINDS[k] for k in KINDS if k in kinds)} "
                             f"(got {value!r} of type {type(value).__name__})")
