"""Smoke tests of the benchmark scripts: each runs end to end on a tiny model and writes finite numbers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quality_smoke(tiny_llama, text_file, tmp_path):
    out = tmp_path / "quality"
    proc = _run(["bench/quality.py", "--model", str(tiny_llama), "--calib", str(text_file), "--eval", str(text_file),
                 "--metrics", "wanda", "--sparsities", "0.5", "--patterns", "unstructured", "2:4",
                 "--nsamples", "2", "--seqlen", "16", "--max-windows", "2", "--out", str(out)])
    data = json.loads((out / "quality.json").read_text())
    assert (out / "quality.md").is_file()
    assert _finite(data["dense"]["ppl"]) and data["dense"]["ppl"] > 1
    assert [c["label"] for c in data["cells"]] == ["50%", "2:4"]
    (row,) = data["rows"]
    assert row["label"] == "wanda"
    for label in ("50%", "2:4"):
        cell = row["cells"][label]
        assert _finite(cell["ppl"]) and cell["ppl"] > 1, cell
        assert _finite(cell["seconds"])
        assert abs(cell["achieved_sparsity"] - 0.5) < 0.05
    # the table on stdout: dense first, then the metric
    lines = [l for l in proc.stdout.splitlines() if l.startswith("|")]
    assert lines[0].split("|")[2].strip() == "50%" and lines[2].startswith("| dense") and lines[3].startswith("| wanda")
    assert not list(tmp_path.glob("**/model.safetensors"))  # pruned checkpoints are not left behind


def test_speed_smoke(tiny_llama, text_file, tmp_path):
    out = tmp_path / "speed.json"
    proc = _run(["bench/speed.py", "--model", str(tiny_llama), "--calib", str(text_file), "--nsamples", "2",
                 "--seqlen", "16", "--repeats", "1", "--warmup", "0", "--metrics", "wanda", "--patterns", "2:4",
                 "--sizes", "0.01,0.02", "--shard-gb", "0.005", "--json", "--out", str(out)])
    data = json.loads(out.read_text())
    assert json.loads(proc.stdout) == data
    kinds = [f["kind"] for f in data["figures"]]
    assert kinds == ["calibrate", "prune", "solver", "update", "update", "memory", "memory", "eval"]
    for f in data["figures"]:
        assert _finite(f["ratio"]) and f["ratio"] > 0, f
        assert isinstance(f["pass"], bool)
    mem = [f for f in data["figures"] if f["kind"] == "memory"]
    assert all(_finite(f["peak_rss_gb"]) and f["peak_rss_gb"] > 0 for f in mem)
    assert mem[0]["total_gb"] < mem[1]["total_gb"]
    prune = next(f for f in data["figures"] if f["kind"] == "prune")
    assert _finite(prune["secondary"]["ratio"])
    solver = next(f for f in data["figures"] if f["kind"] == "solver")
    assert solver["measured_s"] > 0 and solver["baseline_s"] > 0 and solver["pass"]   # recorded, no target
    updates = [f for f in data["figures"] if f["kind"] == "update"]
    assert [f["figure"].split(" / ")[0] for f in updates] == ["prune wanda + admm", "prune wanda + admm gradual"]
    assert all(f["baseline_s"] == solver["measured_s"] and f["target"] == 1.0 for f in updates)   # against sparsegpt
    ev = next(f for f in data["figures"] if f["kind"] == "eval")
    assert ev["check"]["agree"], ev["check"]


def test_table_merges_files_of_one_protocol(tmp_path):
    """bench/table.py: rows from several result files side by side, renamed; files whose dense perplexities
    differ (another protocol) are refused."""
    def result(dense, label, cells):
        return {"settings": {"model": "m"}, "dense": {"ppl": dense},
                "cells": [{"label": c, "pattern": "unstructured", "sparsity": 0.5, "implied_sparsity": 0.5}
                          for c in cells],
                "rows": [{"label": label, "cells": {c: {"ppl": 10.0 + i, "prune_seconds": 2.0}
                                                    for i, c in enumerate(cells)}}]}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(result(5.0, "wanda", ["50%"])))
    b.write_text(json.dumps(result(5.0, "wanda:update=admm", ["50%", "60%"])))
    c.write_text(json.dumps(result(6.0, "other", ["50%"])))
    out = tmp_path / "out"
    proc = _run(["bench/table.py", str(a), str(b), "--cells", "60%", "50%", "--label",
                 "wanda:update=admm -> wanda + admm", "--out", str(out)])
    assert proc.stdout.startswith("| method | 60% | 50% |\n")
    assert "| wanda |  | 10.00 |" in proc.stdout and "| wanda + admm | 11.00 | 10.00 |" in proc.stdout
    assert json.loads((out / "table.json").read_text())["rows"][1]["label"] == "wanda + admm"
    bad = subprocess.run([sys.executable, "bench/table.py", str(a), str(c), "--out", str(tmp_path / "x")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not the same protocol" in bad.stderr


def test_experts_smoke(tiny_factory, text_file, tmp_path):
    """bench/experts.py on a tiny Qwen2-MoE: the full model, then 2 of 4 experts kept by each ranking (and once
    more with wanda on top): finite perplexities, and every pruned checkpoint smaller than the model."""
    model = tiny_factory("qwen2_moe")
    stats = tmp_path / "stats"
    _run(["-m", "stade_cli", "calibrate", str(model), "-o", str(stats), "--dataset", str(text_file), "--nsamples", "4",
          "--seqlen", "16"])
    out = tmp_path / "experts"
    proc = _run(["bench/experts.py", "--model", str(model), "--stats", str(stats), "--eval", str(text_file),
                 "--experts", "2", "--scores", "reap", "frequency", "random", "--then", "wanda", "--seqlen", "16",
                 "--max-windows", "2", "--out", str(out)])
    data = json.loads((out / "experts.json").read_text())
    assert data["full"]["experts"] == 4 and _finite(data["full"]["ppl"])
    assert [(r["score"], r["then"]) for r in data["rows"]] == [("reap", None), ("frequency", None),
                                                               ("random", None), ("reap", "wanda")]
    for r in data["rows"]:
        assert _finite(r["ppl"]) and r["ppl"] > 1 and 0 < r["bytes"] < data["full"]["bytes"], r
    assert proc.stdout.startswith("| experts kept (of 4) |") and (out / "experts.md").is_file()
    assert not list(tmp_path.glob("**/pruned"))


def test_scale_smoke(tokenizer_dir, text_file, tmp_path):
    """bench/scale.py: a random checkpoint of the exact shape asked for (here the script's tiny one, in three
    shards, its tokenizer cut to the vocabulary), then a few steps measured with their baselines."""
    out, work = tmp_path / "scale", tmp_path / "work"
    proc = _run(["bench/scale.py", "run", "--shape", "tiny", "--work", str(work), "--calib", str(text_file),
                 "--tokenizer", str(tokenizer_dir), "--nsamples", "2", "--seqlen", "16", "--max-windows", "1",
                 "--steps", "roundtrip,forward,calibrate,prune:wanda,eval", "--out", str(out)], timeout=300)
    data = json.loads((out / "scale.json").read_text())
    assert data["checkpoint"]["shards"] == 3
    config = json.loads((work / "tiny" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(work / "tiny" / "model-00001-of-00003.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (1000, 64)
    steps = {s["step"]: s for s in data["steps"]}
    assert list(steps) == ["roundtrip", "forward", "calibrate", "prune:wanda", "eval"]
    for s in steps.values():
        assert s["rc"] == 0 and _finite(s["seconds"]) and s["maxrss"] > 0 and _finite(s["cpu"]), s
    assert steps["calibrate"]["baseline"] == "forward" and steps["prune:wanda"]["baseline"] == "roundtrip"
    assert "| calibrate |" in proc.stdout and not (work / "pruned").exists()


def test_scale_deadline_lists_what_it_had_no_time_for(tokenizer_dir, text_file, tmp_path):
    """A run past its ``--deadline`` starts no step: each is listed as skipped, and the results are written."""
    out, work = tmp_path / "scale", tmp_path / "work"
    proc = _run(["bench/scale.py", "run", "--shape", "tiny", "--work", str(work), "--calib", str(text_file),
                 "--tokenizer", str(tokenizer_dir), "--steps", "roundtrip,calibrate", "--deadline", "0", "--out",
                 str(out)])
    steps = json.loads((out / "scale.json").read_text())["steps"]
    assert steps == [{"step": "roundtrip", "skipped": "out of time (--deadline)"},
                     {"step": "calibrate", "skipped": "out of time (--deadline)"}]
    assert "| calibrate | skipped: out of time (--deadline) |" in proc.stdout
    assert json.loads((work / "tiny" / "random-weights.json").read_text()) == {"seed": 0, "drawn_on": "cpu"}


@pytest.mark.cuda
def test_scale_builds_on_the_gpu(tokenizer_dir, tmp_path):
    """On a GPU the random values are drawn there (Llama-2-7B's in seconds): same shapes, dtype and shards."""
    proc = _run(["bench/scale.py", "build", "--shape", "tiny", "--out", str(tmp_path / "m"), "--tokenizer",
                 str(tokenizer_dir), "--device", "cuda"])
    assert json.loads(proc.stdout)["shards"] == 3 and json.loads(proc.stdout)["drawn_on"] == "cuda"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model-00001-of-00003.safetensors"), "pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    assert t.shape == (1000, 64) and str(t.dtype) == "torch.bfloat16" and 0.015 < t.float().std() < 0.025


def _alive(pid: int) -> bool:
    """Running (a zombie is not: it ended, and where PID 1 does not reap, it stays listed)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


def test_measured_child_is_stopped_as_a_scheduler_stops_it(tmp_path):
    """``_measure.run_child(stop_after=…)``: SIGTERM reaches the command itself (through the measuring wrapper),
    which ends as it chooses; a command that ignores it is killed after the grace period; none is left running."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _measure

    pidfile = tmp_path / "pid"      # each command writes it once its SIGTERM handler is in place
    ends = [sys.executable, "-c", "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
            f"open({str(pidfile)!r} + '.part', 'w').write(str(os.getpid()))\nos.rename({str(pidfile)!r} + '.part', "
            f"{str(pidfile)!r})\ntime.sleep(600)"]
    ignores = ["sh", "-c", f"trap '' TERM; echo $$ > {pidfile}.part; mv {pidfile}.part {pidfile}; exec sleep 600"]
    for cmd, code in ((ends, 3), (ignores, -9)):
        pidfile.unlink(missing_ok=True)
        figures = _measure.run_child(cmd, stop_after=0.5, grace=1.0, ready=pidfile)
        assert figures["stopped"] >= 0.5, figures
        assert figures["rc"] == code, figures       # its handler's exit, or killed after the grace period
        assert not _alive(int(pidfile.read_text()))
    assert "stopped" not in _measure.run_child([sys.executable, "-c", "pass"], stop_after=60)


def test_scale_recipe_smoke(tokenizer_dir, text_file, tmp_path):
    """bench/scale.py's ``prune:recipe`` step (``--recipe best``, the refinement included) from the Gram stats."""
    out, work = tmp_path / "scale", tmp_path / "work"
    _run(["bench/scale.py", "run", "--shape", "tiny", "--work", str(work), "--calib", str(text_file), "--tokenizer",
          str(tokenizer_dir), "--nsamples", "2", "--seqlen", "16", "--steps", "calibrate-gram,prune:recipe", "--out",
          str(out)], timeout=300)
    steps = {s["step"]: s for s in json.loads((out / "scale.json").read_text())["steps"]}
    assert list(steps) == ["calibrate-gram", "prune:recipe"]
    assert steps["prune:recipe"]["rc"] == 0 and _finite(steps["prune:recipe"]["seconds"]), steps
    assert steps["prune:recipe"]["baseline"] == "roundtrip"


def test_structured_smoke(tiny_llama, text_file, tmp_path):
    from typer.testing import CliRunner

    from stade_cli.cli.app import app

    stats = tmp_path / "stats"
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama), "--dataset", str(text_file), "--nsamples", "2",
                                      "--seqlen", "16", "--gram", "-o", str(stats)])
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "structured"
    proc = _run(["bench/structured.py", "--model", str(tiny_llama), "--stats", str(stats), "--eval", str(text_file),
                 "--fractions", "0.5", "--channels", "magnitude", "stade:update=admm", "--unstructured", "wanda",
                 "--seqlen", "16", "--max-windows", "2", "--speed", "--speed-at", "0.5", "--out", str(out)])
    data = json.loads((out / "structured.json").read_text())
    assert data["errors"] == 0 and _finite(data["dense"]["ppl"])
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["channels: magnitude", "channels: stade:update=admm", "blocks", "unstructured: wanda"]
    for row in data["rows"]:
        cell = row["cells"]["0.5"]
        assert _finite(cell["ppl"]) and cell["ppl"] > 1, (row["label"], cell)
        assert 0.35 < cell["params_removed_of_blocks"] < 0.65, (row["label"], cell)   # the same count, near 50%
    speed = {s["label"]: s for s in data["speed"]}
    assert set(speed) == {"dense", "channels (stade) at 50%", "blocks at 50%"}
    assert speed["blocks at 50%"]["params"] < speed["dense"]["params"]
    assert all(_finite(s["prefill_tokens_per_s"]) and _finite(s["decode_tokens_per_s"]) for s in speed.values())
    assert "| dense |" in proc.stdout and "decode ×" in proc.stdout
    assert not list(tmp_path.glob("**/model.safetensors"))   # the pruned checkpoints are removed


