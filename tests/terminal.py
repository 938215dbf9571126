"""Run a command on a pseudo-terminal of a given size and read the screen a person would see (pyte renders the
escape codes), so tests assert on what is shown, not on what was written to a pipe."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass


@dataclass
class Screen:
    returncode: int
    lines: list[str]          # every line the command printed, in order, as rendered (trailing spaces cut)
    visible: list[str]        # the last screen: what the terminal shows when the command ends

    def first(self, rows: int) -> str:
        return "\n".join(self.lines[:rows])


def screen(args: list[str], columns: int, rows: int, env: dict | None = None, timeout: float = 1800) -> Screen:
    """``python -m stade_cli ARGS`` with stdin, stdout and stderr on a ``columns`` × ``rows`` terminal."""
    import pyte

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("COLUMNS", "LINES")}
    environ["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "stade_cli", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, env=environ, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:               # EIO: the command ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout=timeout)
    raw = b"".join(chunks).decode("utf-8", "replace")
    whole = pyte.Screen(columns, max(rows, raw.count("\n") + rows))   # tall: nothing scrolls away
    pyte.Stream(whole).feed(raw)
    shown = pyte.Screen(columns, rows)
    pyte.Stream(shown).feed(raw)
    lines = [line.rstrip() for line in whole.display]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(code, lines, [line.rstrip() for line in shown.display])
