"""On the real SmolLM2-135M checkpoint (../shared/assets/smollm2.sh): Wanda must beat magnitude by far."""
import json

import pytest
from typer.testing import CliRunner

from stade_cli.cli.app import app
from conftest import AUSTEN, SMOLLM2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(), reason="SmolLM2 asset absent (shared/assets/smollm2.sh)"),
    pytest.mark.skipif(not (AUSTEN / "prideprejudice.txt").is_file(), reason="Austen texts absent"),
]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_wanda_far_better_than_magnitude(tmp_path):
    calib = ",".join(str(AUSTEN / f) for f in ("emma.txt", "mansfieldpark.txt", "sensesensibility.txt"))
    stats = tmp_path / "stats"
    run("calibrate", SMOLLM2, "-o", stats, "--dataset", calib, "--nsamples", 32, "--seqlen", 512)
    ppl = {}
    for metric in ("magnitude", "wanda"):
        out = tmp_path / metric
        run("prune", SMOLLM2, "--metric", metric, "--sparsity", 0.5, "--stats", stats, "-o", out)
        ppl[metric] = json.loads(run("eval", out, "--dataset", AUSTEN / "prideprejudice.txt", "--seqlen", 512,
                                     "--max-windows", 8, "--json"))["ppl"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl
    assert ppl["wanda"] < 80, ppl
