"""Stop when told to, at any width: SIGTERM, SIGINT or SIGHUP end a prune whose layers take ten minutes each
(a solver slow by construction, ``_slow_solver.py``) at once, on a worker thread (one-shot) or on the main one
(``--sequential``), with nothing left behind. A process that waited for the layer would outlive the deadline."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DEADLINE = 120      # seconds for the whole run after the signal; the layer it interrupts takes 600


@pytest.mark.parametrize("mode,sig,code", [("one-shot", signal.SIGTERM, 143), ("one-shot", signal.SIGINT, 130),
                                           ("sequential", signal.SIGTERM, 143), ("one-shot", signal.SIGHUP, 129),
                                           ("one-shot-masked", signal.SIGINT, 130),
                                           ("sequential-masked", signal.SIGTERM, 143)])
def test_a_signal_ends_a_prune_in_the_middle_of_a_slow_layer(tiny_llama, tmp_path, mode, sig, code):
    ready, out = tmp_path / "ready", tmp_path / "out"
    args = [sys.executable, str(HERE / "_slow_solver.py"), "prune", str(tiny_llama), "--metric", "slowsolve",
            "--sparsity", "0.5", "-o", str(out), "--dataset", "builtin", "--nsamples", "2", "--seqlen", "16"]
    if mode.startswith("sequential"):
        args.append("--sequential")
    env = {**os.environ, "STADE_TEST_READY": str(ready), "HF_HUB_OFFLINE": "1",
           "STADE_TEST_MASK": "1" if mode.endswith("masked") else "0"}   # the interrupt surfaces as another error
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ready.exists():                     # the event: a layer's solve has started
            assert proc.poll() is None, proc.communicate()
            ready.parent.stat()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]       # no output, staging or lock left
