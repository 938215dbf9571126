"""The stade command with one more method, ``slowsolve``: a solver that takes ten minutes a layer, as sparsegpt
does at 70B width (for tests/test_interrupts.py). It creates the file STADE_TEST_READY when it starts a layer.

With STADE_TEST_MASK=1 the interrupt is turned into another error where it surfaces, as C code does when a signal
arrives inside it (torch: "could not determine the shape of object type ...").
"""
import os
import sys
import time
from pathlib import Path

from stade_cli.metrics.base import solver

MASK = os.environ.get("STADE_TEST_MASK") == "1"
MASKED = "could not determine the shape of object type 'torch.storage.UntypedStorage'"

if MASK:
    import concurrent.futures

    _result = concurrent.futures.Future.result

    def _masking_result(self, timeout=None):
        try:
            return _result(self, timeout)
        except BaseException as exc:
            raise TypeError(MASKED) from exc

    concurrent.futures.Future.result = _masking_result


@solver("slowsolve", "a solver that takes ten minutes a layer (tests only)")
def solve(weight, stats, pattern, ctx):
    Path(os.environ["STADE_TEST_READY"]).write_text(str(os.getpid()))
    end = time.monotonic() + 600
    try:
        while time.monotonic() < end:      # busy in its own thread, as a long matrix loop would be
            time.sleep(0.01)
    except BaseException as exc:
        if MASK:
            raise TypeError(MASKED) from exc
        raise
    return weight, pattern.mask(weight.abs())


from stade_cli.cli.app import main  # noqa: E402

main(sys.argv[1:])