def test_beyond_smoke(tiny_llama, text_file, tmp_path):
    """bench/beyond.py: one prune per entry × cell, evaluated on each text alone; an impossible entry is refused
    before any work."""
    stats = tmp_path / "stats"
    _run(["-m", "stade_cli", "calibrate", str(tiny_llama), "-o", str(stats), "--dataset", str(text_file),
          "--nsamples", "4", "--seqlen", "16", "--gram"])
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    out = tmp_path / "beyond"
    _run(["bench/beyond.py", "--model", str(tiny_llama), "--stats", str(stats), "--eval", f"a={text_file}",
          f"b={other}", f"c=draw:{text_file}@7", "--entries", "wanda:update=admm", "wanda:recipe=best,refine_samples=2,refine_seqlen=16",
          "--sparsities", "0.5", "--patterns", "unstructured", "2:4",
          "--seqlen", "16", "--max-windows", "2", "--out", str(out)])
    data = json.loads((out / "beyond.json").read_text())
    assert set(data["texts"]) == {"a", "b", "c"} and all(_finite(t["ppl"]) for t in data["texts"].values())
    assert data["texts"]["c"]["windows"] == 2 and data["texts"]["c"]["ppl"] != data["texts"]["a"]["ppl"]
    plain, recipe = data["rows"]
    for row in (plain, recipe):
        for label in ("50%", "2:4"):
            cell = row["cells"][label]
            assert set(cell["ppl"]) == {"a", "b", "c"} and all(_finite(v) and v > 1 for v in cell["ppl"].values())
            assert _finite(cell["prune_seconds"]) and abs(cell["sparsity"] - 0.5) < 0.05
    assert recipe["cells"]["50%"]["recipe"]["name"] == "best"
    from stade_cli.recipes import RECIPES

    steps = dict(RECIPES["best"].values)["refine"]
    assert recipe["cells"]["50%"]["refine"]["steps"] == steps and recipe["cells"]["50%"]["refine"]["samples"] == 2
    md = (out / "beyond.md").read_text()
    assert "**a** (dense" in md and "**b** (dense" in md and "prune seconds" in md
    assert not list(tmp_path.glob("**/model.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    refused = subprocess.run([sys.executable, "bench/beyond.py", "--model", str(tiny_llama), "--stats", str(stats),
                              "--eval", f"a={text_file}", "--entries", "sparsegpt:update=admm,admm_gradual=true",
                              "--out", str(tmp_path / "refused")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
    assert refused.returncode != 0 and "sparsegpt has none" in refused.stderr   # no scores to re-choose from
    assert not (tmp_path / "refused").exists()


def test_beyond_draws_held_out_windows_as_calibrate_does(tiny_llama, text_file, monkeypatch):
    """``draw:SPEC@SEED``: the windows ``calibrate`` would draw with that seed, scored by the model's own mean
    next-token loss (the slow way: one window at a time through transformers)."""
    import argparse
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stade_cli.data import calibration_windows, load_corpus
    from stade_cli.runtime import Reporter

    monkeypatch.syspath_prepend(str(ROOT / "bench"))          # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("beyond", ROOT / "bench" / "beyond.py")
    beyond = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(beyond)
    args = argparse.Namespace(seqlen=16, max_windows=3, device="cpu")
    got = beyond.perplexity_on(str(tiny_llama), f"draw:{text_file}@7", args, Reporter())
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama), load_corpus(str(text_file), "calibration"),
                                  3, 16, 7, 10_000)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert got["windows"] == 3
    assert math.isclose(got["ppl"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    other = beyond.perplexity_on(str(tiny_llama), f"draw:{text_file}@8", args, Reporter())
    assert other["ppl"] != got["ppl"]                       # another seed, other windows
    try:
        beyond.perplexity_on(str(tiny_llama), f"draw:{text_file}", args, Reporter())
    except SystemExit as exc:
        assert "draw:SPEC@SEED" in str(exc)
    else:
        raise AssertionError("a draw without a seed was accepted")


def _beyond_run(path: Path, rows: dict[str, dict[str, float]], dense: float = 20.0, text: str = "a",
                **settings) -> Path:
    """A beyond.py result folder with the given entry → {cell label: perplexity on ``text``}."""
    labels = list(dict.fromkeys(c for cells in rows.values() for c in cells))
    result = {"settings": {"model": "m", "stats": "s", "eval": ["a=a.txt"], "entries": list(rows),
                           "sparsities": [0.5], "patterns": ["unstructured"], "seqlen": 16, "max_windows": 2,
                           "seed": 0, "device": "cpu", **settings},
              "started": "2026-12-05T00:00:00", "texts": {text: {"file": "a.txt", "ppl": dense, "windows": 2}},
              "cells": [{"label": c, "pattern": "unstructured" if c.endswith("%") else c,
                         "sparsity": float(c[:-1]) / 100 if c.endswith("%") else None,
                         "implied_sparsity": float(c[:-1]) / 100 if c.endswith("%") else 0.5} for c in labels],
              "rows": [{"entry": e, "cells": {c: {"ppl": {text: v}, "sparsity": 0.5, "prune_seconds": 1.0,
                                                  "prune_cpu_seconds": 2.0, "recipe": None, "refine": None}
                                              for c, v in cells.items()}} for e, cells in rows.items()]}
    path.mkdir()
    (path / "beyond.json").write_text(json.dumps(result))
    return path


def test_beyond_merge_fills_the_cells_a_stopped_run_left_out(tmp_path):
    """``--render --merge RUN``: the other run's cells join the table (a new column, a new row), recorded under
    ``merged``; another protocol, another text, or a cell in both is refused and changes nothing."""
    table = _beyond_run(tmp_path / "table", {"plain": {"50%": 30.0, "70%": 60.0}, "gradual": {"50%": 28.0}})
    later = _beyond_run(tmp_path / "later", {"gradual": {"70%": 50.0, "2:4": 40.0}, "seq": {"50%": 29.0}})
    _run(["bench/beyond.py", "--model", "m", "--stats", "s", "--eval", "a=a.txt", "--entries", "x",
          "--out", str(table), "--render", "--merge", str(later)])
    data = json.loads((table / "beyond.json").read_text())
    assert [c["label"] for c in data["cells"]] == ["50%", "70%", "2:4"]
    got = {r["entry"]: {c: v["ppl"]["a"] for c, v in r["cells"].items()} for r in data["rows"]}
    assert got == {"plain": {"50%": 30.0, "70%": 60.0}, "gradual": {"50%": 28.0, "70%": 50.0, "2:4": 40.0},
                   "seq": {"50%": 29.0}}
    assert list(got["gradual"]) == ["50%", "70%", "2:4"]          # in the table's column order
    (record,) = data["merged"]
    assert record["from"] == str(later) and record["cells"] == {"gradual": ["2:4", "70%"], "seq": ["50%"]}
    md = (table / "beyond.md").read_text()
    assert "| gradual | 28.00 (1.40×) | 50.00 (2.50×) | 40.00 (2.00×) |" in md
    assert "| plain | 30.00 (1.50×) | 60.00 (3.00×) | – |" in md

    before = (table / "beyond.json").read_text()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cases = {"again": (later, "is in both"),
             "other-dense": (_beyond_run(tmp_path / "d", {"x": {"80%": 9.0}}, dense=21.0), "dense perplexity"),
             "other-seed": (_beyond_run(tmp_path / "s", {"x": {"80%": 9.0}}, seed=1), "another protocol"),
             "other-text": (_beyond_run(tmp_path / "t", {"x": {"80%": 9.0}}, text="b"), "evaluates b, this table a")}
    for name, (run, message) in cases.items():
        proc = subprocess.run([sys.executable, "bench/beyond.py", "--model", "m", "--stats", "s", "--eval", "a=a.txt",
                               "--entries", "x", "--out", str(table), "--render", "--merge", str(run)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, (name, proc.stderr)
        assert (table / "beyond.json").read_text() == before, name
    proc = subprocess.run([sys.executable, "bench/beyond.py", "--model", "m", "--stats", "s", "--eval", "a=a.txt",
                           "--entries", "x", "--out", str(table), "--merge", str(later)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--merge goes with --render" in proc.stderr
