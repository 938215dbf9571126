#!/usr/bin/env python
"""Speed and memory benchmark: every figure is a ratio against a baseline measured in the same run.

Figures (median of --repeats timed runs after --warmup untimed ones; library and baseline interleaved,
the order rotated every round):

  calibrate   collect_moments (the forward part of calibration: hooks + moments) over the same decoder
              call with no hooks, ``model.base_model(input_ids=b, use_cache=False)``, on the same windows,
              batch size 1, torch.inference_mode. Secondary: over a plain ``model(input_ids=b)`` (LM head
              and KV cache included, as a user would write it). Target ≤ 1.10.
  prune       ``stade_cli.pruning.prune(..., stats=STATS)`` in-process over a plain safetensors round trip of
              the same shards (safe_open, get_tensor every tensor, save_file each shard). Secondary: the CLI
              ``python -m stade_cli -q prune ...`` as a subprocess (interpreter and import start-up included)
              over the same baseline. One row per metric × pattern. Target ≤ 1.5.
  memory      peak RSS of ``python -m stade_cli -q prune SYNTH --stats STATS --metric wanda --sparsity 0.5``
              on synthetic random Llama checkpoints of growing size, in shards of --shard-gb; bound
              2 × largest shard + 0.6 GB; the ratio is peak / bound. Target ≤ 1.0 (flat in the total size).
  eval        ``stade_cli.evaluation.perplexity`` over a plain loop ``model(input_ids=b, use_cache=False).logits``
              → summed cross entropy, same windows. Target ≤ 1.05.

GB means 10⁹ bytes throughout. stdout: a table (or JSON with --json); stderr: progress.

    python bench/speed.py --model ~/.cache/stade-assets/smollm2-135m --calib ../shared/data/austen/emma.txt
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/speed.py` without installing the package
    sys.path.insert(0, str(ROOT))

GB = 1e9
TARGETS = {"calibrate": 1.10, "prune": 1.5, "memory": 1.0, "eval": 1.05, "solver": math.inf,  # solver: recorded
           "update": 1.0}     # --update admm (and gradual) no slower than sparsegpt from the same stats


import _measure  # noqa: E402
import _shards  # noqa: E402
from stade_cli.errors import OutputError  # noqa: E402
from stade_cli.outputs import check_file, json_with_keys, replace_file  # noqa: E402

_OURS = json_with_keys("settings", "environment", "figures")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- timing

def interleaved(fns: dict, repeats: int, warmup: int, cleanup=None) -> dict[str, list[float]]:
    """Run every fn ``warmup`` times untimed, then ``repeats`` timed rounds, rotating the order per round.

    Returns wall seconds per fn, and under ``cpu:NAME`` the CPU seconds (this process's threads, plus any
    child it reaped) of the same runs: a diagnostic when other jobs share the cores.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    times.update({f"cpu:{n}": [] for n in names})
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            c0 = _cpu()
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            cpu = _cpu() - c0
            if cleanup:
                cleanup()
            if r >= warmup:
                times[name].append(dt)
                times[f"cpu:{name}"].append(cpu)
    return times


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu_ratio(t: dict, measured: str, baseline: str) -> float:
    """Median CPU seconds over median CPU seconds: less sensitive than wall time to other jobs on the cores."""
    base = med(t[f"cpu:{baseline}"])
    return med(t[f"cpu:{measured}"]) / base if base > 0 else float("nan")


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time, exit code and peak RSS in bytes (``_measure.run_child``)."""
    return _measure.run_child(cmd, env)


child_env = _measure.child_env


def figure(kind: str, name: str, ratio: float, **extra) -> dict:
    target = TARGETS[kind]
    ok = bool(math.isfinite(ratio) and ratio <= target)
    return {"kind": kind, "figure": name, "ratio": ratio, "target": target, "pass": ok, **extra}


# ---------------------------------------------------------------------------------------------- calibrate

def bench_calibrate(model, windows, dev, args) -> dict:
    import torch

    from stade_cli.arch import describe
    from stade_cli.calibration.runner import collect_moments

    arch = describe(model)
    body = model.base_model
    batches = windows.split(1)

    @torch.inference_mode()
    def body_loop():
        for b in batches:
            body(input_ids=b.to(dev), use_cache=False)

    @torch.inference_mode()
    def full_loop():
        for b in batches:
            model(input_ids=b.to(dev))

    def library():
        collect_moments(model, arch, windows, dev, 1)

    log(f"calibrate: {len(windows)} windows × {windows.shape[1]} tokens, {args.repeats} rounds")
    t = interleaved({"library": library, "body": body_loop, "full": full_loop}, args.repeats, args.warmup)
    lib, base, full = med(t["library"]), med(t["body"]), med(t["full"])
    return figure("calibrate", "calibrate (collect_moments) / decoder forward without hooks", lib / base,
                  measured_s=lib, baseline_s=base, samples=t, cpu_ratio=cpu_ratio(t, "library", "body"),
                  secondary={"label": "vs plain model(input_ids)", "ratio": lib / full, "baseline_s": full})


# -------------------------------------------------------------------------------------------------- eval

def bench_eval(model, windows, dev, args) -> dict:
    import torch
    import torch.nn.functional as F

    from stade_cli.evaluation import perplexity

    batches = windows.split(1)
    out = {}

    @torch.inference_mode()
    def plain():
        total = 0.0
        for b in batches:
            b = b.to(dev)
            logits = model(input_ids=b, use_cache=False).logits
            total += float(F.cross_entropy(logits[0, :-1], b[0, 1:], reduction="sum"))
        out["plain"] = total / (windows.shape[0] * (windows.shape[1] - 1))

    def library():
        out["library"] = perplexity(model, windows, dev)[0]

    log(f"eval: {len(windows)} windows × {windows.shape[1]} tokens, {args.repeats} rounds")
    t = interleaved({"library": library, "plain": plain}, args.repeats, args.warmup)
    lib, base = med(t["library"]), med(t["plain"])
    return figure("eval", "eval (perplexity) / plain forward + cross entropy", lib / base,
                  measured_s=lib, baseline_s=base, samples=t, cpu_ratio=cpu_ratio(t, "library", "plain"),
                  check={"nll_library": out["library"], "nll_plain": out["plain"],
                         "agree": math.isclose(out["library"], out["plain"], rel_tol=1e-5)})


# ------------------------------------------------------------------------------------------------- prune

def roundtrip(src: Path, files: list[str], dst: Path) -> None:
    """The baseline: read every tensor of every shard and write the shard again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in files:
        with safe_open(str(src / name), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(dst / name), metadata=metadata)
        del tensors


