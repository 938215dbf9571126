"""The stade command with one more method, ``slowsolve``: a solver that takes ten minutes a layer, as sparsegpt
does at 70B width (for tests/test_interrupts.py). It creates the file STADE_TEST_READY when it starts a layer.
"""
import os
import sys
import time
from pathlib import Path

from stade_cli.metrics.base import solver


@solver("slowsolve", "a solver that takes ten minutes a layer (tests only)")
def solve(weight, stats, pattern, ctx):
    Path(os.environ["STADE_TEST_READY"]).write_text(str(os.getpid()))
    end = time.monotonic() + 600
    while time.monotonic() < end:      # busy in its own thread, as a long matrix loop would be
        time.sleep(0.01)
    return weight, pattern.mask(weight.abs())


from stade_cli.cli.app import main  # noqa: E402

main(sys.argv[1:])
