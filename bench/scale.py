#!/usr/bin/env python
"""The models users prune, at their real shapes: seeded random checkpoints, and what stade costs on them.

    python bench/scale.py build --shape llama2-7b --out /big/llama2-7b
    python bench/scale.py run --shape llama2-7b --work /big/scale --calib A/emma.txt --device cpu \\
        --nsamples 4 --seqlen 512 --out bench/results/scale/llama2-7b-cpu

``build`` writes a checkpoint with the exact shapes, dtype, shard layout and config of a real model (``SHAPES``:
Llama-2-7B, bf16, 2 shards as on the hub; Llama-3-8B, GQA with 8 KV heads and a 128k vocabulary, 4 shards; 2-block
slices of Llama-2-70B and Mixtral-8x7B for per-block costs), with seeded random weights (normal, std 0.02; norms
1) and SmolLM2's tokenizer cut to the model's vocabulary. The weights are random: only time, memory and disk
mean something, never a perplexity.

``run`` builds it (unless there), then measures each step as a child process (wall, CPU, peak RSS; on CUDA the
peak of ``torch.cuda.max_memory_allocated``), beside two baselines measured in the same run: a safetensors round
trip of the shards (prune's) and a plain block-by-block forward of the same windows with no hooks (calibrate's
and eval's). Steps: ``calibrate``, ``calibrate-gram``, ``prune:METHOD`` for magnitude, wanda, stade, sparsegpt,
wanda + admm (plain and gradual), ``eval``, on CUDA ``sparse24`` (prefill tokens/s of a block's linears dense
against ``torch.sparse.to_sparse_semi_structured``), and ``prune:recipe`` (``--recipe best`` at 50%: the
block-wise refinement on 128 windows of the calibration text, last because it is the longest). Writes OUT/scale.json and OUT/scale.md after every step.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/scale.py` without installing the package
    sys.path.insert(0, str(ROOT))

import _measure  # noqa: E402
import _shards  # noqa: E402
from _results import ResultFiles  # noqa: E402

GB = 1e9
SMOLLM2 = Path(os.environ.get("STADE_ASSETS", Path.home() / ".cache" / "stade-assets")) / "smollm2-135m"
LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, initializer_range=0.02)

# name → the real model it stands for, its config, dtype and the largest shard its hub repository uses
SHAPES = {
    "llama2-7b": dict(stands_for="meta-llama/Llama-2-7b-hf", family="llama", shard_gb=10.0, dtype="bfloat16",
                      config=dict(LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                  max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)),
    "llama2-7b-4blocks": dict(stands_for="meta-llama/Llama-2-7b-hf (4 of its 32 blocks)", family="llama",
                              shard_gb=2.0, dtype="bfloat16", blocks_of=32,
                              config=dict(LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
                                          max_position_embeddings=4096, rope_theta=10000.0)),
    "llama3-8b": dict(stands_for="meta-llama/Meta-Llama-3-8B", family="llama", shard_gb=5.0, dtype="bfloat16",
                      config=dict(LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                  max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                                  eos_token_id=128001)),
    "llama2-70b-2blocks": dict(stands_for="meta-llama/Llama-2-70b-hf (2 of its 80 blocks)", family="llama",
                               shard_gb=10.0, dtype="bfloat16", blocks_of=80,
                               config=dict(LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                           num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                                           max_position_embeddings=4096, rope_theta=10000.0)),
    "mixtral-8x7b-2blocks": dict(stands_for="mistralai/Mixtral-8x7B-v0.1 (2 of its 32 blocks)", family="mixtral",
                                 shard_gb=5.0, dtype="bfloat16", blocks_of=32,
                                 config=dict(hidden_act="silu", rms_norm_eps=1e-5, vocab_size=32000,
                                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                             num_attention_heads=32, num_key_value_heads=8,
                                             max_position_embeddings=32768, rope_theta=1e6, num_local_experts=8,
                                             num_experts_per_tok=2, sliding_window=None)),
    "llama2-13b": dict(stands_for="meta-llama/Llama-2-13b-hf", family="llama", shard_gb=10.0, dtype="bfloat16",
                       config=dict(LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                   num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                   max_position_embeddings=4096, rope_theta=10000.0)),
    "llama2-70b": dict(stands_for="meta-llama/Llama-2-70b-hf", family="llama", shard_gb=10.0, dtype="bfloat16",
                       config=dict(LLAMA, vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                   num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                   max_position_embeddings=4096, rope_theta=10000.0)),
    "mixtral-8x7b": dict(stands_for="mistralai/Mixtral-8x7B-v0.1", family="mixtral", shard_gb=5.0, dtype="bfloat16",
                         config=dict(hidden_act="silu", rms_norm_eps=1e-5, vocab_size=32000, hidden_size=4096,
                                     intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                                     num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    "tiny": dict(stands_for="a tiny Llama (the script's own test)", family="llama", shard_gb=0.0002, dtype="bfloat16",
                 config=dict(LLAMA, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
}
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "mixtral": ("MixtralForCausalLM", "mixtral")}


# ---------------------------------------------------------------------------------------------------- build
def tensors(shape: dict) -> list[tuple[str, tuple]]:
    """(key, shape) of every tensor, in the order the hub's checkpoints hold them (per-expert keys for Mixtral)."""
    c = shape["config"]
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (heads * d, h)), (f"{p}.self_attn.k_proj.weight", (kv * d, h)),
                (f"{p}.self_attn.v_proj.weight", (kv * d, h)), (f"{p}.self_attn.o_proj.weight", (h, heads * d))]
        if shape["family"] == "mixtral":
            out.append((f"{p}.block_sparse_moe.gate.weight", (c["num_local_experts"], h)))
            for e in range(c["num_local_experts"]):
                q = f"{p}.block_sparse_moe.experts.{e}"
                out += [(f"{q}.w1.weight", (inter, h)), (f"{q}.w2.weight", (h, inter)), (f"{q}.w3.weight", (inter, h))]
        else:
            out += [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                    (f"{p}.mlp.down_proj.weight", (h, inter))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def cut_tokenizer(src: Path, dst: Path, vocab: int) -> None:
    """SmolLM2's byte-level BPE tokenizer restricted to ids below ``vocab``: tokens above it and the merges that make
    them dropped, so every id it emits has a row in the embedding."""
    spec = json.loads((src / "tokenizer.json").read_text())
    model = spec["model"]
    kept = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = [m for m in model["merges"]
              if all(x in kept for x in (m if isinstance(m, list) else m.split(" ")))
              and "".join(m if isinstance(m, list) else m.split(" ")) in kept]
    spec["model"] = dict(model, vocab=kept, merges=merges)
    spec["added_tokens"] = [a for a in spec.get("added_tokens", []) if a["id"] < vocab]
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in (config.get("added_tokens_decoder") or {}).items()
                                      if int(k) < vocab}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build(name: str, out: Path, seed: int = 0, tokenizer: Path = SMOLLM2, device: str = "cpu") -> dict:
    """Write the random checkpoint of shape ``name`` into the new directory ``out``, one tensor in memory at a time.
    The values are drawn on ``device`` (a GPU draws Llama-2-7B's 6.7e9 in seconds, a CPU's one generator in minutes),
    so the same seed gives other values there: they are random either way."""
    import torch

    from stade_cli.checkpoint import ShardWriter

    shape = SHAPES[name]
    if (out / "config.json").is_file():
        return describe_checkpoint(out)
    if not (tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"error: no tokenizer at {tokenizer} (build SmolLM2 with ../shared/assets/smollm2.sh)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = getattr(torch, shape["dtype"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[shape["dtype"]]
    shards = _shards.split(tensors(shape), itemsize, shape["shard_gb"] * GB)
    g = torch.Generator(device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(k, code, dims, math.prod(dims) * itemsize) for k, dims in shard]
        with ShardWriter(tmp / fname, entries, {"format": "pt"}) as writer:
            for key, dims in shard:
                if key.endswith("norm.weight"):
                    t = torch.ones(dims, dtype=dtype)
                else:
                    t = torch.randn(dims, generator=g, device=device).mul_(0.02).to(dtype).cpu()
                writer.write(key, t.contiguous().reshape(-1).view(torch.uint8).numpy())
                weight_map[key] = fname
                total += t.numel() * itemsize
                del t
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    arch_name, model_type = ARCHITECTURES[shape["family"]]
    config = dict(shape["config"], architectures=[arch_name], model_type=model_type, torch_dtype=shape["dtype"],
                  tie_word_embeddings=False, use_cache=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "random-weights.json").write_text(json.dumps({"seed": seed, "drawn_on": torch.device(device).type}) + "\n")
    cut_tokenizer(tokenizer, tmp, shape["config"]["vocab_size"])
    os.replace(tmp, out)
    return describe_checkpoint(out)


def build_device(device: str) -> str:
    """Where ``build`` draws a run's values: the GPU the run uses, else the CPU."""
    import torch

    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def describe_checkpoint(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    drawn = path / "random-weights.json"
    return {"path": str(path), "shards": len(files), "bytes": sum(f.stat().st_size for f in files),
            "largest_shard": max(f.stat().st_size for f in files),
            **(json.loads(drawn.read_text()) if drawn.is_file() else {})}


# ---------------------------------------------------------------------------------------------------- steps
def step(argv: list[str]) -> int:
    """One measured step, run in a child of its own: the library call, then its figures (CUDA peak memory) as JSON
    in --report."""
    p = argparse.ArgumentParser(prog="scale.py step")
    p.add_argument("what")
    p.add_argument("--model", required=True)
    p.add_argument("--out")
    p.add_argument("--stats")
    p.add_argument("--calib")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--metric", default="wanda")
    p.add_argument("--update", default="none")
    p.add_argument("--gradual", action="store_true")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--report", required=True)
    a = p.parse_args(argv)
    import torch

    from stade_cli.runtime import StderrReporter

    reporter = StderrReporter()
    extra: dict = {}
    if a.what == "roundtrip":
        roundtrip(Path(a.model), Path(a.out))
    elif a.what == "forward":
        extra = plain_forward(a.model, a.calib, a.nsamples, a.seqlen, a.device, reporter)
    elif a.what in ("calibrate", "calibrate-gram"):
        from stade_cli.calibration.runner import calibrate

        calibrate(a.model, a.out, dataset=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, device=a.device,
                  gram=a.what == "calibrate-gram", reporter=reporter)
        extra["stats_bytes"] = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
    elif a.what == "prune":
        from stade_cli.pruning import prune

        options = {"admm_gradual": True} if a.gradual else {}
        if a.metric == "recipe":        # --recipe best: wanda, the gradual ADMM refit, then the refinement
            prune(a.model, a.out, recipe="best", sparsity=0.5, stats=a.stats, device=a.device, reporter=reporter)
        else:
            prune(a.model, a.out, metric=a.metric, sparsity=None if ":" in a.pattern else 0.5, pattern=a.pattern,
                  stats=a.stats, device=a.device, update=a.update, options=options, bias_correction=False
                  if a.metric == "stade" and a.update == "none" else None, reporter=reporter)
    elif a.what == "eval":
        from stade_cli.evaluation import evaluate

        extra = {k: v for k, v in evaluate(a.model, dataset=a.calib, seqlen=a.seqlen, max_windows=a.max_windows,
                                           device=a.device, reporter=reporter).items() if k in ("ppl", "windows")}
    elif a.what == "sparse24":
        extra = sparse24(a.model, a.seqlen, a.device)
    else:
        raise SystemExit(f"error: unknown step {a.what}")
    if torch.cuda.is_available():
        extra["cuda_peak"] = torch.cuda.max_memory_allocated()
        extra["gpu"] = torch.cuda.get_device_name()
    Path(a.report).write_text(json.dumps(extra))
    return 0


def roundtrip(src: Path, dst: Path) -> None:
    """prune's baseline: every tensor of every shard read and written again, one shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            metadata = s.metadata()
            tensors_ = {k: s.get_tensor(k) for k in s.keys()}
        save_file(tensors_, str(dst / f.name), metadata=metadata)
        del tensors_


def plain_forward(model: str, calib: str, nsamples: int, seqlen: int, device: str, reporter) -> dict:
    """calibrate's and eval's baseline: the same windows through the same block-by-block runner (and the same
    placement: blocks streamed where the model does not fit), with no hook and no statistic."""
    import torch

    from stade_cli.arch import describe
    from stade_cli.blockwise import BlockRunner
    from stade_cli.loading import CalibrationSpec, Runtime

    rt = Runtime.of(model, device)
    placement = rt.settle(None, reporter)
    windows = CalibrationSpec(calib, nsamples, seqlen).windows(rt)
    t0 = time.perf_counter()
    with rt.model(placement) as net, torch.inference_mode():
        arch = describe(net)
        with BlockRunner(net, arch, windows, rt.device, 1, placement, reporter) as runner:
            last = len(arch.blocks) - 1
            for index, block, dev in runner.blocks("forward"):
                runner.run(block, dev, keep=index < last)
    return {"forward_seconds": round(time.perf_counter() - t0, 2)}


def sparse24(model: str, tokens: int, device: str) -> dict:
    """Prefill throughput of one block's linears, dense against 2:4 semi-structured sparse (CUDA only)."""
    import torch

    from stade_cli.checkpoint import ShardReader, weight_files

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    path = Path(model)
    weights = {}
    for f in weight_files(path):
        with ShardReader(path / f) as r:
            for k in r.keys():
                if k.startswith("model.layers.0.") and k.endswith("proj.weight"):
                    weights[k] = r.get_tensor(k).to("cuda", torch.float16)
    x = torch.randn(tokens, next(iter(weights.values())).shape[1], device="cuda", dtype=torch.float16)
    out = {"backend": "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"}
    # cuSPARSELt where this torch has it (its default), else the CUTLASS kernels every CUDA build has
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = out["backend"] == "CUTLASS"
    for sparse in (False, True):
        mats = {k: (torch.sparse.to_sparse_semi_structured(w) if sparse else w) for k, w in weights.items()}
        inputs = {k: (x if w.shape[1] == x.shape[1] else torch.randn(tokens, w.shape[1], device="cuda",
                                                                      dtype=torch.float16)) for k, w in weights.items()}
        for _ in range(3):
            for k, w in mats.items():
                torch.nn.functional.linear(inputs[k], w)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        reps = 20
        for _ in range(reps):
            for k, w in mats.items():
                torch.nn.functional.linear(inputs[k], w)
        end.record()
        torch.cuda.synchronize()
        out["sparse_tokens_per_s" if sparse else "dense_tokens_per_s"] = tokens * reps / (start.elapsed_time(end) / 1e3)
    out["speedup"] = out["sparse_tokens_per_s"] / out["dense_tokens_per_s"]
    return out


# ---------------------------------------------------------------------------------------------------- run
STEPS = ["roundtrip", "forward", "calibrate", "calibrate-gram", "prune:magnitude", "prune:wanda", "prune:stade",
         "prune:sparsegpt", "prune:wanda+admm", "prune:wanda+admm-gradual", "eval", "sparse24", "prune:recipe"]
BASELINE = {"calibrate": "forward", "calibrate-gram": "forward", "eval": "forward"}
RESULTS = ResultFiles("bench/scale.py", "scale", ("settings", "checkpoint", "steps"), ("scale.md",))


def markdown(result: dict) -> str:
    ck = result["checkpoint"]
    lines = [f"{result['settings']['shape']} ({SHAPES[result['settings']['shape']]['stands_for']}): "
             f"{ck['shards']} shard(s), {ck['bytes'] / GB:.2f} GB, random weights; device "
             f"{result['environment'].get('gpu') or result['settings']['device']}; "
             f"{result['settings']['nsamples']} × {result['settings']['seqlen']} tokens",
             "",
             "| step | wall s | CPU s | peak RSS | of it anonymous | peak GPU | against | ratio | on disk |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {s["step"]: s for s in result["steps"]}
    for s in result["steps"]:
        if s.get("stopped"):
            lines.append(f"| {s['step']} | stopped at the deadline after {s['stopped']:.0f} s (ended "
                         f"{s['seconds'] - s['stopped']:.1f} s later, exit {s['rc']}) | | | | | | | |")
            continue
        if s.get("rc"):
            why = f": {s['why']}" if s.get("why") else ""
            lines.append(f"| {s['step']} | failed (exit {s['rc']}){why} | | | | | | | |")
            continue
        if s.get("skipped"):
            lines.append(f"| {s['step']} | skipped: {s['skipped']} | | | | | | | |")
            continue
        base = by.get(s.get("baseline") or "")
        ratio = f"{s['seconds'] / base['seconds']:.2f}" if base and base.get("seconds") else ""
        windows, nsamples = s.get("windows"), result["settings"]["nsamples"]
        if ratio and windows is not None and windows != nsamples:     # not the same work as the baseline's
            ratio = f"({windows} windows against {nsamples})"
        gpu = f"{s['cuda_peak'] / 2**30:.1f} GiB" if s.get("cuda_peak") else ""
        disk = f"{s['stats_bytes'] / GB:.2f} GB" if s.get("stats_bytes") else ""
        note = f" ({s['speedup']:.2f}× dense{', ' + s['backend'] if s.get('backend') else ''})" if s.get("speedup") else ""
        anon = f"{s['anon'] / 2**30:.2f} GiB" if s.get("anon") else ""
        lines.append(f"| {s['step']}{note} | {s['seconds']:.1f} | {s['cpu']:.1f} | {s['maxrss'] / 2**30:.2f} GiB | "
                     f"{anon} | {gpu} | {s.get('baseline') or ''} | {ratio} | {disk} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpus": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():      # asked in a child: this process holds no CUDA context while the steps run
        name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                              capture_output=True, text=True)
        env["gpu"] = name.stdout.strip() or "unknown GPU"
        env["cuda"] = torch.version.cuda
    return env


PROTOCOL = ("shape", "calib", "device", "nsamples", "seqlen", "max_windows")


def _earlier(out: Path, result: dict) -> dict | None:
    """The results already in ``out`` when they measured the same protocol on the same kind of machine."""
    try:
        earlier = json.loads((out / "scale.json").read_text())
    except (OSError, ValueError):
        return None
    def key(settings: dict, k: str):
        value = settings.get(k)
        return str(Path(value).expanduser().resolve()) if k == "calib" and value else value   # ../x and /abs/x

    same = all(key(earlier["settings"], k) == key(result["settings"], k) for k in PROTOCOL)
    same = same and all(earlier["environment"].get(k) == result["environment"].get(k)
                        for k in ("torch", "cpus", "machine", "gpu"))
    return earlier if same else None


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scale.py run")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--work", required=True, help="where the checkpoint, stats and pruned outputs go (kept)")
    p.add_argument("--calib", required=True, help="calibration text (and evaluation: weights are random)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}")
    p.add_argument("--tokenizer", default=str(SMOLLM2))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale"))
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from now: no step starts after it, and the one running then is sent SIGTERM (and "
                        "recorded as stopped), so that a run with a time limit still ends with its results written")
    a = p.parse_args(argv)
    steps = [s for s in a.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"error: unknown step {unknown[0]} (choose from {', '.join(STEPS)})")
    out = Path(a.out).expanduser()
    RESULTS.check(out)
    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model = work / a.shape
    t0 = time.perf_counter()
    left = (lambda: a.deadline - (time.perf_counter() - t0)) if a.deadline is not None else (lambda: None)
    if not (model / "config.json").is_file():      # in a child: on a GPU it draws the values there
        subprocess.run([sys.executable, str(Path(__file__)), "build", "--shape", a.shape, "--out", str(model),
                        "--tokenizer", str(Path(a.tokenizer).expanduser()), "--device", build_device(a.device)],
                       check=True, stdout=subprocess.DEVNULL, env=_measure.child_env())
    checkpoint = describe_checkpoint(model)
    built = round(time.perf_counter() - t0, 1)
    result = {"settings": {**vars(a), "started": _dt.datetime.now().isoformat(timespec="seconds")},
              "environment": environment(), "checkpoint": {**checkpoint, "build_seconds": built}, "steps": []}
    earlier = _earlier(out, result)
    if earlier is not None:       # the same protocol measured before: its other steps stay, these are replaced
        result["steps"] = [s for s in earlier["steps"] if s["step"] not in steps]
        result["checkpoint"]["build_seconds"] = earlier["checkpoint"].get("build_seconds", built)
    common = ["--model", str(model), "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
              "--device", a.device, "--max-windows", str(a.max_windows)]
    env = _measure.child_env()
    stats, gram = work / f"{a.shape}-stats", work / f"{a.shape}-stats-gram"
    for name in steps:
        if left() is not None and left() < 1:
            result["steps"].append({"step": name, "skipped": "out of time (--deadline)"})
            RESULTS.write(out, result, {"scale.md": markdown(result)})
            continue
        args, baseline, cleanup = [], BASELINE.get(name), None
        if name == "roundtrip":
            args, cleanup = ["--out", str(work / "roundtrip")], work / "roundtrip"
            shutil.rmtree(work / "roundtrip", ignore_errors=True)
        elif name in ("calibrate", "calibrate-gram"):
            target = stats if name == "calibrate" else gram
            shutil.rmtree(target, ignore_errors=True)
            args = ["--out", str(target)]
        elif name.startswith("prune:"):
            method = name.split(":", 1)[1]
            metric, _, rest = method.partition("+")
            args = ["--metric", metric, "--out", str(work / "pruned"),
                    "--stats", str(gram if (gram / "manifest.json").exists() else stats)]
            if rest:
                args += ["--update", "admm"] + (["--gradual"] if rest.endswith("gradual") else [])
            baseline, cleanup = "roundtrip", work / "pruned"
            shutil.rmtree(work / "pruned", ignore_errors=True)
        elif name == "sparse24":
            pruned = work / "pruned-2-4"
            if not (pruned / "config.json").exists():
                made = _measure.run_child([sys.executable, str(Path(__file__)), "step", "prune", *common, "--metric",
                                           "wanda", "--pattern", "2:4", "--stats", str(stats if (
                                               stats / "manifest.json").exists() else gram), "--out", str(pruned),
                                           "--report", str(work / "ignored.json")], env, stop_after=left())
                if made["rc"]:
                    result["steps"].append({"step": name, "rc": made["rc"], "stderr": made["stderr"],
                                            "why": "its 2:4 checkpoint (wanda from the stats) was not made"})
                    RESULTS.write(out, result, {"scale.md": markdown(result)})
                    continue
            common_model = ["--model", str(pruned)]
            # removed after the step: a 7B checkpoint beside the model, its Gram stats and the next prune's output
            # would not fit a 64 GiB disk (13.5 + 26.5 + 13.5 + 13.5 GB)
            args, cleanup = common_model, pruned
        what = "prune" if name.startswith("prune:") else name
        report = work / f"step-{what}.json"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__)), "step", what, *common, *args, "--report", str(report)]
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        figures = _measure.run_child(cmd, env, stop_after=left())
        entry = {"step": name, "baseline": baseline, **{k: v for k, v in figures.items() if k != "stderr"}}
        if figures.get("stopped"):
            entry["stderr"] = figures["stderr"]
        elif figures["rc"]:
            entry["stderr"] = figures["stderr"]
            print(figures["stderr"], file=sys.stderr)
        elif report.is_file():
            entry.update(json.loads(report.read_text()))
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        result["steps"].append(entry)
        RESULTS.write(out, result, {"scale.md": markdown(result)})
    sys.stdout.write(markdown(result))
    return 1 if any(s.get("rc") for s in result["steps"]) else 0