def prune_cell(pattern: str) -> tuple[str, float | None]:
    """(pattern, sparsity) as prune takes them: N:M patterns imply their sparsity."""
    return (pattern, None) if ":" in pattern else ("unstructured", float(pattern) if pattern != "unstructured" else 0.5)


def bench_prune(model_dir: Path, stats_dir: Path, work: Path, args) -> list[dict]:
    from stade_cli.checkpoint import weight_files
    from stade_cli.pruning import prune

    files = weight_files(model_dir)
    out_lib, out_cli, out_base = work / "prune-lib", work / "prune-cli", work / "prune-base"
    env = child_env()
    results = []

    def cleanup():
        for d in (out_lib, out_cli, out_base):
            shutil.rmtree(d, ignore_errors=True)

    for metric in args.metrics:
        for pat in args.patterns:
            pattern, sparsity = prune_cell(pat)
            label = f"{pattern}" + (f" {sparsity:g}" if sparsity is not None else "")
            cmd = [sys.executable, "-m", "stade_cli", "-q", "prune", str(model_dir), "--stats", str(stats_dir),
                   "--metric", metric, "--pattern", pattern, "-o", str(out_cli), "--device", args.device]
            if sparsity is not None:
                cmd += ["--sparsity", str(sparsity)]
            child: dict = {}

            def library():
                prune(str(model_dir), out_lib, metric=metric, sparsity=sparsity, pattern=pattern, stats=stats_dir,
                      device=args.device, force=True)

            def cli():
                res = run_child(cmd, env)
                if res["rc"] != 0:
                    raise RuntimeError(f"`{' '.join(cmd)}` failed ({res['rc']}): {res['stderr'].strip()}")
                child["maxrss"] = max(child.get("maxrss", 0), res["maxrss"])

            def baseline():
                roundtrip(model_dir, files, out_base)

            log(f"prune {metric} {label}: {args.repeats} rounds")
            name = f"prune {metric} {label} / safetensors round trip"
            try:
                t = interleaved({"library": library, "baseline": baseline, "cli": cli}, args.repeats, args.warmup,
                                cleanup)
            except Exception as exc:  # noqa: BLE001 - e.g. a metric the library does not know
                cleanup()
                results.append(failed_figure("prune", name, exc))
                continue
            lib, base, sub = med(t["library"]), med(t["baseline"]), med(t["cli"])
            results.append(figure("prune", name, lib / base,
                                  measured_s=lib, baseline_s=base, samples=t,
                                  cpu_ratio=cpu_ratio(t, "library", "baseline"),
                                  secondary={"label": "CLI subprocess (incl. start-up)", "ratio": sub / base,
                                             "measured_s": sub, "peak_rss_gb": child.get("maxrss", 0) / GB}))
    return results


