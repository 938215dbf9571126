"""The model card every pruned checkpoint carries (``card.py``) and ``stade eval OUT --record``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stade_cli.card import base_facts, command_line, front_matter, metadata, render
from stade_cli.cli.app import app
from stade_cli.outputs import MARKER, Output, foreign, read_marker

runner = CliRunner()

BASE_CARD = """---
license: apache-2.0
pipeline_tag: text-generation
tags:
- original
---

# Tiny Llama

The ORIGINAL model: 99.9 on everything.
"""


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path / "README.md")


@pytest.fixture
def carded(tiny_llama, tmp_path) -> Path:
    """The tiny Llama with a card of its own, as a hub model has."""
    model = tmp_path / "base"
    shutil.copytree(tiny_llama, model)
    (model / "README.md").write_text(BASE_CARD)
    return model


# ------------------------------------------------------------------------------------------ pure parts
def test_front_matter_and_base_facts(tmp_path):
    assert front_matter(BASE_CARD)["license"] == "apache-2.0"
    assert front_matter("# no metadata\n") == {} and front_matter("---\n: [unclosed\n---\n") == {}
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    facts = base_facts(snap, str(snap), None, from_hub=False)          # a cache snapshot given as a path
    assert facts["hub_id"] == "org/name" and facts["revision"] == "b" * 40 and "license" not in facts
    assert facts["pipeline_tag"] == "text-generation"
    local = tmp_path / "mine"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"license": "mit"}))
    assert base_facts(local, str(local), None, from_hub=False) == {
        "hub_id": None, "revision": None, "name": "mine", "license": "mit", "pipeline_tag": "text-generation"}
    (local / "README.md").write_text(BASE_CARD)                         # the card's metadata comes first
    assert base_facts(local, str(local), None, from_hub=False)["license"] == "apache-2.0"
    assert base_facts(local, "org/x", "v1", from_hub=True)["hub_id"] == "org/x"


def test_command_line_names_what_differs_from_the_defaults():
    defaults = {"model": None, "out": None, "metric": "wanda", "sparsity": 0.5, "pattern": "unstructured",
                "sequential": False, "bias_correction": None, "stats": None, "device": "auto", "refine_lr": 1e-3}
    args = {**defaults, "model": "org/m", "out": "my out", "metric": "stade", "sequential": True,
            "bias_correction": False, "stats": Path("s"), "device": "cuda", "refine_lr": 3e-4,
            "options": {"admm_gradual": True, "admm_iterations": 20}}
    line = command_line(args, defaults, {"admm_gradual": False, "admm_iterations": 20})
    assert line == ("stade prune org/m --metric stade --sequential --no-bias-correction --stats s --refine-lr 0.0003 "
                    "--admm-gradual -o 'my out'")


def test_metadata_and_render_parse_as_a_hub_card():
    from huggingface_hub import ModelCard

    report = {"version": "1", "created": "2026-01-02T00:00:00", "method": "wanda", "update": "admm",
              "pattern": "2:4", "target_sparsity": 0.5, "mode": "one-shot",
              "overall": {"zeros": 50, "params": 100, "sparsity": 0.5}, "coverage": {"share": 0.999},
              "bias_correction": {"layers": 0}, "layer_sparsity": {"method": "uniform"},
              "params": {"before": 10, "after": 10, "removed": 0.0},
              "base": {"hub_id": "org/m", "revision": "abc", "name": "org/m", "license": "llama2",
                       "pipeline_tag": "text-generation"},
              "command": "stade prune org/m --pattern 2:4 --stats 'my stats' -o out",
              "stats": {"dataset": "/data/a.txt,/data/b.txt", "nsamples": 8, "seqlen": 32, "seed": 0, "gram": True,
                        "model": {"ref": "org/m"}},
              "options": {"admm_gradual": True},
              "evaluations": [{"recorded": "2026-01-03T00:00:00", "dataset": "/x/pride.txt", "ppl": 31.5,
                               "windows": 40, "seqlen": 512},
                              {"recorded": "2026-01-04T00:00:00", "tasks": {"boolq": {"acc": 0.6}}, "num_fewshot": 0}]}
    meta = metadata(report)
    assert meta == {"base_model": "org/m", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "license": "llama2", "tags": ["pruned", "stade", "wanda", "2:4", "sparse"]}
    text = render(report)
    card = ModelCard(text)
    assert card.data.to_dict() == meta
    for needle in ("org/m", "at revision `abc`", "`wanda`", "`admm`", "2:4", "achieved 50.0%", "99.90%",
                   "a.txt, b.txt", "seed 0", "stade prune org/m --pattern 2:4 --stats 'my stats' -o out",
                   "stade calibrate org/m --dataset /data/a.txt,/data/b.txt --nsamples 8 --seqlen 32 --seed 0 --gram "
                   "-o 'my stats'\nstade prune", "the gradual `admm` weight update", "dense checkpoint with zeros",
                   "| perplexity | pride.txt, 40 × 512 tokens | ppl | 31.5000 | 2026-01-03 |",
                   "| boolq | 0-shot | acc | 0.6000 | 2026-01-04 |"):
        assert needle in text, needle
    bare = render({**report, "base": {"name": "local"}, "evaluations": []})
    assert "license" not in ModelCard(bare).data.to_dict() and "base_model" not in ModelCard(bare).data.to_dict()
    assert "state no license" in bare and "No evaluation recorded yet" in bare


# ------------------------------------------------------------------------------------------ end to end
def test_every_pruned_checkpoint_has_its_own_card_never_the_base_card(carded, tmp_path):
    out = tmp_path / "out"
    run("prune", carded, "--metric", "magnitude", "--sparsity", 0.4, "-o", out)
    text = (out / "README.md").read_text()
    assert "ORIGINAL" not in text and "# base, pruned" in text
    card = _card(out)
    assert card.data.license == "apache-2.0" and "base_model" not in card.data.to_dict()   # a local folder
    assert card.data.library_name == "transformers" and set(card.data.tags) >= {"pruned", "stade", "magnitude"}
    assert f"stade prune {carded} --metric magnitude --sparsity 0.4 -o {out}" in text
    assert "README.md" in read_marker(out)["files"] and foreign(out, "checkpoint") is None
    assert (carded / "README.md").read_text() == BASE_CARD                # the input is untouched


def test_structured_output_says_how_much_smaller(tiny_llama, tmp_path):
    out = tmp_path / "small"
    run("prune", tiny_llama, "--structure", "channels", "--metric", "magnitude", "--sparsity", 0.5, "-o", out)
    text = (out / "README.md").read_text()
    report = json.loads((out / "stade_report.json").read_text())
    assert "smaller dense checkpoint" in text and f"{report['params']['after']:,} parameters" in text
    assert "structured" in _card(out).data.tags


def test_a_hub_model_gets_base_model_and_revision(carded, tmp_path):
    from test_loaders import _hub_cache

    _hub_cache(carded, tmp_path / "hf", repo="tiny-org/carded", commit="c" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "tiny-org/carded", "--metric", "magnitude",
                           "-o", tmp_path / "p"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    card = _card(tmp_path / "p")
    assert card.data.base_model == "tiny-org/carded" and card.data.license == "apache-2.0"
    assert f"at revision `{'c' * 40}`" in card.text and "ORIGINAL" not in card.text


def test_eval_record_adds_the_result_atomically_and_keeps_the_output_ours(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "magnitude", "-o", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    plain = run("--json", "eval", out, "--dataset", "builtin", "--seqlen", 32)       # read-only without --record
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    first = run("eval", out, "--dataset", "builtin", "--seqlen", 32, "--record")
    # it says what it added, not that the checkpoint was replaced (only its card and report changed)
    assert f"recorded in {out}" in first.stderr and "replaced" not in first.stderr
    run("eval", out, "--dataset", "builtin", "--seqlen", 16, "--record")
    report = json.loads((out / "stade_report.json").read_text())
    rows = report["evaluations"]
    assert [r["seqlen"] for r in rows] == [32, 16]
    assert rows[0]["ppl"] == pytest.approx(json.loads(plain.stdout)["ppl"], rel=1e-9)
    text = (out / "README.md").read_text()
    assert text.count("| perplexity | builtin") == 2 and f"{rows[0]['ppl']:.4f}" in text
    assert _card(out).data.tags[:2] == ["pruned", "stade"]
    assert foreign(out, "checkpoint") is None                      # still stade's own: --force may replace it
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert {k: v for k, v in report.items() if k != "evaluations"} == \
        {k: v for k, v in json.loads(before["stade_report.json"]).items() if k != "evaluations"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no staging or lock left beside it
    run("prune", tiny_llama, "--metric", "wanda", "--dataset", "builtin", "--nsamples", 2, "--seqlen", 16,
        "-o", out, "--force")


def test_eval_record_refuses_what_stade_did_not_write_or_another_run_holds(tiny_llama, tmp_path):
    r = run("eval", tiny_llama, "--dataset", "builtin", "--seqlen", 32, "--record", code=2)
    assert "stade did not write it" in r.stderr
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "magnitude", "-o", out)
    (out / "notes.txt").write_text("mine")                      # a user's file: the directory is the user's now
    r = run("eval", out, "--dataset", "builtin", "--seqlen", 32, "--record", code=2)
    assert "cannot record into" in r.stderr and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    here = os.getcwd()
    try:                                                        # from inside it: refused, with what to type
        os.chdir(out)
        r = run("eval", ".", "--dataset", "builtin", "--seqlen", 32, "--record", code=2)
        assert "current directory" in r.stderr and f"cd {tmp_path}" in r.stderr
    finally:
        os.chdir(here)
    report = (out / "stade_report.json").read_bytes()
    with Output(out, "checkpoint", force=True):                 # another run writing it
        r = runner.invoke(app, ["eval", str(out), "--dataset", "builtin", "--seqlen", "32", "--record"])
    assert r.exit_code != 0 and "another stade run" in r.stderr
    assert (out / "stade_report.json").read_bytes() == report


def test_an_interrupted_record_leaves_the_output_as_it_was(tiny_llama, tmp_path, monkeypatch):
    from stade_cli import outputs
    from stade_cli.recording import record_into

    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "magnitude", "-o", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_write_marker", dies)         # killed just before the new record is complete
    with pytest.raises(KeyboardInterrupt):
        with record_into(str(out)) as commit:
            commit({"dataset": "builtin", "ppl": 2.0, "windows": 1, "seqlen": 8})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert foreign(out, "checkpoint") is None and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_library_prune_takes_its_request_by_keyword():
    import inspect

    from stade_cli import prune

    params = list(inspect.signature(prune).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "out"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    with pytest.raises(TypeError):
        prune("model", "out", "wanda")


def test_the_cards_commands_reproduce_the_checkpoint(tiny_llama, tmp_path):
    """The two commands in the card (calibrate, then prune from those stats), run again into new folders, give
    the same weights, byte for byte."""
    import re
    import shlex

    stats, out = tmp_path / "stats", tmp_path / "out"
    run("calibrate", tiny_llama, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32, "--gram")
    run("prune", tiny_llama, "--stats", stats, "--metric", "wanda", "--update", "admm", "--admm-iterations", 5,
        "--sparsity", 0.6, "-o", out)
    text = (out / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)\n```", text, re.S).group(1).splitlines()
    assert [shlex.split(line)[:2] for line in block] == [["stade", "calibrate"], ["stade", "prune"]]
    again = {str(stats): str(tmp_path / "stats2"), str(out): str(tmp_path / "out2")}
    for line in block:
        words = [again.get(w, w) for w in shlex.split(line)[1:]]
        run(*words)
    assert "--admm-iterations 5" in block[1] and "--sparsity 0.6" in block[1]
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_the_card_keeps_what_overrode_a_recipe_even_at_the_general_default(tiny_llama, tmp_path):
    """``--recipe best --update none``: none is prune's own default, but it overrode the recipe's admm, so the card's
    command must say it; run again, that command writes the same weights."""
    import re
    import shlex

    stats, out = tmp_path / "stats", tmp_path / "out"
    run("calibrate", tiny_llama, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32)
    run("prune", tiny_llama, "--stats", stats, "--recipe", "best", "--update", "none", "--refine", 2,
        "--refine-samples", 2, "--refine-seqlen", 16, "-o", out)
    line = re.search(r"```sh\n(.*?)\n```", (out / "README.md").read_text(), re.S).group(1).splitlines()[-1]
    assert "--update none" in line and "--recipe best" in line, line
    words = [str(tmp_path / "out2") if w == str(out) else w for w in shlex.split(line)[1:]]
    run(*words)
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_the_python_defaults_are_the_command_lines(tiny_llama, tmp_path):
    """``prune(M, OUT, structure="channels", sparsity=…)`` ranks channels as ``stade prune --structure channels``
    does (stade, its mean folded), ``structure="blocks"`` needs no ``metric=None``, and a Path is a model."""
    from stade_cli import calibrate, prune

    stats = calibrate(tiny_llama, tmp_path / "stats", dataset="builtin", nsamples=4, seqlen=32)
    channels = prune(tiny_llama, tmp_path / "ch", structure="channels", sparsity=0.5, stats=stats)
    assert channels["structure"]["metric"] == "stade" and channels["structure"]["folded"]
    assert "--metric" not in (tmp_path / "ch" / "README.md").read_text().split("stade prune")[-1].split("\n")[0]
    blocks = prune(tiny_llama, tmp_path / "bl", structure="blocks", sparsity=0.5, stats=stats)
    assert len(blocks["structure"]["removed"]) == 1
    plain = prune(tiny_llama, tmp_path / "p", stats=stats)
    assert plain["method"] == "wanda" and plain["target_sparsity"] == 0.5
    from stade_cli.errors import OutputError

    with pytest.raises(OutputError, match=r"already exists \(pass --force \(force=True from Python\)"):
        prune(tiny_llama, tmp_path / "p", stats=stats)          # a script is told its own spelling too


def test_the_card_says_what_structure_and_expert_removal_took():
    """In words, not a dump: how many channels of every MLP and how they were ranked, which blocks, how many
    experts each block kept and by which score."""
    from stade_cli.card import _what_was_done

    channels = {"structure": {"kind": "channels", "metric": "stade", "width": 64, "removed_per_block": 16,
                              "folded": True, "refit": True}}
    line = next(l for l in _what_was_done(channels) if "Structured" in l)
    assert "16 of the 64 channels of every MLP removed (ranked by stade, their mean output folded" in line
    assert "refitted from the calibration Gram matrix" in line
    blocks = {"structure": {"kind": "blocks", "blocks": 4, "removed": [1, 2], "kept": [0, 3]}}
    assert "2 of 4 decoder blocks removed (1, 2: those that change their input least)" in "".join(
        _what_was_done(blocks))
    experts = {"experts": {"removal": {"score": "reap", "kept": {"0": [0, 5], "1": [2, 3]},
                                       "removed": {"0": [1, 2, 3, 4], "1": [0, 1, 4, 5]}}}}
    line = next(l for l in _what_was_done(experts) if "Experts" in l)
    assert "2 of 6 experts kept in each of 2 mixture-of-experts blocks, chosen by reap" in line and "{" not in line


def test_every_command_line_default_is_the_library_functions():
    """An option that both the command and its library function take has one default (a comma-separated list on
    the command line is the same list in Python): a script gets what the command line gets."""
    import inspect

    from stade_cli.calibration.runner import calibrate
    from stade_cli.cli import calibrate as cli_calibrate, demo as cli_demo, eval as cli_eval
    from stade_cli.cli import inspect as cli_inspect, prune as cli_prune, sweep as cli_sweep
    from stade_cli.demo import run_demo
    from stade_cli.evaluation import evaluate
    from stade_cli.pruning import prune
    from stade_cli.report import inspect as report
    from stade_cli.sweep import sweep
    from stade_cli.zeroshot import zero_shot

    def as_list(value):
        return [float(v) if v[0].isdigit() else v for v in value.split(",")] if isinstance(value, str) else list(value)

    pairs = [(cli_prune.prune, prune), (cli_calibrate.calibrate, calibrate), (cli_eval.eval_command, evaluate),
             (cli_eval.eval_command, zero_shot), (cli_demo.demo, run_demo), (cli_sweep.sweep, sweep),
             (cli_inspect.inspect, report)]
    compared = 0
    for command, function in pairs:
        ours, theirs = inspect.signature(command).parameters, inspect.signature(function).parameters
        for name in set(ours) & set(theirs):
            a, b = ours[name].default, theirs[name].default
            if b is inspect.Parameter.empty:            # required in Python (zero_shot's tasks): nothing to agree on
                continue
            if isinstance(b, tuple):
                a, b = as_list(a), list(b)
            assert a == b, f"{function.__module__}.{function.__name__}({name}): command line {a!r}, Python {b!r}"
            compared += 1
    assert compared >= 60
