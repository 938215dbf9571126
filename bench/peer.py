#!/usr/bin/env python
"""Peer benchmark: llm-compressor's Wanda and SparseGPT on exactly stade's calibration and evaluation windows.

Runs in stade's environment. llm-compressor gets a virtual environment of its own (created on first use,
reused after): the calibration windows are built here with stade's own functions (those of `stade calibrate`),
saved as a tensor, and each method × cell is pruned by a child process in that environment
(bench/_peer_child.py: ``oneshot`` with ``WandaPruningModifier`` / ``SparseGPTModifier``), which saves a dense
checkpoint; back here it is evaluated as `stade eval` does and its sparsity is read from the tensors. The
child's CPU seconds (user + sys), wall seconds and peak RSS are recorded. stdout: a markdown table;
stderr: progress. Writes OUT/peer.json and OUT/peer.md.

    python bench/peer.py --model ~/.cache/stade-assets/smollm2-135m \
        --calib A/emma.txt A/mansfieldpark.txt --eval A/prideprejudice.txt \
        --methods wanda sparsegpt --sparsities 0.5 0.6 --patterns unstructured 2:4

lm_head is ignored with the regex ``re:.*lm_head.*``: llm-compressor 0.14 names it ``lm_head.`` (a trailing
dot), so ``ignore=["lm_head"]`` matches nothing and the head (the input embeddings, when tied) is pruned
silently. Every pruned checkpoint is checked: no tensor outside the decoder linears may gain zeros.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/peer.py` without installing the package
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles, protocol_arguments  # noqa: E402

from stade_cli.errors import StadeError  # noqa: E402
from stade_cli.sweep import cell_specs, fmt_ppl, markdown as ppl_table  # noqa: E402

CHILD = Path(__file__).resolve().parent / "_peer_child.py"
METHODS = ("wanda", "sparsegpt")
LLMCOMPRESSOR_VERSION = "0.14.0.1"   # installs beside torch 2.13 (CPU) and runs both modifiers on the CPU
DEFAULT_VENV = "~/.cache/stade-bench/llmcompressor-venv"
SPARSITY_TOLERANCE = 0.01   # SparseGPT's per-block threshold keeps ties: a few weights a layer over the target
RESULTS = ResultFiles("bench/peer.py", "peer", ("settings", "cells", "rows", "llmcompressor"), ("peer.md",))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the venv

def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def venv_versions(python: Path) -> dict | None:
    """The venv's torch and llm-compressor versions, or None when it has not both (or cannot run)."""
    if not python.is_file():
        return None
    code = ("import json, torch, llmcompressor, transformers; print(json.dumps({'torch': torch.__version__, "
            "'llmcompressor': llmcompressor.__version__, 'transformers': transformers.__version__}))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _pip(python: Path, args: list[str], logfile: Path) -> None:
    cmd = [str(python), "-m", "pip", "install", *args]
    with open(logfile, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(logfile.read_text(errors="replace").splitlines(True)[-15:])
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {rc}); see {logfile}:\n{tail}")


def ensure_venv(venv: Path, torch_version: str, lc_version: str) -> dict:
    """The venv with torch==``torch_version`` (first, so pip never pulls another build) and llmcompressor;
    nothing is installed when it already has both at those versions."""
    python = venv / "bin" / "python"
    have = venv_versions(python)
    if (have and have["torch"].split("+")[0] == torch_version
            and (lc_version in ("", "latest") or have["llmcompressor"] == lc_version)):
        log(f"reusing {venv} (llm-compressor {have['llmcompressor']}, torch {have['torch']})")
        return have
    logfile = venv.parent / f"{venv.name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.is_file():
        log(f"creating the virtual environment {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"installing torch=={torch_version} and llmcompressor into {venv} (log: {logfile})")
    _pip(python, [f"torch=={torch_version}"], logfile)
    pin = venv / "stade-bench-constraints.txt"   # llmcompressor's requirements must not move torch
    pin.write_text(f"torch=={torch_version}\n")
    _pip(python, ["-c", str(pin), "llmcompressor" + (f"=={lc_version}" if lc_version not in ("", "latest") else "")],
         logfile)
    have = venv_versions(python)
    if have is None:
        raise SystemExit(f"error: {python} cannot import torch and llmcompressor after installing; see {logfile}")
    log(f"installed llm-compressor {have['llmcompressor']} (torch {have['torch']})")
    return have


# ---------------------------------------------------------------------------------------------- checks

def other_zeros(path: Path) -> dict[str, int]:
    """Zero counts of every tensor of the checkpoint that is not a decoder linear (stade's targets):
    embeddings, lm_head, norms. Pruning must leave them all as they were."""
    from stade_cli.arch import describe, meta_model
    from stade_cli.checkpoint import ShardReader, load_config, weight_files

    targets = describe(meta_model(load_config(path))).by_key()
    out = {}
    for fname in weight_files(path):
        with ShardReader(path / fname) as f:
            for key in f.keys():
                if key not in targets:
                    out[key] = int((f.get_tensor(key) == 0).sum())
    return out


def checkpoint_sparsity(path: Path, cell: dict) -> dict:
    """Achieved sparsity of the decoder linears, from the tensors (stade's inspect), and the N:M check."""
    from stade_cli.report import inspect

    s = inspect(path, pattern=cell["pattern"] if cell["pattern"] != "unstructured" else None)
    per_layer = [layer["sparsity"] for layer in s["layers"].values()]
    out = {"achieved_sparsity": s["overall"]["sparsity"], "layers": len(per_layer),
           "layer_sparsity_min": min(per_layer), "layer_sparsity_max": max(per_layer)}
    if "nm_ok" in s:
        out["nm_ok"] = s["nm_ok"]
    return out


# ---------------------------------------------------------------------------------------------- one cell

def run_child(python: Path, spec: dict, work: Path, logfile: Path) -> dict:
    """The child on ``spec``; its CPU seconds (user + sys, the RUSAGE_CHILDREN difference around it), wall
    seconds and peak RSS (ru_maxrss of exactly this child, from wait4: RUSAGE_CHILDREN's is the maximum over
    every child so far)."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)     # a previous cell's report must never pass for this one's
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.Popen([str(python), str(CHILD), str(spec_path)], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = {"cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
            "wall_seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # KiB on Linux
    if proc.returncode != 0:
        lines = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else "(no output)"
        raise ChildError(f"llm-compressor child exited {proc.returncode}: {last}", cost, lines[-25:])
    return {**cost, "child": json.loads(Path(spec["result"]).read_text())}


class ChildError(RuntimeError):
    def __init__(self, msg: str, cost: dict, tail: list[str]):
        super().__init__(msg)
        self.cost, self.tail = cost, tail


def run_cell(python: Path, model: Path, calib: Path, method: str, cell: dict, work: Path, evaluation: dict,
             baseline_zeros: dict, device: str, reporter) -> dict:
    from stade_cli.evaluation import evaluate

    if cell["pattern"] == "unstructured":
        sparsity, mask = cell["sparsity"], "0:0"
    else:   # stade's N:M keeps N of every M weights; llm-compressor's mask_structure "N:M" prunes N of every M
        n, m = (int(v) for v in cell["pattern"].split(":"))
        sparsity, mask = cell["implied_sparsity"], f"{m - n}:{m}"
    ckpt = work / "pruned"
    shutil.rmtree(ckpt, ignore_errors=True)        # ours: inside the scratch dir this script made
    logfile = work / "logs" / f"{method}-{cell['label'].replace('%', 'pct').replace(':', '-')}.log"
    logfile.parent.mkdir(exist_ok=True)
    spec = {"model": str(model), "calib": str(calib), "method": method, "sparsity": sparsity,
            "mask_structure": mask, "out": str(ckpt), "result": str(work / "child.json")}
    try:
        res = run_child(python, spec, work, logfile)
        t0 = time.perf_counter()
        ev = evaluate(str(ckpt), device=device, reporter=reporter, **evaluation)
        eval_seconds = round(time.perf_counter() - t0, 2)
        sp = checkpoint_sparsity(ckpt, cell)
        now = other_zeros(ckpt)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    child = res.pop("child")
    cell_out = {"ppl": ev["ppl"], "nll": ev["nll"], **sp, **res,
                "oneshot_cpu_seconds": child["oneshot_cpu_seconds"],
                "oneshot_wall_seconds": child["oneshot_wall_seconds"], "eval_seconds": eval_seconds,
                "sparsity_arg": sparsity, "mask_structure": mask, "pruned_linears": child["pruned_linears"],
                "unpruned_linears": child["unpruned_linears"], "embedding_zeros": child["embedding_zeros"]}
    problems = []
    changed = {k: [baseline_zeros.get(k), v] for k, v in now.items() if v != baseline_zeros.get(k)}
    missing = sorted(set(baseline_zeros) - set(now))
    if changed or missing:   # e.g. lm_head / tied embeddings pruned: the numbers would not be comparable
        problems.append(f"tensors outside the decoder linears changed their zeros (before, after): {changed}"
                        + (f"; missing from the checkpoint: {missing}" if missing else ""))
    if abs(sp["achieved_sparsity"] - cell["implied_sparsity"]) > SPARSITY_TOLERANCE:
        problems.append(f"achieved sparsity {sp['achieved_sparsity']:.4f} is not the target {cell['implied_sparsity']:g}")
    if sp.get("nm_ok") is False:
        problems.append(f"the decoder linears do not conform to {cell['pattern']} (at most {cell['pattern']} non-zeros)")
    if problems:
        cell_out["error"] = "; ".join(problems)
    return cell_out


# ---------------------------------------------------------------------------------------------- outputs

def markdown(result: dict) -> str:
    """The perplexity table (a row per method, a column per cell, dense on top), then the cost of each cell."""
    lc = result["llmcompressor"].get("llmcompressor") or "?"
    cal = result.get("calibration") or {}
    lines = [f"llm-compressor {lc}; calibration {cal.get('nsamples', '?')} × {cal.get('seqlen', '?')} tokens; "
             f"evaluation {(result.get('dense') or {}).get('windows', '?')} windows × {result['settings']['seqlen']}",
             "", ppl_table(result).rstrip("\n"), "",
             "| method | cell | ppl | sparsity | CPU s | wall s | peak RSS MB | oneshot CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for c in result["cells"]:
            cell = row["cells"].get(c["label"])
            if cell is None:
                continue
            sp = cell.get("achieved_sparsity")
            ppl = fmt_ppl(cell.get("ppl"))
            vals = [f"{ppl} (failed check)" if cell.get("error") and cell.get("ppl") is not None else ppl,
                    f"{sp:.2%}" if sp is not None else "", cell.get("cpu_seconds", ""), cell.get("wall_seconds", ""),
                    cell.get("peak_rss_mb", ""), cell.get("oneshot_cpu_seconds", "")]
            lines.append(f"| {row['label']} | {c['label']} | " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    RESULTS.write(out, result, {"peer.md": markdown(result)})


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(p, "device of the evaluations here (llm-compressor runs on the CPU)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="llm-compressor methods (default: wanda sparsegpt)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer"))
    p.add_argument("--venv", default=DEFAULT_VENV,
                   help=f"llm-compressor's virtual environment, created when missing (default: {DEFAULT_VENV})")
    p.add_argument("--llmcompressor-version", default=LLMCOMPRESSOR_VERSION,
                   help=f"version installed into a new venv (default: {LLMCOMPRESSOR_VERSION}; 'latest': unpinned)")
    p.add_argument("--torch-version", default=None,
                   help="torch installed into the venv first (default: this environment's, e.g. 2.13.0)")
    p.add_argument("--workdir", default=None,
                   help="the scratch directory (windows, child logs, one pruned checkpoint at a time) is a new one "
                        "inside it, kept apart from the checkpoints (default: a temp dir, removed)")
    args = p.parse_args(argv)

    import torch

    from stade_cli.checkpoint import resolve_model
    from stade_cli.evaluation import evaluate
    from stade_cli.loading import CalibrationSpec, Runtime
    from stade_cli.runtime import StderrReporter

    reporter = StderrReporter()
    try:
        cells = cell_specs(args.sparsities, args.patterns)
    except StadeError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not cells:
        raise SystemExit("error: no cells (give --sparsities and/or --patterns)")
    methods = list(dict.fromkeys(args.methods))
    calib = ",".join(str(Path(f).expanduser()) for f in args.calib)   # as `--dataset a,b,c`: joined in order
    evalset = ",".join(str(Path(f).expanduser()) for f in args.eval)
    out = Path(args.out).expanduser()
    RESULTS.check(out)
    started = time.perf_counter()
    venv = Path(args.venv).expanduser().absolute()
    versions = ensure_venv(venv, args.torch_version or _torch_version(), args.llmcompressor_version)

    result = {
        "settings": {"model": args.model, "calib": args.calib, "eval": args.eval, "methods": methods,
                     "sparsities": args.sparsities, "patterns": args.patterns, "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "max_windows": args.max_windows, "seed": args.seed,
                     "device": args.device, "venv": str(venv), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "started": _dt.datetime.now().isoformat(timespec="seconds")},
        "llmcompressor": versions, "cells": cells, "calibration": None, "dense": None, "rows": [], "errors": 0,
    }
    base = Path(args.workdir).expanduser() if args.workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stade-peer-", dir=base))
    errors = 0
    try:
        try:
            source = resolve_model(args.model)
            rt = Runtime.of(source, "cpu")
            log(f"calibration windows from {calib}: {args.nsamples} × {args.seqlen}, seed {args.seed}")
            # exactly `stade calibrate`'s windows: the same spec, the same tokenizer, the same seeded sampling
            windows = CalibrationSpec(calib, args.nsamples, args.seqlen, args.seed).windows(rt)
        except StadeError as exc:
            raise SystemExit(f"error: {exc}") from None
        calib_path = work / "calib_input_ids.pt"
        torch.save(windows.contiguous().clone(), calib_path)
        result["calibration"] = {"dataset": calib, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                                 "seed": args.seed, "tokens": int(windows.numel()),
                                 "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
        baseline_zeros = other_zeros(source.path)

        log("evaluating the dense model")
        evaluation = {"dataset": evalset, "seqlen": args.seqlen, "max_windows": args.max_windows}
        t0 = time.perf_counter()
        dense = evaluate(str(source.path), device=args.device, reporter=reporter, **evaluation)
        result["dense"] = {"ppl": dense["ppl"], "nll": dense["nll"], "windows": dense["windows"],
                           "tokens": dense["tokens"], "seconds": round(time.perf_counter() - t0, 2)}
        log(f"dense: ppl {dense['ppl']:.2f} ({dense['windows']} windows × {dense['seqlen']})")
        write_outputs(result, out)

        python = venv / "bin" / "python"
        for method in methods:
            row = {"label": f"llm-compressor {method}", "method": method, "cells": {}}
            result["rows"].append(row)
            for c in cells:
                log(f"{method} @ {c['label']}: llm-compressor oneshot")
                t0 = time.perf_counter()
                try:
                    cell = run_cell(python, source.path, calib_path, method, c, work, evaluation, baseline_zeros,
                                    args.device, reporter)
                    if cell.get("error"):
                        errors += 1
                        log(f"{method} @ {c['label']}: FAILED CHECK: {cell['error']}")
                    else:
                        log(f"{method} @ {c['label']}: ppl {cell['ppl']:.2f} (sparsity {cell['achieved_sparsity']:.2%}, "
                            f"{cell['cpu_seconds']} CPU s, {cell['wall_seconds']} s, {cell['peak_rss_mb']} MB)")
                except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                    errors += 1
                    cell = {"ppl": None, "error": f"{type(exc).__name__}: {exc}",
                            "seconds": round(time.perf_counter() - t0, 2)}
                    if isinstance(exc, ChildError):
                        cell.update(exc.cost)
                        cell["log_tail"] = exc.tail
                    log(f"{method} @ {c['label']}: FAILED: {cell['error']}")
                    if os.environ.get("STADE_DEBUG"):
                        traceback.print_exc()
                        print("\n".join(cell.get("log_tail", [])), file=sys.stderr)
                row["cells"][c["label"]] = cell
                result["errors"] = errors
                write_outputs(result, out)
    finally:
        if base is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "pruned", ignore_errors=True)
            log(f"scratch (windows, child logs) kept in {work}")

    result["settings"]["total_seconds"] = round(time.perf_counter() - started, 2)
    write_outputs(result, out)
    log(f"wrote {out / 'peer.json'} and {out / 'peer.md'}")
    sys.stdout.write(markdown(result))
    sys.stdout.flush()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
