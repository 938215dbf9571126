"""End to end through the CLI on tiny models: calibrate → prune → reload → eval → inspect."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.arch import describe, meta_model

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def calibrate(model, out, *extra):
    return run("calibrate", model, "-o", out, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32, *extra)


@pytest.fixture(scope="module")
def llama_stats(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "s"
    result = calibrate(tiny_llama, out)
    assert result.stdout.strip() == str(out)  # stdout is the path and nothing else
    return out


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.versions
@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "gemma"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "stade"])
def test_pipeline_every_arch(arch, metric, tiny_factory, tmp_path):
    model = tiny_factory(arch)
    stats = tmp_path / "stats"
    if metric != "magnitude":
        calibrate(model, stats)
    out = tmp_path / "out"
    args = ["prune", model, "--metric", metric, "--sparsity", 0.5, "-o", out]
    if metric == "stade" and arch in ("qwen2", "gemma"):  # no config switch gives every linear a bias
        r = run(*args, "--stats", stats, code=1)
        assert "--no-bias-correction" in r.stderr and not out.exists()
        args.append("--no-bias-correction")
    result = run(*args, *(["--stats", stats] if metric != "magnitude" else []))
    assert result.stdout.strip() == str(out)
    pruned = reload(out)
    arch_info = describe(pruned)
    modules = dict(pruned.named_modules())
    for name, t in arch_info.targets.items():
        w = modules[name].weight
        zeros_per_row = (w == 0).sum(1)
        assert (zeros_per_row == math.floor(0.5 * t.in_features)).all(), name
    report = json.loads((out / "stade_report.json").read_text())
    assert report["method"] == metric and report["mode"] == "one-shot"
    assert set(report["layers"]) == set(arch_info.targets)


def test_nonpruned_tensors_pass_through(tiny_llama, llama_stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "wanda", "-o", out)
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    arch = describe(meta_model(reload(tiny_llama).config))
    for key, tensor in before.items():
        if key in arch.by_key():
            kept = after[key] != 0
            assert torch.equal(after[key][kept], tensor[kept])  # kept weights bit-identical
        else:
            assert torch.equal(after[key], tensor)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()


def test_nm_pattern_and_inspect(tiny_llama, llama_stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "stade", "--pattern", "2:4", "-o", out)
    summary = json.loads(run("inspect", out, "--json").stdout)
    assert summary["nm_ok"] is True and summary["report_agrees"] is True
    assert summary["overall"]["sparsity"] == pytest.approx(0.5)
    report = json.loads((out / "stade_report.json").read_text())
    for name, layer in summary["layers"].items():
        assert layer["zeros"] == report["layers"][name]["zeros"]
    text = run("inspect", out).stdout
    assert "model.layers.1.mlp.down_proj" in text and "2:4" in text
    # a pattern inspect cannot check is refused as prune refuses it, and a STATS directory has no rows to check
    assert "unknown pattern '2-4'" in run("inspect", out, "--pattern", "2-4", code=2).stderr
    assert "0 < N < M" in run("inspect", out, "--pattern", "0:4", code=2).stderr
    assert "STATS directory" in run("inspect", llama_stats, "--pattern", "2:4", code=2).stderr


def test_eval_finite_and_json(tiny_llama, llama_stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--stats", llama_stats, "-o", out)
    plain = run("eval", out, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 3).stdout.strip()
    assert math.isfinite(float(plain))
    data = json.loads(run("eval", out, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 3, "--json").stdout)
    assert data["windows"] == 3 and data["tokens"] == 3 * 31
    assert data["ppl"] == pytest.approx(float(plain), rel=1e-4)


def test_eval_matches_direct_computation(tiny_llama):
    from transformers import AutoTokenizer

    from stade_cli.data import load_corpus

    data = json.loads(run("eval", tiny_llama, "--dataset", "builtin", "--seqlen", 16, "--max-windows", 2,
                          "--json").stdout)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(load_corpus("builtin", "evaluation").text(), return_tensors="pt").input_ids[0][:32].view(2, 16)
    model = reload(tiny_llama)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in ids]  # mean over 15 predictions each
    assert data["ppl"] == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


def test_inspect_stats(llama_stats):
    data = json.loads(run("inspect", llama_stats, "--json").stdout)
    assert data["kind"] == "stats" and data["manifest"]["nsamples"] == 4
    assert len(data["layers"]) == 14
    manifest = data["manifest"]
    assert manifest["format_version"] == 1 and manifest["model"]["fingerprint"]
    assert sorted(map(len, manifest["shared_inputs"].values())) == [1, 1, 1, 1, 2, 2, 3, 3]  # q/k/v, gate/up


def test_json_paths_are_absolute_and_named_alike(tiny_llama, llama_stats, tmp_path, monkeypatch):
    """A script reads every command's written path from "output", absolute, whatever the cwd it was given from."""
    monkeypatch.chdir(tmp_path)
    cal = json.loads(calibrate(tiny_llama, "s2", "--json").stdout)
    assert cal["output"] == cal["stats"] == str(tmp_path / "s2")
    pruned = json.loads(run("prune", tiny_llama, "--stats", "s2", "-o", "p", "--json").stdout)
    assert pruned["output"] == str(tmp_path / "p")
    assert json.loads(run("inspect", "s2", "--json").stdout)["path"] == str(tmp_path / "s2")
    assert json.loads(run("inspect", "p", "--json").stdout)["path"] == str(tmp_path / "p")
    swept = json.loads(run("sweep", tiny_llama, "--stats", "s2", "--metrics", "magnitude", "--sparsities", 0.5,
                           "--dataset", "builtin", "--max-windows", 1, "-o", "sw", "--json").stdout)
    assert swept["output"] == str(tmp_path / "sw") and swept["rows"]


