"""The method registry: methods found without a list, options owned by their method, errors in flag words."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.masks import NM, Unstructured
from stade_cli.cli.options import cli_flag
from stade_cli.metrics import metrics, updates, MethodError, build_options, flat_options, get_metric, methods, option_specs, sparsegpt

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "stade_cli" / "metrics"


def test_every_method_file_registers_itself():
    files = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    assert files <= set(methods())
    assert list(methods()) == ["magnitude", "wanda", "stade", "stadew", "ria", "stochria", "sparsegpt", "dsnot",
                               "r2dsnot", "admm"]
    assert {m.kind for m in methods().values()} == {"scorer", "solver", "update"}
    assert methods()["sparsegpt"].kind == "solver" and methods()["wanda"].kind == "scorer"
    assert list(updates()) == ["admm"] and "admm" not in metrics() and set(metrics()) | set(updates()) == set(methods())


def test_options_belong_to_their_methods():
    specs = option_specs()
    assert list(specs) == ["ria_alpha", "stoch_beta", "seed", "percdamp", "blocksize", "init", "dsnot_pow",
                           "dsnot_threshold", "dsnot_cycles", "r2_gamma1", "r2_gamma2", "admm_iterations", "admm_rho",
                           "admm_damp", "admm_gradual", "admm_gradual_steps", "admm_precision"]
    assert specs["ria_alpha"].users == ("ria", "stochria") and specs["init"].users == ("dsnot", "r2dsnot")
    assert specs["blocksize"].type is int and specs["blocksize"].default == 128
    opts = build_options({"ria_alpha": 2.0, "blocksize": 64}, seed=7)
    assert opts["ria"].ria_alpha == 2.0 and opts["stochria"].ria_alpha == 2.0 and opts["stochria"].seed == 7
    assert opts["sparsegpt"].blocksize == 64 and opts["sparsegpt"].percdamp == 0.01
    # the report keeps every option once, in the order it always had
    assert list(flat_options(opts)) == list(specs)
    with pytest.raises(MethodError, match="unknown method option 'ria_alfa'"):
        build_options({"ria_alfa": 1.0})


def test_validation_speaks_in_flags_only_where_flags_are_known():
    with pytest.raises(MethodError) as info:
        sparsegpt.validate(sparsegpt.Options(blocksize=6), NM(2, 4))
    assert str(info.value) == "blocksize 6 must be a multiple of M = 4 for 2:4"            # the library's words
    assert info.value.render(cli_flag)[0] == "--blocksize 6 must be a multiple of M = 4 for 2:4"
    sparsegpt.validate(sparsegpt.Options(blocksize=6), Unstructured(0.5))              # fine unstructured
    result = runner.invoke(app, ["prune", "nowhere", "-o", "o", "--metric", "sparsegpt", "--pattern", "2:4",
                                 "--blocksize", "6"])
    assert result.exit_code == 2 and result.stderr.strip() == \
        "error: --blocksize 6 must be a multiple of M = 4 for 2:4"


def test_a_solver_error_from_the_math_is_rendered_by_the_cli():
    w = torch.randn(4, 8)
    from stade_cli.calibration.moments import Moments
    from stade_cli.metrics import LayerStats

    bad = torch.full((8, 8), float("nan"), dtype=torch.float64)
    with pytest.raises(MethodError) as info:
        get_metric("sparsegpt").solve(w, LayerStats(Moments.of(torch.randn(5, 8).double()), bad), Unstructured(0.5))
    assert "raise percdamp" in str(info.value)
    assert "raise --percdamp" in info.value.render(cli_flag)[1]


def test_a_method_from_another_package_joins_through_an_entry_point(tiny_llama, tmp_path):
    """A user's package adds a method through the `stade.methods` entry-point group: one file, no edit here."""
    site = tmp_path / "site"
    (site / "my_methods").mkdir(parents=True)
    (site / "my_methods" / "__init__.py").write_text("")
    (site / "my_methods" / "squared.py").write_text(
        "from dataclasses import dataclass, field\n"
        "from stade_cli.metrics import scorer, MethodError\n\n\n"
        "@dataclass(frozen=True)\n"
        "class Options:\n"
        "    squared_power: float = field(default=2.0, metadata={'help': 'squared: the power of |W|.'})\n\n\n"
        "def validate(options, pattern=None):\n"
        "    if options.squared_power <= 0:\n"
        "        raise MethodError('{squared_power} must be positive')\n\n\n"
        "@scorer('squared', '|W|^p', options=Options, validate=validate, needs_stats=False)\n"
        "def score(weight, moments, ctx):\n"
        "    return weight.abs().pow(ctx.options.squared_power)\n")
    dist = site / "my_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stade.methods]\nsquared = my_methods.squared\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "stade_cli", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=300)
    shown = run("prune", "--help")
    assert "squared" in shown.stdout and "squared" in shown.stdout.split("--help-method")[1]   # named, and how to see
    options = run("prune", "--help-method", "squared")
    assert options.returncode == 0 and options.stdout.startswith("squared: |W|^p") and "--squared-power" in options.stdout
    bad = run("prune", tiny_llama, "--metric", "squared", "--squared-power", "-1", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "--squared-power must be positive" in bad.stderr
    ok = run("prune", tiny_llama, "--metric", "squared", "--squared-power", "3", "-o", tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "out" / "stade_report.json").read_text())
    assert report["method"] == "squared" and report["options"]["squared_power"] == 3.0
    assert abs(report["overall"]["sparsity"] - 0.5) < 1e-6