def bench_solver(model_dir: Path, stats_dir: Path, work: Path, args) -> list[dict]:
    """From the same (Gram) stats at 50% unstructured: SparseGPT's cost relative to Wanda's (recorded), and
    ``--update admm`` (plain and gradual, after Wanda's mask) relative to SparseGPT's (target: no slower)."""
    from stade_cli.pruning import prune

    runs = {"sparsegpt": dict(metric="sparsegpt"), "wanda": dict(metric="wanda"),
            "admm": dict(metric="wanda", update="admm"),
            "admm gradual": dict(metric="wanda", update="admm", options={"admm_gradual": True})}
    outs = {m: work / f"solver-{m.replace(' ', '-')}" for m in runs}

    def cleanup():
        for d in outs.values():
            shutil.rmtree(d, ignore_errors=True)

    def run(name):
        return lambda: prune(str(model_dir), outs[name], sparsity=0.5, stats=stats_dir, device=args.device, force=True,
                             **runs[name])

    log(f"solver: prune sparsegpt, wanda, wanda + admm (plain, gradual), {args.repeats} rounds")
    try:
        t = interleaved({name: run(name) for name in runs}, args.repeats, args.warmup, cleanup)
    except Exception as exc:  # noqa: BLE001
        cleanup()
        return [failed_figure("solver", "prune sparsegpt / prune wanda", exc)]
    cleanup()
    sg, wa = med(t["sparsegpt"]), med(t["wanda"])
    out = [figure("solver", "prune sparsegpt / prune wanda (same Gram stats, 50%)", sg / wa, measured_s=sg,
                  baseline_s=wa, samples={k: t[k] for k in ("sparsegpt", "wanda")},
                  cpu_ratio=cpu_ratio(t, "sparsegpt", "wanda"))]
    for name in ("admm", "admm gradual"):
        m = med(t[name])
        out.append(figure("update", f"prune wanda + {name} / prune sparsegpt (same Gram stats, 50%)", m / sg,
                          measured_s=m, baseline_s=sg, samples={k: t[k] for k in (name, "sparsegpt")},
                          cpu_ratio=cpu_ratio(t, name, "sparsegpt")))
    return out


# ------------------------------------------------------------------------------------------------ memory

def synthetic_config(total_bytes: float, itemsize: int, dtype: str):
    """A Llama config whose weights come to about ``total_bytes`` (untied embeddings, MHA, head_dim 64)."""
    from transformers import LlamaConfig

    for h in (2048, 1024, 512, 256, 128, 64):
        inter = 64 * max(1, round(2.75 * h / 64))
        vocab = 16000 if h >= 1024 else 4096 if h >= 256 else 1024
        per_layer = (4 * h * h + 3 * h * inter + 2 * h) * itemsize
        fixed = (2 * vocab * h + h) * itemsize
        if fixed + per_layer <= 1.15 * total_bytes or h == 64:
            layers = max(1, round((total_bytes - fixed) / per_layer))
            heads = max(1, h // 64)
            return LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                               max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)
    raise AssertionError("unreachable")


