"""`stade sweep` and the plots: the entry grammar by hand, a sweep equal to prune + eval cell by cell, its output
owned like every other, and PNGs that never overwrite a user's picture."""
import json
import sys

import pytest
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.errors import UsageError
from stade_cli.sweep import cell_specs, markdown, parse_entry, prune_kwargs, split_entries

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def test_entries_cells_and_options_by_hand():
    assert split_entries("wanda,stade:bias_correction=false,layer_sparsity=owl,ria") == [
        "wanda", "stade:bias_correction=false,layer_sparsity=owl", "ria"]
    assert parse_entry("dsnot:init=stade,dsnot_threshold=0.05,bias_correction=false") == (
        "dsnot", {"init": "stade", "dsnot_threshold": 0.05, "bias_correction": False})
    assert prune_kwargs({"init": "stade", "dsnot_threshold": 0.05, "bias_correction": False}, seed=3) == {
        "bias_correction": False, "options": {"seed": 3, "init": "stade", "dsnot_threshold": 0.05}}
    assert prune_kwargs({"layer_sparsity": "owl"}, seed=0) == {"layer_sparsity": "owl"}


def test_a_recipe_entry_keeps_what_it_spells_out_even_at_prunes_default():
    """``wanda:recipe=best,refine_lr=0.001``: 0.001 is prune()'s own default, so a call that only compares with the
    defaults cannot tell it was asked for; the entry says so with ``given``, and the recipe's own rate stays out."""
    import inspect

    from stade_cli.pruning import prune
    from stade_cli.recipes import RECIPES, apply_to_call

    assert dict(RECIPES["best"].values)["refine_lr"] != 0.001
    kw = prune_kwargs({"recipe": "best", "refine_lr": 0.001, "admm_gradual": False}, seed=0)
    assert kw["given"] == {"metric", "refine_lr", "admm_gradual"}
    defaults = {k: p.default for k, p in inspect.signature(prune).parameters.items()
                if k not in ("model", "out", "recipe", "given")}
    args = {**defaults, "metric": "wanda", **{k: v for k, v in kw.items() if k not in ("recipe", "given")}}
    applied, record = apply_to_call(prune, args, "best", kw["given"])
    assert applied["refine_lr"] == 0.001 and applied["options"]["admm_gradual"] is False
    assert applied["refine"] == dict(RECIPES["best"].values)["refine"] and applied["update"] == "admm"             # the rest is the recipe's
    assert record["overridden"] == ["--no-admm-gradual", "--refine-lr 0.001"]      # in the recipe's flag order
    unaware, _ = apply_to_call(prune, args, "best", None)                       # without given: the default loses
    assert unaware["refine_lr"] == dict(RECIPES["best"].values)["refine_lr"]
    cells = cell_specs([0.5, 0.7, 0.5], ["unstructured", "2:4", "4:8", "2:4"])
    assert [(c["label"], c["pattern"], c["sparsity"], c["implied_sparsity"]) for c in cells] == [
        ("50%", "unstructured", 0.5, 0.5), ("70%", "unstructured", 0.7, 0.7), ("2:4", "2:4", None, 0.5),
        ("4:8", "4:8", None, 0.5)]
    for bad in (([1.2], ["unstructured"]), ([0.5], ["5:4"]), ([0.5], ["dense"])):
        with pytest.raises(UsageError):
            cell_specs(*bad)
    with pytest.raises(UsageError):
        parse_entry("wanda:oops")
    table = markdown({"cells": cells[:1], "dense": {"ppl": 10.0},
                      "rows": [{"label": "wanda", "cells": {"50%": {"ppl": 12.345}}}]})
    assert table == "| method | 50% |\n|---|---|\n| dense | 10.00 |\n| wanda | 12.35 |\n"