def test_inspect_coverage_agrees_with_the_report_after_bias_correction(tiny_llama, llama_stats, tmp_path):
    """stade's bias correction gives a Llama new bias tensors; inspect's share of the blocks' weights that are
    targets leaves them out, as prune's report does, so the two figures are the same."""
    out = tmp_path / "out"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "stade", "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    assert report["bias_correction"]["added"]
    assert all(k.endswith(".bias") for k in report["bias_correction"]["added"])
    summary = json.loads(run("inspect", out, "--json").stdout)
    assert summary["coverage"] == report["coverage"]


def test_prune_without_stats_calibrates(tiny_llama, llama_stats, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("prune", tiny_llama, "--metric", "stade", "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32, "-o", a)
    run("prune", tiny_llama, "--metric", "stade", "--stats", llama_stats, "-o", b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_refuses_existing_output_and_foreign_stats(tiny_factory, llama_stats, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = run("prune", tiny_factory("llama"), "--stats", llama_stats, "-o", out, code=1)
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert list(out.iterdir()) == []
    run("prune", tiny_factory("llama"), "--stats", llama_stats, "-o", out, "--force")
    assert (out / "stade_report.json").is_file()
    r = run("prune", tiny_factory("qwen2"), "--stats", llama_stats, "-o", tmp_path / "o2", code=1)
    assert "another model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o2").exists()


def test_usage_errors(tiny_llama, llama_stats, tmp_path):
    r = run("prune", tiny_llama, "--metric", "nope", "-o", tmp_path / "x", code=2)
    assert "unknown metric" in r.stderr and "wanda" in r.stderr
    r = run("prune", tiny_llama, "--stats", llama_stats, "--sparsity", 1.5, "-o", tmp_path / "x", code=2)
    assert "[0, 1)" in r.stderr
    r = run("prune", tiny_llama, "--stats", llama_stats, "--sparsity", 70, "-o", tmp_path / "x", code=2)
    assert "--sparsity must be in [0, 1) (got 70)" in r.stderr and "70% is --sparsity 0.7" in r.stderr
    r = run("prune", tiny_llama, "--stats", llama_stats, "--pattern", "2:4", "--sparsity", 0.7, "-o", tmp_path / "x",
            code=2)
    assert "contradicts" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.versions
def test_shell_pipeline(tiny_llama, tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    stade = shutil.which("stade", path=env["PATH"])
    cmd = f'"{sys.executable}" -m stade_cli' if stade is None else "stade"
    script = (f'{cmd} prune {tiny_llama} --metric wanda -o out --stats '
              f'"$({cmd} calibrate {tiny_llama} -o s --dataset builtin --nsamples 2 --seqlen 16)" '
              f'&& {cmd} eval out --dataset builtin --seqlen 16 --max-windows 2')
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "out" and math.isfinite(float(lines[1]))


def test_inspect_against_and_off_target(tiny_llama, llama_stats, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "wanda", "-o", a)
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "wanda", "--skip", r"layers\.1\.", "-o", b)
    cmp = json.loads(run("inspect", a, "--against", b, "--json").stdout)
    assert cmp["kind"] == "comparison"
    assert set(cmp["differing_layers"]) == {n for n in cmp["layers"] if ".layers.1." in n}
    assert cmp["layers"]["model.layers.1.mlp.up_proj"]["changed"] == 64 * 32 // 2
    assert cmp["layers"]["model.layers.0.mlp.up_proj"]["changed"] == 0
    assert "layers differ" in run("inspect", a, "--against", b).stdout
    # a layer edited after pruning is flagged as off target
    from safetensors.torch import load_file, save_file

    sd = load_file(a / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.ones_like(sd["model.layers.0.mlp.up_proj.weight"])
    save_file(sd, a / "model.safetensors", metadata={"format": "pt"})
    summary = json.loads(run("inspect", a, "--json").stdout)
    assert [n for n, l in summary["layers"].items() if l["off_target"]] == ["model.layers.0.mlp.up_proj"]
    assert summary["report_agrees"] is False
    assert "differ from the target" in run("inspect", a).stdout


def test_inspect_stats_largest_means_first(llama_stats):
    layers = json.loads(run("inspect", llama_stats, "--json").stdout)["layers"]
    means = [l["mean_abs_mean"] for l in layers]
    assert means == sorted(means, reverse=True)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prune_from_stats_uses_their_architecture(arch, tiny_factory, tmp_path, monkeypatch):
    """calibrate stores the model's description (targets, bias flags); prune from those stats builds no model
    and writes the same checkpoint as with the description rebuilt from config.json."""
    import stade_cli.arch
    import stade_cli.plan
    from stade_cli.arch import Architecture, bias_flag_table
    from stade_cli.checkpoint import load_config

    model = tiny_factory(arch)
    stats = tmp_path / "stats"
    calibrate(model, stats)
    manifest = json.loads((stats / "manifest.json").read_text())
    stored = Architecture.from_data(manifest["architecture"])
    rebuilt = describe(meta_model(load_config(model)))
    assert stored.targets == rebuilt.targets and stored.blocks == rebuilt.blocks
    assert stored.bias_flags == bias_flag_table(load_config(model))
    if arch == "llama":
        assert set(stored.bias_flags) == {"attention_bias", "mlp_bias"}
    only = Architecture.from_data(manifest["architecture"], only=r"mlp|fc", skip=r"down|fc2")
    assert set(only.targets) == {n for n in rebuilt.targets if re.search("mlp|fc", n) and not re.search("down|fc2", n)}

    args = ["prune", model, "--stats", stats, "--metric", "stade", "--sparsity", 0.5, "--skip", "k_proj"]
    with monkeypatch.context() as m:                     # the fast path builds nothing
        def no_model(*_):
            raise AssertionError("prune from stats built a model")
        m.setattr(stade_cli.plan, "meta_model", no_model)
        m.setattr(stade_cli.arch, "meta_model", no_model)
        run(*args, "-o", tmp_path / "fast")
    manifest["architecture"]["bias_flags"] = None        # a description without the flags: read from the config
    (stats / "manifest.json").write_text(json.dumps(manifest))
    run(*args, "-o", tmp_path / "flags")
    del manifest["architecture"]                         # stats of an older stade: rebuilt from the config
    (stats / "manifest.json").write_text(json.dumps(manifest))
    run(*args, "-o", tmp_path / "slow")
    for other in ("flags", "slow"):
        for name in os.listdir(tmp_path / "fast"):
            if name not in ("stade_report.json", ".stade-output.json", "README.md"):  # these carry times, the card the command
                assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / other / name).read_bytes(), name


def test_inspect_reads_at_a_glance(tiny_llama, llama_stats, tmp_path):
    """Summary first, then blocks with each block's own target (OWL), then layers unless --summary; bars that
    tell 48% from 52%."""
    from stade_cli.cli.inspect import bar

    assert len(bar(0.48)) == len(bar(0.52)) == 24 and bar(0.48) != bar(0.52)
    assert bar(0.0) == "·" * 24 and bar(1.0) == "█" * 24 and bar(0.5) == "█" * 12 + "·" * 12
    out = tmp_path / "owl"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "wanda", "--sparsity", "0.5",
        "--layer-sparsity", "owl", "--owl-lambda", "0.2", "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    s = json.loads(run("inspect", out, "--json").stdout)
    targets = {str(b["block"]): b["target"] for b in s["blocks"]}
    assert targets == {k: v for k, v in report["layer_sparsity"]["blocks"].items()} and len(set(targets.values())) > 1
    assert not any(b["off_target"] for b in s["blocks"])
    text = run("inspect", out).stdout
    lines = text.splitlines()
    assert lines[1].startswith("method wanda · pattern unstructured · target 50.00%")
    assert lines[2].startswith("overall:") and "the report agrees" in lines[2]
    assert text.index("per block") < text.index("per layer") and "sparsity, 0 → 100%" in text
    for b, t in targets.items():
        assert f"{t:.2%}" in text
    summary = run("inspect", out, "--summary").stdout
    assert "per block" in summary and "per layer" not in summary


def test_progress_is_a_calm_heartbeat_where_there_are_no_bars(capsys, monkeypatch):
    """Not a terminal: plain lines with percent, elapsed and time left (here on every step: interval 0), one
    at the end; --quiet prints none."""
    from stade_cli.runtime import StderrReporter

    rep = StderrReporter(heartbeat=0.0)
    assert not rep.bars
    assert list(rep.track(range(4), "calibrating", total=4)) == [0, 1, 2, 3]
    with rep.task("pruning", total=200) as advance:
        advance(50)
        advance(150)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:4] == [l for l in lines[:4] if l.startswith("calibrating: ")]
    assert lines[0].startswith("calibrating: 25% (") and "s left" in lines[0] and "elapsed" in lines[0]
    assert lines[3].startswith("calibrating: 100%") and "left" not in lines[3]
    assert any(l.startswith("pruning: 25%") for l in lines) and lines[-1].startswith("pruning: 100%")
    assert len(lines) == 6, lines                               # the last line of each is not said twice
    quiet = StderrReporter(quiet=True, heartbeat=0.0)
    list(quiet.track(range(3), "x", total=3))
    with quiet.task("y", total=1) as advance:
        advance(1)
    assert capsys.readouterr().err == ""
    import itertools
    import time

    ticks = itertools.count()
    monkeypatch.setattr(time, "monotonic", lambda: next(ticks) * 0.025)     # 25 ms a step, on a clock of the test's
    calm = StderrReporter()                                     # the default: one line per 30 s at most
    list(calm.track(range(1000), "fast", total=1000))           # 25 s: no line
    assert capsys.readouterr().err == ""
    list(calm.track(range(1400), "slow", total=1400))           # 35 s: one line at 30 s, and the last
    assert [l.split(":")[0] for l in capsys.readouterr().err.splitlines()] == ["slow", "slow"]


@pytest.mark.versions
def test_a_task_within_a_loop_joins_its_bars(monkeypatch):
    """On a terminal, a task started inside a tracked loop (a block's steps within the loop over blocks) is a
    second bar on the same display, removed when it ends: rich before 14 refuses a second live display
    ("Only one live display may be active at once"), so this runs under the oldest rich too."""
    import io

    from rich.console import Console

    from stade_cli.runtime import StderrReporter

    rep = StderrReporter()
    rep.bars = True
    rep.console = Console(file=io.StringIO(), force_terminal=True, width=100)
    seen = []
    for block in rep.track(range(3), "refining blocks"):
        with rep.task(f"block {block}: steps", total=2) as advance:
            advance()
            advance()
            live = rep._live
            seen.append((len(live.tasks), [t.description for t in live.tasks], live.tasks[-1].completed))
        assert len(rep._live.tasks) == 1                      # the inner bar is gone, the outer one stays
    assert seen == [(2, ["refining blocks", f"block {b}: steps"], 2) for b in range(3)]
    assert rep._live is None                                  # and the display is closed after the loop
    with rep.task("writing", total=4) as advance:             # a task of its own again opens a display
        advance(4)
        assert rep._live.tasks[0].description == "writing"
    assert rep._live is None


def test_inspect_against_names_both_sides_and_tells_weights_from_mask(tiny_llama, llama_stats, tmp_path):
    """A Wanda and a SparseGPT checkpoint: SparseGPT also updates kept weights, so more weights change than mask
    entries; each side is named with its method and pattern."""
    a, b = tmp_path / "wanda", tmp_path / "sgpt"
    run("prune", tiny_llama, "--stats", llama_stats, "--metric", "wanda", "--pattern", "2:4", "-o", a)
    run("prune", tiny_llama, "--metric", "sparsegpt", "--pattern", "2:4", "--dataset", "builtin",
        "--nsamples", "2", "--seqlen", "16", "-o", b)
    cmp = json.loads(run("inspect", a, "--against", b, "--json").stdout)
    assert (cmp["a_method"], cmp["a_pattern"], cmp["b_method"], cmp["b_pattern"]) == ("wanda", "2:4", "sparsegpt", "2:4")
    assert cmp["changed"] > cmp["mask_changed"] > 0
    text = run("inspect", a, "--against", b).stdout
    assert f"A: {cmp['a']} (wanda, 2:4)" in text and f"B: {cmp['b']} (sparsegpt, 2:4)" in text
    assert "weights changed" in text and "mask changed" in text and f"{cmp['mask_changed']:,} of them in the mask" in text


def test_an_option_given_twice_is_refused(tiny_llama, llama_stats, tmp_path):
    """click keeps the last of two values silently; a tired user calibrating on two files would get one."""
    r = run("calibrate", tiny_llama, "-o", tmp_path / "s", "--dataset", "a.txt", "--dataset", "b.txt", code=2)
    assert "--dataset was given twice" in r.stderr and "--dataset a.txt,b.txt" in r.stderr
    r = run("prune", tiny_llama, "--stats", llama_stats, "-o", tmp_path / "p", "--sparsity", "0.5",
            "--sparsity=0.6", code=2)
    assert "--sparsity was given twice" in r.stderr
    r = run("prune", tiny_llama, "--stats", llama_stats, "--output", tmp_path / "p", "-o", tmp_path / "q", code=2)
    assert "was given twice" in r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()
    run("prune", tiny_llama, "--stats", llama_stats, "-o", tmp_path / "p", "--force", "--force", "-q")  # flags: harmless


@pytest.mark.parametrize("kwargs,text", [({"metric": "wandaa"}, "did you mean wanda"), ({"sparsity": 2}, "[0, 1)"),
                                         ({"max_windows": 0}, "--max-windows"), ({"nsamples": 0}, "--nsamples")])
def test_the_demo_refuses_its_options_before_any_step(tmp_path, kwargs, text):
    """Before the model is built or the calibration runs (minutes), not at the step that reads the option."""
    from stade_cli.demo import run_demo
    from stade_cli.errors import UsageError

    with pytest.raises(UsageError) as caught:
        run_demo(model=str(tmp_path / "never-read"), workdir=str(tmp_path / "work"), **kwargs)
    assert text in str(caught.value) and not (tmp_path / "work").exists()


def test_help_method_is_as_wide_as_help():
    """COLUMNS=80 (or a pipe): no line wider than 80 columns and none padded with trailing spaces."""
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80"}
    for topic in ("refine", "admm"):
        out = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "--help-method", topic], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith(f"{topic}: ") and max(map(len, out.splitlines())) <= 80
        assert not any(line != line.rstrip() for line in out.splitlines())


def test_a_global_option_after_the_command_says_where_it_goes():
    r = runner.invoke(app, ["prune", "--debug"])
    assert r.exit_code == 2 and "--debug is an option of stade itself (`stade --debug prune ...`)" in r.stderr


def test_a_flag_shows_no_value_in_the_help():
    """Newer typer writes ``--force <bool>``, which reads as a flag that takes true or false."""
    for args in (["--help"], ["prune", "--help"], ["calibrate", "--help"]):
        out = runner.invoke(app, args, env={"COLUMNS": "100"}).stdout
        assert "--force" in out or "--json" in out
        assert "<bool>" not in out, args


def test_the_library_functions_stay_functions():
    """``stade_cli.evaluate`` once lived in evaluate.py: importing that module (any command did) bound the package's
    ``evaluate`` to it, and the next ``stade_cli.evaluate(...)`` called a module. A fresh interpreter, as a user's
    script, before and after the library's modules are imported."""
    import subprocess
    import sys

    code = ("import stade_cli\n"
            "for _ in range(2):\n"
            "    for name in ('calibrate', 'prune', 'evaluate', 'zero_shot', 'inspect'):\n"
            "        assert callable(getattr(stade_cli, name)), name\n"
            "import stade_cli.evaluation, stade_cli.pruning, stade_cli.report, stade_cli.zeroshot, stade_cli.cli.app\n"
            "for name in ('calibrate', 'prune', 'evaluate', 'zero_shot', 'inspect'):\n"
            "    assert callable(getattr(stade_cli, name)), name\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_arguments_of_the_wrong_python_type_are_named(tiny_llama, tmp_path):
    from stade_cli import calibrate, evaluate, prune
    from stade_cli.errors import UsageError, check_types

    for call, text in [(lambda: prune(tiny_llama, tmp_path / "a", sparsity="0.5"), "sparsity must be a number"),
                       (lambda: prune(tiny_llama, tmp_path / "a", experts="4"), "experts must be a whole number"),
                       (lambda: calibrate(tiny_llama, tmp_path / "s", dataset="builtin", nsamples=2.5),
                        "nsamples must be a whole number"),
                       (lambda: evaluate(tiny_llama, dataset="builtin", max_windows="1"),
                        "max_windows must be a whole number")]:
        with pytest.raises(UsageError, match=text):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()

    def f(a: float = 0.5, b: int | None = None, c: str = "x", d: bool = False, e: list | None = None) -> None: ...

    check_types(f, {"a": 1, "b": 3, "c": "y", "d": True, "e": [1]})           # an int is a float
    for values in ({"a": True}, {"b": 1.0}, {"c": 3}, {"d": "yes"}):
        with pytest.raises(UsageError):
            check_types(f, values)