def build_synthetic(path: Path, total_gb: float, shard_gb: float, dtype_name: str, seed: int = 0) -> dict:
    """Random Llama-shaped weights in shards of about ``shard_gb`` + index + config.json + matching stats."""
    import torch
    from safetensors.torch import save_file

    from stade_cli.arch import bias_flag_table, describe, meta_model
    from stade_cli.calibration.moments import Moments
    from stade_cli.calibration.store import Stats, save_stats
    from stade_cli.checkpoint import fingerprint, load_config

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    config = synthetic_config(total_gb * GB, itemsize, dtype_name)
    path.mkdir(parents=True)
    config.to_json_file(str(path / "config.json"))
    meta = meta_model(config)
    shapes = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    shards = _shards.split(shapes, itemsize, shard_gb * GB)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.randn(shape, generator=g).mul_(0.02).to(dtype)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * itemsize
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    # stats without running the model: random positive moments in the format save_stats writes
    arch = describe(meta_model(load_config(path)))
    arch.bias_flags = bias_flag_table(load_config(path))
    count = 4096
    moments = {}
    for name, t in arch.targets.items():
        mean = torch.randn(t.in_features, generator=g, dtype=torch.float64) * 0.1
        std = torch.rand(t.in_features, generator=g, dtype=torch.float64) + 0.05
        moments[name] = Moments(count, mean * count, (mean.square() + std.square()) * count)
    manifest = {
        "model": {"ref": str(path), "path": str(path), "revision": None, "fingerprint": fingerprint(path)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": "synthetic", "nsamples": 0, "seqlen": 0, "seed": seed, "dtype": "float32", "device": "cpu",
        "tokens": count, "seconds": 0.0,
        # reads_norm: which linears read a norm's output (in a Llama block: q/k/v after input_layernorm,
        # gate/up after post_attention_layernorm), as compute_stats records it
        "modules": {n: {"in_features": t.in_features, "block": t.block,
                        "reads_norm": n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
                    for n, t in arch.targets.items()},
        "shared_inputs": {},
        "architecture": arch.to_data(),   # as calibrate stores it: prune then builds no model
    }
    stats_dir = path.parent / (path.name + "-stats")
    save_stats(stats_dir, Stats(manifest, moments))
    largest = max((path / f).stat().st_size for f in set(weight_map.values()))
    return {"path": path, "stats": stats_dir, "total_bytes": total, "shards": len(shards), "largest_shard": largest,
            "config": {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                       "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
                       "dtype": dtype_name}}


def memory_one(work: Path, total_gb: float, env: dict, args) -> dict:
    synth = work / f"synth-{total_gb:g}gb"
    stats = work / f"synth-{total_gb:g}gb-stats"
    out = work / f"synth-{total_gb:g}gb-out"
    try:
        log(f"memory: building a {total_gb:g} GB synthetic checkpoint ({args.synthetic_dtype})")
        t0 = time.perf_counter()
        s = build_synthetic(synth, total_gb, args.shard_gb, args.synthetic_dtype)
        log(f"memory: {s['total_bytes'] / GB:.2f} GB in {s['shards']} shards (largest {s['largest_shard'] / GB:.3f} GB)"
            f", {s['config']}, built in {time.perf_counter() - t0:.0f} s")
        cmd = [sys.executable, "-m", "stade_cli", "-q", "prune", str(synth), "--stats", str(s["stats"]),
               "--metric", "wanda", "--sparsity", "0.5", "-o", str(out), "--device", "cpu", "--force"]
        runs = []
        for _ in range(args.memory_repeats):
            res = run_child(cmd, env)
            shutil.rmtree(out, ignore_errors=True)
            if res["rc"] != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed ({res['rc']}): {res['stderr'].strip()}")
            runs.append(res)
    finally:  # disk: at most one synthetic checkpoint and its output at a time
        for d in (synth, stats, out):
            shutil.rmtree(d, ignore_errors=True)
    peak = med([r["maxrss"] for r in runs])
    bound = 2 * s["largest_shard"] + 0.6 * GB
    log(f"memory: {total_gb:g} GB → peak RSS {peak / GB:.2f} GB (bound {bound / GB:.2f} GB)")
    return figure("memory", f"prune peak RSS, {s['total_bytes'] / GB:.2f} GB checkpoint / bound",
                  peak / bound, peak_rss_gb=peak / GB, bound_gb=bound / GB,
                  total_gb=s["total_bytes"] / GB, shards=s["shards"],
                  largest_shard_gb=s["largest_shard"] / GB, config=s["config"],
                  samples={"peak_rss_gb": [r["maxrss"] / GB for r in runs],
                           "seconds": [r["seconds"] for r in runs]},
                  measured_s=med([r["seconds"] for r in runs]))


def bench_memory(work: Path, args) -> tuple[list[dict], dict]:
    env = child_env()
    floor = run_child([sys.executable, "-c", "import stade_cli.pruning, stade_cli.cli.app"], env)
    info = {"import_floor_gb": floor["maxrss"] / GB, "shard_gb": args.shard_gb, "dtype": args.synthetic_dtype}
    log(f"memory: peak RSS of importing stade_cli.pruning + the CLI: {floor['maxrss'] / GB:.2f} GB")
    results = []
    for total_gb in args.sizes:
        try:
            results.append(memory_one(work, total_gb, env, args))
        except Exception as exc:  # noqa: BLE001 - one size failing must not lose the others
            results.append(failed_figure("memory", f"prune peak RSS, {total_gb:g} GB checkpoint / bound", exc))
    return results, info


# ------------------------------------------------------------------------------------------------ output

def render_table(result: dict) -> str:
    rows = [("figure", "measured", "baseline", "ratio", "target", "result", "cpu ratio", "secondary")]
    tgt = lambda t: "–" if not math.isfinite(t) else f"≤ {t:g}"  # noqa: E731
    for f in result["figures"]:
        if f.get("error"):
            rows.append((f["figure"], "", "", "", tgt(f["target"]), "ERROR", "", f["error"][:120]))
            continue
        if f["kind"] == "memory":
            measured, baseline = f"{f['peak_rss_gb']:.2f} GB", f"bound {f['bound_gb']:.2f} GB"
            secondary = f"{f['total_gb']:.2f} GB in {f['shards']} shards, largest {f['largest_shard_gb']:.3f} GB"
        else:
            measured, baseline = f"{f['measured_s']:.2f} s", f"{f['baseline_s']:.2f} s"
            sec = f.get("secondary")
            secondary = f"{sec['label']}: {sec['ratio']:.2f}" if sec else ""
        cpu = f"{f['cpu_ratio']:.3f}" if f.get("cpu_ratio") is not None else ""
        rows.append((f["figure"], measured, baseline, f"{f['ratio']:.3f}", tgt(f["target"]),
                     "pass" if f["pass"] else "FAIL", cpu, secondary))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def failed_figure(kind: str, name: str, exc: BaseException) -> dict:
    log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
    if os.environ.get("STADE_DEBUG"):
        traceback.print_exc()
    return {"kind": kind, "figure": name, "ratio": None, "target": TARGETS[kind], "pass": False,
            "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="checkpoint directory with tokenizer (e.g. smollm2-135m)")
    p.add_argument("--calib", nargs="+", required=True, help="calibration text file(s)")
    p.add_argument("--eval", nargs="+", default=None, help="evaluation text file(s) (default: --calib)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration and evaluation windows (default 16)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    p.add_argument("--metrics", nargs="+", default=["magnitude", "wanda", "stade"], help="prune figures' metrics")
    p.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"],
                   help="prune figures' patterns: unstructured (at 0.5), a sparsity, or N:M")
    p.add_argument("--sizes", default="0.5,2,4", help="memory test: synthetic checkpoint sizes in GB")
    p.add_argument("--shard-gb", type=float, default=0.5, help="memory test: shard size in GB (default 0.5)")
    p.add_argument("--synthetic-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--memory-repeats", type=int, default=1, help="prune runs per size; median peak RSS")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-solver", action="store_true", help="skip the sparsegpt/wanda figure (and the Gram matrices it needs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None,
                   help="where the scratch directory goes: a new one inside it, kept (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    args = p.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated numbers (got {args.sizes!r})")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from stade_cli.arch import context_length
    from stade_cli.calibration.runner import compute_stats
    from stade_cli.loading import dtype_kwarg, load_tokenizer
    from stade_cli.calibration.store import save_stats
    from stade_cli.checkpoint import load_config, resolve_model
    from stade_cli.data import calibration_windows, eval_windows, load_corpus
    from stade_cli.runtime import resolve_device, silence_transformers

    if args.out:  # refuse a file this script did not write before spending an hour measuring
        try:
            check_file(Path(args.out).expanduser(), _OURS, "results of bench/speed.py")
        except OutputError as exc:
            raise SystemExit(f"error: --out {exc}") from None
    silence_transformers()
    started = time.perf_counter()
    source = resolve_model(args.model)
    model_dir = source.path
    dev = resolve_device(args.device)
    calib = ",".join(str(Path(f).expanduser()) for f in args.calib)
    evalset = ",".join(str(Path(f).expanduser()) for f in (args.eval or args.calib))
    # scratch: always a fresh directory of our own (inside --workdir when given), so that nothing this
    # script removes was there before it
    if args.workdir:
        Path(args.workdir).expanduser().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stade-speed-", dir=Path(args.workdir).expanduser() if args.workdir else None))
    free = shutil.disk_usage(work).free
    if not args.skip_memory and args.sizes and free < 2.2 * max(args.sizes) * GB + GB:
        log(f"warning: {free / GB:.1f} GB free in {work}; the memory test needs about "
            f"{2.2 * max(args.sizes) + 1:.1f} GB")

    result = {
        "settings": {"model": str(model_dir), "calib": args.calib, "eval": args.eval or args.calib,
                     "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "repeats": args.repeats,
                     "warmup": args.warmup, "metrics": args.metrics, "patterns": args.patterns,
                     "sizes_gb": [] if args.skip_memory else args.sizes, "shard_gb": args.shard_gb,
                     "synthetic_dtype": args.synthetic_dtype, "device": str(dev),
                     "started": _dt.datetime.now().isoformat(timespec="seconds")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "machine": platform.machine()},
        "figures": [], "info": {},
    }
    order = {"calibrate": 0, "prune": 1, "solver": 2, "update": 3, "memory": 4, "eval": 5}

    def save() -> None:  # after every section, so an interrupted run keeps what it measured
        result["figures"].sort(key=lambda f: order[f["kind"]])
        if args.out:
            replace_file(Path(args.out).expanduser(), json.dumps(result, indent=2) + "\n", _OURS,
                         "results of bench/speed.py")

    try:
        config = load_config(model_dir)
        tokenizer = load_tokenizer(source)
        windows = calibration_windows(tokenizer, load_corpus(calib, "calibration"), args.nsamples, args.seqlen,
                                      args.seed, context_length(config))
        ewindows = eval_windows(tokenizer, load_corpus(evalset, "evaluation"), args.seqlen, context_length(config),
                                args.nsamples)
        log(f"loading {model_dir} (float32, {dev})")
        model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).to(dev).eval()
        for kind, name, fn, data in (("calibrate", "calibrate", bench_calibrate, windows),
                                     ("eval", "eval", bench_eval, ewindows)):
            try:
                result["figures"].append(fn(model, data, dev, args))
            except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the others
                result["figures"].append(failed_figure(kind, name, exc))
            save()
        del model
        gc.collect()

        try:
            log("computing stats once (compute_stats end to end: load, tokenize, forward)")
            t0 = time.perf_counter()
            stats = compute_stats(source, calib, args.nsamples, args.seqlen, args.seed, str(dev), "auto",
                                  gram=not args.skip_solver)
            result["info"]["compute_stats_seconds"] = time.perf_counter() - t0
            stats_dir = save_stats(work / "stats", stats, force=True)
            del stats
            result["figures"].extend(bench_prune(model_dir, stats_dir, work, args))
            save()
            if not args.skip_solver:
                result["figures"].extend(bench_solver(model_dir, stats_dir, work, args))
        except Exception as exc:  # noqa: BLE001
            result["figures"].append(failed_figure("prune", "prune", exc))
        save()
        if not args.skip_memory and args.sizes:
            try:
                figs, info = bench_memory(work, args)
                result["figures"].extend(figs)
                result["info"]["memory"] = info
            except Exception as exc:  # noqa: BLE001
                result["figures"].append(failed_figure("memory", "memory", exc))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"scratch kept in {work}")

    result["settings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    save()
    if args.out:
        log(f"wrote {args.out}")
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text if args.json else render_table(result))
    sys.stdout.flush()
    failed = [f["figure"] for f in result["figures"] if not f["pass"]]
    if failed:
        log(f"{len(failed)} figure(s) missed the target or failed: " + "; ".join(failed))
    errors = any(f.get("error") for f in result["figures"])
    return 1 if errors or (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