def needs(names: list[str], nsamples: int = 128, seqlen: int = 2048) -> str:
    """"What it takes", from the shapes alone (``stade_cli.estimate``, the figures calibrate and prune print)."""
    from stade_cli.arch import describe
    from stade_cli.estimate import gram_bytes, gram_bytes_per_block, moments_bytes, prune_memory, refine_needs

    rows = ["| model | weights (bf16) | a block in float32 (CPU) / bf16 (GPU) | cached block inputs, 128 × 2048 "
            "(float32 / bf16) | stats | stats with --gram | Gram of one block | prune from stats, memory | "
            "`--recipe best`'s refinement, on its device |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        shape = SHAPES[name]
        arch = describe(_meta(shape))
        sizes = [math.prod(d) for _, d in tensors(shape)]
        block = max(sum(math.prod(d) for k, d in tensors(shape) if k.startswith(f"model.layers.{i}."))
                    for i in range(shape["config"]["num_hidden_layers"]))
        hidden = 2 * nsamples * seqlen * shape["config"]["hidden_size"]
        shard = min(sum(sizes) * 2, shape["shard_gb"] * GB)
        rows.append(f"| {shape['stands_for']} | {sum(sizes) * 2 / GB:.1f} GB | {block * 4 / GB:.2f} / "
                    f"{block * 2 / GB:.2f} GB | {hidden * 4 / GB:.1f} / {hidden * 2 / GB:.1f} GB | "
                    f"{moments_bytes(arch) / GB:.3f} GB | {(moments_bytes(arch) + gram_bytes(arch)) / GB:.1f} GB | "
                    f"{max(gram_bytes_per_block(arch).values()) / GB:.2f} GB | "
                    f"{prune_memory(int(shard)) / GB:.1f} GB (sparsegpt, admm: "
                    f"{prune_memory(int(shard), arch, True, 2) / GB:.1f} GB) | {_refine_needs(arch, shape) / GB:.1f} GB |")
    return "\n".join(rows) + "\n"


def _refine_needs(arch, shape: dict) -> int:
    """``estimate.refine_needs_of`` with the recipe's windows (128 × 256, 4 a step)."""
    from stade_cli.estimate import refine_needs_of

    return refine_needs_of(arch, shape["config"]["num_attention_heads"], 128, 256, 4).total


def _meta(shape: dict):
    import transformers

    from stade_cli.arch import meta_model

    arch_name, model_type = ARCHITECTURES[shape["family"]]
    config = transformers.AutoConfig.for_model(model_type, **shape["config"])
    return meta_model(config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "needs":
        sys.stdout.write(needs(argv[1:] or ["llama2-7b", "llama2-13b", "llama2-70b", "mixtral-8x7b"]))
        return 0
    if not argv or argv[0] not in ("build", "run", "step"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "build":
        p = argparse.ArgumentParser(prog="scale.py build")
        p.add_argument("--shape", required=True, choices=sorted(SHAPES))
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tokenizer", default=str(SMOLLM2))
        p.add_argument("--device", default="cpu", help="where the random values are drawn (cuda: in seconds)")
        a = p.parse_args(argv[1:])
        print(json.dumps(build(a.shape, Path(a.out).expanduser(), a.seed, Path(a.tokenizer).expanduser(),
                               a.device)))
        return 0
    return run(argv[1:]) if argv[0] == "run" else step(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