@pytest.fixture(scope="module")
def gram_stats(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-stats") / "s"
    run("calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32, "--gram")
    return out


def test_sweep_equals_prune_then_eval(tiny_llama, gram_stats, tmp_path):
    """Every cell is exactly what `stade prune` + `stade eval` give; the output is stade's own (a re-run needs
    --force, and --force replaces it); the scratch checkpoints are gone; the plot is a PNG stade drew."""
    pytest.importorskip("matplotlib")
    from stade_cli.outputs import foreign, read_marker
    from stade_cli.plots import png_is_ours

    out, png = tmp_path / "sweep", tmp_path / "sweep.png"
    args = ["sweep", tiny_llama, "--stats", gram_stats, "--metrics", "wanda,sparsegpt", "--sparsities", "0.3,0.5",
            "--patterns", "unstructured,2:4", "--dataset", "builtin", "--max-windows", 4, "-o", out]
    result = run(*args, "--plot", png)
    data = json.loads((out / "sweep.json").read_text())
    assert [c["label"] for c in data["cells"]] == ["30%", "50%", "2:4"]
    assert [r["label"] for r in data["rows"]] == ["wanda", "sparsegpt"]
    assert result.stdout == (out / "sweep.md").read_text() and result.stdout.startswith("| method | 30% | 50% | 2:4 |")
    assert sorted(p.name for p in out.iterdir()) == [".stade-output.json", "sweep.json", "sweep.md"]
    assert read_marker(out)["kind"] == "sweep" and foreign(out, "sweep") is None
    assert png_is_ours(png) and png.read_bytes().startswith(b"\x89PNG")
    assert data["settings"]["seqlen"] == 32       # the stats' window length, also for the evaluation

    pruned = tmp_path / "pruned"
    run("prune", tiny_llama, "--stats", gram_stats, "--metric", "sparsegpt", "--pattern", "2:4", "-o", pruned)
    alone = json.loads(run("eval", pruned, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 4,
                           "--json").stdout)
    assert data["rows"][1]["cells"]["2:4"]["ppl"] == pytest.approx(alone["ppl"], rel=1e-9)
    dense = json.loads(run("eval", tiny_llama, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 4,
                           "--json").stdout)
    assert data["dense"]["ppl"] == pytest.approx(dense["ppl"], rel=1e-9)
    assert data["rows"][0]["cells"]["50%"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)

    again = run(*args, code=1)
    assert "already exists" in again.stderr and "--force" in again.stderr
    run(*[("magnitude" if a == "wanda,sparsegpt" else a) for a in args], "--force")
    assert [r["label"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == ["magnitude"]


def test_sweep_refuses_before_any_work(tiny_llama, tmp_path):
    """A typo, missing Gram matrices, a user's picture at --plot, an output that holds the model: one line, exit
    2 (or 1 for a path), nothing written."""
    stats = tmp_path / "stats"
    run("calibrate", tiny_llama, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32)
    out = tmp_path / "out"
    base = ["sweep", tiny_llama, "--stats", stats, "--dataset", "builtin", "--max-windows", 2, "-o", out]
    typo = run(*base, "--metrics", "wanda,stdae", code=2)
    assert "did you mean stade" in typo.stderr
    gram = run(*base, "--metrics", "sparsegpt", code=2)
    assert "Gram" in gram.stderr and "stade calibrate" in gram.stderr and "--gram" in gram.stderr
    assert "unknown option 'foo'" in run(*base, "--metrics", "wanda:foo=1", code=2).stderr
    assert "[0, 1)" in run(*base, "--sparsities", "0.5,1.5", code=2).stderr
    assert "50% is 0.5" in run(*base, "--sparsities", "50,60", code=2).stderr
    picture = tmp_path / "mine.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n not stade's")
    if "matplotlib" in sys.modules or _has_matplotlib():
        mine = run(*base, "--plot", picture, code=1)
        assert "not a plot stade drew" in mine.stderr
        assert picture.read_bytes() == b"\x89PNG\r\n\x1a\n not stade's"
    assert "holds the model directory" in run("sweep", tiny_llama, "--stats", stats, "-o", tiny_llama.parent,
                                              "--dataset", "builtin", code=2).stderr
    assert not out.exists()


def test_sweep_checks_an_entry_with_the_request_prune_makes(tiny_llama, tmp_path):
    """An entry is checked as the prune it stands for: a recipe's update needs Gram matrices (refused with stats
    that lack them, calibrated with --gram without stats), a refinement option out of range fails before any work."""
    from stade_cli.sweep import plan_sweep

    recipe = plan_sweep("m", ["wanda:recipe=best"], [0.5], ["unstructured"], None, 0)
    assert recipe.needs_stats and recipe.needs_gram and recipe.reads.gram_for == "admm"
    plain = plan_sweep("m", ["wanda", "magnitude"], [0.5], ["unstructured"], None, 0)
    assert plain.needs_stats and not plain.needs_gram
    assert not plan_sweep("m", ["magnitude"], [0.5], ["unstructured"], None, 0).needs_stats
    # --sequential computes its own Gram matrices: stats without them serve it
    assert not plan_sweep("m", ["wanda:update=admm,sequential=true"], [0.5], ["unstructured"], None, 0).needs_gram
    with pytest.raises(UsageError, match="refine-lr must be positive"):
        plan_sweep("m", ["wanda:refine=5,refine_lr=-1"], [0.5], ["unstructured"], None, 0)

    stats = tmp_path / "stats"
    run("calibrate", tiny_llama, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32)
    out = tmp_path / "out"
    refused = run("sweep", tiny_llama, "--stats", stats, "--metrics", "wanda:recipe=best", "--dataset", "builtin",
                  "-o", out, code=2)
    assert "no Gram matrices, which admm needs" in refused.stderr and "--gram" in refused.stderr
    assert not out.exists()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_sweep_calibrates_when_given_no_stats_and_keeps_them(tiny_llama, tmp_path):
    out = tmp_path / "sweep"
    run("sweep", tiny_llama, "--metrics", "stade", "--sparsities", "0.5", "--calibration", "builtin",
        "--nsamples", 4, "--seqlen", 32, "--dataset", "builtin", "--max-windows", 2, "-o", out)
    data = json.loads((out / "sweep.json").read_text())
    assert data["calibration"]["nsamples"] == 4 and data["calibration"]["seqlen"] == 32
    run("prune", tiny_llama, "--stats", out / "stats", "--metric", "stade", "-o", tmp_path / "p")   # reusable


def test_plot_without_matplotlib_says_what_to_install(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib now raises ImportError
    result = run("inspect", tiny_llama, "--plot", tmp_path / "x.png", code=2)
    assert "needs matplotlib" in result.stderr and "stade-cli[plot]" in result.stderr
    assert not (tmp_path / "x.png").exists()
    sweep = run("sweep", tiny_llama, "--metrics", "magnitude", "-o", tmp_path / "s", "--plot", tmp_path / "y.png",
                code=2)
    assert "needs matplotlib" in sweep.stderr and not (tmp_path / "s").exists()


def test_inspect_plots_checkpoints_and_stats(tiny_llama, gram_stats, tmp_path):
    pytest.importorskip("matplotlib")
    from stade_cli.plots import png_is_ours, png_text

    pruned = tmp_path / "owl"
    run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--layer-sparsity", "owl", "-o", pruned)
    a, b = tmp_path / "ckpt.png", tmp_path / "stats.png"
    run("inspect", pruned, "--summary", "--plot", a)
    run("inspect", gram_stats, "--summary", "--plot", b)
    for png in (a, b):
        assert png_is_ours(png) and png_text(png)["Software"].startswith("stade ")
    first = a.read_bytes()
    run("inspect", pruned, "--summary", "--plot", a)       # its own picture: replaced
    assert png_is_ours(a) and len(first) > 1000
    assert "not a .png" in run("inspect", pruned, "--plot", tmp_path / "x.jpg", code=2).stderr
    assert "comparison" in run("inspect", pruned, "--against", tiny_llama, "--plot", tmp_path / "c.png",
                               code=2).stderr
    # inside a stade output (this one, or the one sweep is about to write) a plot would make it no longer stade's
    for args in (["inspect", pruned, "--plot", pruned / "sparsity.png"],
                 ["inspect", gram_stats, "--plot", gram_stats / "gram" / "s.png"],
                 ["sweep", tiny_llama, "--stats", gram_stats, "--metrics", "wanda", "--sparsities", 0.5,
                  "-o", tmp_path / "sw", "--plot", tmp_path / "sw" / "plot.png"]):
        assert "an output of stade's" in run(*args, code=2).stderr
    assert not (pruned / "sparsity.png").exists() and not (tmp_path / "sw").exists()


def test_inspect_stats_summary_first(gram_stats):
    """The stats view opens with what was measured and what it enables, then blocks, then (unless --summary)
    the layers."""
    text = run("inspect", gram_stats).stdout
    lines = text.splitlines()
    assert lines[0].strip() == str(gram_stats)
    assert "builtin · 4 × 32 tokens" in lines[2]
    assert "14 layer inputs in 2 blocks" in lines[3] and "Gram matrices: yes" in lines[3]
    assert text.index("per block") < text.index("per layer")
    assert "per layer" not in run("inspect", gram_stats, "--summary").stdout
    blocks = json.loads(run("inspect", gram_stats, "--json").stdout)["blocks"]
    assert [b["block"] for b in blocks] == [0, 1] and all(b["layers"] == 7 for b in blocks)
    assert all(b["mean_over_std"] == pytest.approx(b["mean_abs_mean"] / b["mean_std"]) for b in blocks)
