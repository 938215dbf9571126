"""``--refine N``: block-wise refinement of the kept weights, after the masks are fixed.

Layer-wise least squares (SparseGPT, ``--update admm``) fits each linear alone to the dense layer's output
on its own inputs; it cannot see how a block's attention and MLP errors combine, nor correct the error the
earlier pruned blocks pass on. The refinement fits a whole decoder block at a time:

    min over the kept weights of block l:  mean ‖ block_l(X_l) − Y_l ‖²

where X_l are the calibration windows' hidden states entering block l in the *pruned* model so far (blocks
0..l−1 already pruned and refined) and Y_l the *dense* model's hidden states leaving block l on the same
windows. So each block also absorbs part of the error that reaches it. ``--refine-loss balanced`` adds to that
mean the same squared difference relative to each token's dense output size (``relative_error``: in the plain
mean, one attention-sink position can carry nearly all of a block's error), each part divided by its value at
the first step (``balanced``). A block whose error on its first step's
windows did not go down (the steps overshot) is refined again at half the rate, and keeps its layer-wise
weights if that does not lower it either (``fit_or_keep``; the report says which). The weights are optimised by a
few Adam steps on mini-batches of windows; a pruned weight's gradient is zeroed before every step (so Adam, whose
moments for it stay zero, moves it by exactly 0) and it is reset to its value after the last one, so the masks are
invariants (zeros stay zero, tested). Only one block is trained at a time; the dense and pruned hidden states of
the refinement windows are kept (on the device when they fit).

``--refine-precision auto`` runs the block's forward and backward passes under bfloat16 autocast where the device
is fast at bfloat16 products (CUDA; a CPU with AMX or AVX512-BF16), keeping the weights, the optimiser's state, the
hidden states and the loss in float32; elsewhere everything is float32. On SmolLM2 that is 1.9× faster on a CPU with
AVX512-BF16 for the same perplexity (README, Beyond layer-wise reconstruction). On the CPU in bfloat16 a block
attends with ``attention.causal_attention`` where a probe shows it gives sdpa's answer (sdpa's CPU kernel took a
quarter of a step). Each block gets the keyword arguments the model hands it (``blockwise``: its own kind of
attention, its own rotary embeddings).

``refine_block`` is the pure step (a block, its inputs and targets, the trainable weights with their masks);
``refine`` the producer that walks the blocks of a loaded model with ``blockwise.BlockRunner``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


LOSSES = {
    "mse": "the mean squared difference between the pruned and the dense block's outputs",
    "balanced": "that mean squared difference plus each token's squared difference relative to its dense output's "
                "mean square, each divided by its own value at the block's first step",
}


@dataclass(frozen=True)
class RefineOptions:
    """``--refine N`` and its options (the defaults measured on SmolLM2: bench/README.md)."""

    steps: int = 0                    # Adam steps per block (0: no refinement)
    lr: float = 1e-3                  # peak learning rate (cosine decay to 0)
    batch: int = 4                    # windows per step
    samples: int = 16                 # calibration windows (the stats' text and seed)
    seqlen: int | None = 256          # tokens per window (None: the calibration's)
    precision: str = "auto"           # auto | float32 | bfloat16: the products of the forward and backward passes
    warmup: float = 0.0               # share of the steps over which the learning rate rises linearly to lr
    loss: str = "mse"                 # mse | balanced (``LOSSES``)

    def check(self) -> None:
        from .errors import UsageError, as_percent

        if self.steps < 0:
            raise UsageError(f"--refine must be a number of steps per block, 0 or more (got {self.steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--refine-lr must be positive (got {self.lr})")
        if not 0 <= self.warmup < 1:
            hints = ["a quarter of the steps is --refine-warmup 0.25", as_percent(self.warmup)]
            raise UsageError(f"--refine-warmup must be a share of the steps, from 0 up to (not including) 1 "
                             f"(got {self.warmup:g})", "; ".join(h for h in hints if h))
        if self.loss not in LOSSES:
            raise UsageError(f"--refine-loss must be one of {', '.join(LOSSES)} (got {self.loss!r})",
                             "; ".join(f"{name}: {what}" for name, what in LOSSES.items()))
        if self.batch < 1:
            raise UsageError(f"--refine-batch must be at least 1 (got {self.batch})")
        if self.samples < 1:
            raise UsageError(f"--refine-samples must be at least 1 (got {self.samples})")
        if self.seqlen is not None and self.seqlen < 2:
            raise UsageError(f"--refine-seqlen must be at least 2 (got {self.seqlen})")
        from .runtime import PRODUCTS, product_name

        if product_name(self.precision) not in PRODUCTS:
            raise UsageError(f"--refine-precision must be one of {', '.join(PRODUCTS)} (got {self.precision!r})")

    @property
    def on(self) -> bool:
        return self.steps > 0

    def product_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the passes' matrix products on ``device``: bfloat16 under ``auto`` where it is fast."""
        from .runtime import product_dtype

        return product_dtype(self.precision, device)


def _products(device: torch.device, dtype: torch.dtype):
    """A context in which ``device``'s matrix products run in ``dtype`` (autocast; float32: as they are)."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def warmup_steps(steps: int, warmup: float) -> int:
    """The steps over which the learning rate rises: the ``warmup`` share of ``steps``, rounded, at least 1."""
    return max(1, round(warmup * steps))


def learning_rate(step: int, steps: int, warmup: float = 0.0) -> float:
    """The learning rate's factor at ``step`` (0-based) of ``steps``: a cosine from 1 down to 0 over the steps,
    times a linear rise over the first ``warmup`` share of them (step t of w = ``warmup_steps`` gets (t + 1) / w,
    so the first step already moves and step w − 1 on is at the cosine)."""
    w = warmup_steps(steps, warmup)
    return min(1.0, (step + 1) / w) * 0.5 * (1 + math.cos(math.pi * step / steps))


def relative_error(squared: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of each token's squared error relative to its dense output's size: ``squared``
    (…, tokens, hidden) divided by the mean of ``target``² over the hidden size (the error as the next RMSNorm
    sees it; a position whose dense output is huge, such as an attention sink, counts like any other)."""
    return (squared / (target.pow(2).mean(-1, keepdim=True) + 1e-6)).mean()


def balanced(parts: Sequence[torch.Tensor], first: Sequence[float]) -> torch.Tensor:
    """The sum of ``parts``, each divided by its value at the first step (``first``), so that each starts at 1
    and neither sets the scale of the other's gradients; a part that was 0 then is added as it is."""
    return sum(p / f if f > 0 else p for p, f in zip(parts, first))


def refine_block(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 targets: torch.Tensor, weights: Sequence[torch.Tensor], frozen: Sequence[torch.Tensor],
                 steps: int, lr: float, batch: int, generator: torch.Generator | None = None,
                 products: torch.dtype = torch.float32, warmup: float = 0.0,
                 loss: str = "mse", on_step: Callable[[], None] | None = None) -> tuple[list[float], list[int]]:
    """Fit ``weights`` (in place) so that ``forward(inputs)`` approaches ``targets``; returns the mean squared
    difference of every step (before its update) and the windows of the first step.

    ``forward(x)`` runs the block on a batch of windows of ``inputs`` and returns its hidden states.
    ``frozen[i]`` is True where ``weights[i]`` must not change (its pruned entries, and any entry that is not a
    target's): those get no gradient, so Adam moves them by exactly 0, and are reset to their value at the end in
    any case: a pruned weight stays zero. Mini-batches of ``batch`` windows are drawn in a random order
    (``generator``), one epoch after another; the learning rate decays to 0 on a cosine, after a linear rise over
    the first ``warmup`` share of the steps (``learning_rate``).
    ``products``: the dtype of the forward and backward matrix products (autocast; the weights, the optimiser's
    state and the loss stay in their own dtype). ``loss``: what the steps minimise (``LOSSES``): the mean squared
    difference, or ``balanced`` with ``relative_error`` (the losses returned are the mean squared difference
    either way, which ``fit_or_keep`` compares). ``on_step``: called after each step (progress).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}")
    for w, m in zip(weights, frozen):
        if w.shape != m.shape:
            raise ValueError(f"mask {tuple(m.shape)} does not match weight {tuple(w.shape)}")
    start_values = [w.detach().clone() for w in weights]
    keeps = [(~m).view(torch.uint8) for m in frozen]      # 1 where the weight may move, as a number
    for w in weights:
        w.requires_grad_(True)
    optimiser = _adam(weights, lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda t: learning_rate(t, steps, warmup))
    n = len(inputs)
    order: list[int] = []
    losses: list[float] = []
    first: list[int] = []
    scale: list[float] = []             # ``balanced``: each part's value at the first step
    try:
        for _ in range(steps):
            if len(order) < min(batch, n):
                order = torch.randperm(n, generator=generator).tolist()
            chosen, order = sorted(order[:batch]), order[batch:]
            first = first or chosen
            idx = torch.tensor(chosen)
            with torch.enable_grad(), _products(inputs.device, products):
                out = forward(inputs[idx])
                target = targets[idx].to(out.device, torch.float32)
                squared = (out.float() - target).pow(2)
                mse = squared.mean()
                objective = mse
                if loss == "balanced":
                    parts = (mse, relative_error(squared, target))
                    scale = scale or [float(p.detach()) for p in parts]
                    objective = balanced(parts, scale)
                # the gradients of ``weights`` only: none for the block's other parameters (its norms), nor the
                # backward products that only they would need (the first linears' input gradients)
                grads = torch.autograd.grad(objective, weights, allow_unused=True)
            for w, g, k in zip(weights, grads, keeps):
                # 0 where frozen (a product: masked_fill_ is ~20× slower on the CPU); None: Adam skips it
                w.grad = None if g is None else g.mul_(k)
            optimiser.step()        # an entry whose gradient was always zero has zero moments: Adam moves it by 0
            decay.step()
            losses.append(float(mse.detach()))
            if on_step is not None:
                on_step()
    finally:
        with torch.no_grad():       # and, whatever happened (a NaN, an interrupt), the frozen entries as they were
            for w, m, v in zip(weights, frozen, start_values):
                w.copy_(torch.where(m, v, w))
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    return losses, first


def _adam(weights: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused (one kernel a step for all the weights: a quarter of a CPU step's time on SmolLM2's blocks)
    where this torch has it for the weights' device, else the default implementation."""
    try:
        return torch.optim.Adam(weights, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(weights, lr=lr)


def fit_or_keep(train: Callable[[float], tuple[list[float], list[int]]], error: Callable[[list[int]], float],
                restore: Callable[[], None], lr: float, tries: int = 2) -> dict:
    """One block's refinement, guarded: ``train(rate)`` runs the steps (``refine_block``: the losses, the first
    step's windows), ``error(windows)`` measures the block's output error on those windows now, ``restore()`` puts
    the layer-wise weights back.

    The steps at ``lr`` are kept if they lowered the error on their first step's windows (``before``: that step's
    loss, the layer-wise fit's error). If not (they overshot), the layer-wise weights are restored and the steps run
    again at half the rate, up to ``tries`` rates in all, each judged on the same windows against the same
    ``before``; when none lowered it the block keeps its layer-wise weights. Returns the report's entry: the
    windows, ``before``, ``after`` (the error kept), ``kept`` (refined or layer-wise), the ``lr`` kept, and every
    rate ``tried`` with the error it reached."""
    first: list[int] = []
    before = float("nan")
    tried: list[list[float]] = []
    for k in range(tries):
        rate = lr / 2 ** k
        losses, windows = train(rate)
        if not first:
            first, before = windows, losses[0]
        reached = error(first)
        tried.append([rate, reached])
        if reached < before:
            return {"windows": first, "before": before, "after": reached, "kept": "refined", "lr": rate,
                    "tried": tried}
        restore()
    return {"windows": first, "before": before, "after": error(first), "kept": "layer-wise", "lr": None,
            "tried": tried}


# ------------------------------------------------------------------------------------------- the producer
def _detached(obj):
    """A block call's keyword arguments as ordinary tensors (captured under inference mode, they could not
    take part in a backward pass)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _casts_cached(module: nn.Module):
    """Within it (and an autocast context), autocast converts each of ``module``'s weights once, not at every call.

    Autocast keeps the converted copy of a tensor for the rest of its context only for leaf tensors that require
    gradients; a weight that does not is converted again at every product. So the floating-point parameters are
    marked as requiring gradients here (under ``no_grad`` nothing is recorded) and given their own flags back after,
    by name too, for a parameter an offloading hook replaced during the pass. The products are the same numbers: one
    conversion or many of the same weight. On SmolLM2's blocks a pass over 128 windows of 256 tokens takes a quarter
    less time."""
    flags = {name: (p, p.requires_grad) for name, p in module.named_parameters() if p.is_floating_point()}
    try:
        for p, _ in flags.values():
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.values():
            p.requires_grad_(flag)
        for name, p in module.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name][1])


def _through(block: nn.Module, x: torch.Tensor, kwargs: dict, batch: int,
             products: torch.dtype = torch.float32) -> torch.Tensor:
    """``block`` on every window of ``x``, ``batch`` windows at a time, without gradients, in ``x``'s dtype
    (matrix products in ``products``, each weight converted once: ``_casts_cached``). ``kwargs``: recorded for one
    window, expanded to each batch's (``for_windows``)."""
    from .blockwise import for_windows

    with torch.no_grad(), _products(x.device, products), _casts_cached(block):
        return torch.cat([_output(block(xb, **for_windows(kwargs, len(xb)))).to(x.dtype) for xb in x.split(batch)])


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


class RefinedWeights:
    """The refined blocks' weights until the writer takes them, in the checkpoint's dtype (what the writer would
    write: ``LayerDecision.weight_for`` casts to it): in memory, or, when they would take more than half of the
    memory available (``--spill auto``; ``disk``: always), one safetensors file a block in a temp dir (under
    ``spill_dir``), read back one matrix at a time. ``close`` removes the files (``refine``'s caller, once the
    checkpoint is written or the run failed). Kept in float32 in memory they were 4 bytes a weight for the whole
    model: 26 GB for Llama-2-7B."""

    def __init__(self, spill: str = "auto", spill_dir=None):
        self.spill, self.spill_dir = spill, spill_dir
        self.on_disk: bool | None = None                     # decided by ``open``
        self.dir = None
        self._memory: dict[str, torch.Tensor] = {}
        self._files: dict[str, tuple[str, str]] = {}        # target name → (file, key in it)

    def open(self, total_bytes: int, reporter=None) -> None:
        """Where the weights go, now that their size is known (``total_bytes`` in the checkpoint's dtype)."""
        import tempfile
        from pathlib import Path

        from .runtime import available_bytes, human_bytes, to_disk

        free = available_bytes(torch.device("cpu"))
        self.on_disk = to_disk(self.spill, total_bytes, free)
        if self.on_disk:
            from .outputs import check_space, scratch_dir

            base = Path(self.spill_dir).expanduser() if self.spill_dir else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            check_space(base or Path(tempfile.gettempdir()), total_bytes)    # before the first block, not after
            self.dir = scratch_dir("refined", base, reporter.log if reporter is not None else None)
        if reporter is not None:
            reporter.log(f"refined weights: {human_bytes(total_bytes)} until written, "
                         + (f"on disk ({self.dir})" if self.on_disk else "in memory")
                         + ("" if self.spill != "auto" else f"; {human_bytes(free)} free"))

    def put(self, block: int, weights: dict[str, torch.Tensor]) -> None:
        """A block's refined matrices, by target name (already in the checkpoint's dtype)."""
        if not self.on_disk:
            self._memory.update({n: w.cpu() for n, w in weights.items()})
            return
        from safetensors.torch import save_file

        path = str(self.dir / f"block{block}.safetensors")
        keys = {n: f"t{i}" for i, n in enumerate(weights)}      # target names may hold characters keys do not
        save_file({keys[n]: w.contiguous().cpu() for n, w in weights.items()}, path)
        self._files.update({n: (path, keys[n]) for n in weights})

    def get(self, name: str) -> torch.Tensor:
        if name in self._memory:
            return self._memory[name]
        from safetensors import safe_open

        path, key = self._files[name]
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    def __enter__(self) -> "RefinedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import shutil

        self._memory.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def refine(plan, layerwise, reporter, store: RefinedWeights | None = None):
    """The layer-wise ``Decisions`` with every target's kept weights refined block by block (module docstring).
    The refined matrices go to ``store`` (``RefinedWeights``; default: one in memory), which the returned
    decisions read: the caller closes it once they are written (and in any case).

    Block l's targets are decided by ``layerwise.layer`` from the dense weights (or looked up, after
    ``--sequential``), written into the loaded model, refined, and recorded as new weights; the refined block
    then gives block l+1's inputs. The report gets each block's output error before and after.
    """
    import dataclasses

    from .arch import describe
    from .attention import faster
    from .blockwise import BlockRunner, for_windows
    from .checkpoint import checkpoint_dtype
    from .decide import LayerDecision
    from .errors import ModelError
    from .estimate import refined_bytes
    from .loading import Runtime

    opts: RefineOptions = plan.request.refine
    spec = plan.refine_windows
    rt = Runtime.of(plan.source, plan.device, plan.request.dtype)
    placement = rt.settle(plan.request.placement, reporter)
    windows = spec.windows(rt)
    arch = plan.arch
    products = opts.product_dtype(rt.device)
    warm = f", rising over the first {warmup_steps(opts.steps, opts.warmup)} steps" if opts.warmup else ""
    batch = min(opts.batch, len(windows))      # a step takes what there is
    reporter.log(f"refining every block: {opts.steps} Adam step{'s' if opts.steps != 1 else ''} of {batch} "
                 f"window{'s' if batch != 1 else ''} (lr {opts.lr:g}{warm}) on "
                 f"{len(windows)} × {windows.shape[1]} tokens from {spec.dataset}, to the dense model's outputs"
                 + (f" ({opts.loss} loss)" if opts.loss != "mse" else "")
                 + ("" if products == torch.float32 else f" ({str(products).removeprefix('torch.')} products)"))
    biases: dict[str, torch.Tensor | None] = {}        # each target's layer-wise bias change (its weight: the store)
    store = store if store is not None else RefinedWeights("device")    # no files that nobody would remove
    errors: list[dict] = []
    quick: list[int] = []                   # blocks that attended with attention.causal_attention
    generator = torch.Generator().manual_seed(spec.seed)
    with rt.model(placement) as model, BlockRunner(model, arch, windows, rt.device, 1, placement,
                                                   reporter) as runner:
        modules = dict(model.named_modules())
        loaded = describe(model, disk=plan.shapes)
        missing = [n for n in arch.targets if n not in loaded.places]
        if missing:
            raise ModelError(f"cannot find where {missing[0]} lives in the loaded model, so --refine cannot "
                             "train it", "prune without --refine, or --skip it")
        read = _checkpoint_reader(plan)
        if store.on_disk is None:       # every target's matrix, in the checkpoint's dtype
            store.open(refined_bytes(arch, checkpoint_dtype(rt.config).itemsize), reporter)
        dense_x = runner.cache.get(0, len(windows)).clone()
        pruned_x = dense_x                       # block 0: the pruned and the dense model's inputs are the same
        for index, block, dev in runner.blocks("refining blocks"):
            dtype = next(block.parameters()).dtype
            block.float()
            kw = _detached(_moved(runner.block_kwargs[index][0], dev))   # this block's own (its kind of attention)
            dense_x = dense_x.to(dev, torch.float32)
            x = pruned_x.to(dev, torch.float32)
            # the block's faster causal attention, where it is the same (put back however the block ends)
            with faster(block, lambda: _through(block, dense_x[:2], kw, 2, products), products, dev) as grouped:
                if grouped:
                    quick.append(index)
                target_y = _through(block, dense_x, kw, opts.batch, products)   # the dense block on the dense inputs
                params: dict[tuple[str, str], torch.Tensor] = {}            # (module, param) → frozen entries
                layerwise_weights: dict[str, torch.Tensor] = {}              # for a block the steps did not help
                sub = [t for t in arch.targets.values() if t.block == index]
                with reporter.task(f"block {index}: layer-wise fits", total=len(sub)) as advance:
                    decided = _decided(layerwise, sub, read, dev, advance)
                for t, original, decision in decided:
                    place = loaded.places[t.name]
                    weight = place.view(modules)
                    new = decision.weight_for(original)
                    with torch.no_grad():
                        weight.copy_(new.to(weight.device, weight.dtype))
                    if decision.bias_delta is not None:
                        _add_bias(modules[place.module], decision.bias_delta, dev)
                    key = (place.module, place.param)
                    if key not in params:
                        params[key] = torch.ones_like(getattr(modules[place.module], place.param), dtype=torch.bool)
                    place.within(params[key]).copy_(new.to(params[key].device) == 0)
                    biases[t.name] = decision.bias_delta
                    layerwise_weights[t.name] = new
                trained = [getattr(modules[m], p) for m, p in params]

                def train(rate: float) -> tuple[list[float], list[int]]:
                    what = f"block {index}: steps" + ("" if rate == opts.lr else f" again at lr {rate:g}")
                    with reporter.task(what, total=opts.steps) as advance:
                        return refine_block(lambda xb: _output(block(xb, **for_windows(kw, len(xb)))), x,
                                            target_y, trained, list(params.values()), opts.steps, rate, opts.batch,
                                            generator, products, opts.warmup, opts.loss, on_step=advance)

                def error(windows: list[int]) -> float:
                    return _mse(_through(block, x[windows], kw, opts.batch, products), target_y[windows])

                def restore() -> None:
                    with torch.no_grad():       # only the targets' entries moved (the rest are frozen, exact)
                        for t in sub:
                            weight = loaded.places[t.name].view(modules)
                            weight.copy_(layerwise_weights[t.name].to(weight.device, weight.dtype))

                entry = {"block": index, **fit_or_keep(train, error, restore, opts.lr)}
                errors.append(entry)
                if sub:     # in the checkpoint's dtype, the layer-wise fit's (``weight_for``)
                    store.put(index, {t.name: loaded.places[t.name].view(modules).detach().to(
                        "cpu", layerwise_weights[t.name].dtype, copy=True) for t in sub})
                block.to(dtype)             # the next block sees what the checkpoint will compute
                if dtype == torch.float32:
                    pruned_x = _through(block, x, kw, opts.batch, products)
                else:
                    pruned_x = _through(block, x.to(dtype), _moved(kw, dev, dtype), opts.batch).float()
            dense_x = target_y
    gains = [e["after"] / e["before"] for e in errors if e["before"] > 0]
    kept = [e["block"] for e in errors if e["kept"] == "layer-wise"]
    slower = [e for e in errors if e["kept"] == "refined" and e["lr"] != opts.lr]
    if slower:              # fit_or_keep's rates, as each entry records them
        reporter.log(f"refinement: block(s) {', '.join(str(e['block']) for e in slower)} refined at half the rate, "
                     f"{slower[0]['lr']:g} (at {opts.lr:g} the steps did not lower their error)")
    if kept:
        rates = " nor at ".join(f"{rate:g}" for rate, _ in next(e for e in errors if e["kept"] == "layer-wise")["tried"])
        reporter.log(f"refinement: block(s) {', '.join(map(str, kept))} kept the layer-wise weights (the steps did "
                     f"not lower their error at {rates}; try a lower --refine-lr)")
    if gains:
        reporter.log(f"refinement: each block's output error × {min(gains):.2f}–{max(gains):.2f} of the layer-wise "
                     f"fit's (median × {sorted(gains)[len(gains) // 2]:.2f}, on its first step's windows)")
    facts = {"steps": opts.steps, "lr": opts.lr, "warmup": opts.warmup, "loss": opts.loss, "batch": opts.batch,
             "samples": len(windows), "precision": str(products).removeprefix("torch."),
             "seqlen": int(windows.shape[1]), "dataset": spec.dataset, "seed": spec.seed, "blocks": errors,
             "grouped_attention": quick}

    def layer(target, tensor) -> LayerDecision:
        return LayerDecision(weight=store.get(target.name), bias_delta=biases[target.name])

    return dataclasses.replace(layerwise, layer=layer, refined=facts)


def _decided(layerwise, targets, read, device: torch.device, advance: Callable[[], None] = lambda: None) -> list:
    """(target, its dense matrix, its layer-wise decision) for each of a block's ``targets``, decided on a pool of
    workers as the one-shot prune decides them (``runtime.decision_workers``: on the CPU one intra-op thread each,
    which keeps both cores of a 2-core machine busier than one decision at a time on two threads: 19 s → 15 s for
    SmolLM2's 210 layers under ``--update admm --admm-gradual``). Each matrix is read from the checkpoint's own
    tensor, as one-shot does, in this thread. ``advance()`` is called as each decision is made (progress)."""
    from concurrent.futures import as_completed

    from .runtime import decision_workers, one_thread_per_worker, worker_pool

    workers = min(decision_workers(device), len(targets))
    originals = [read(t) for t in targets]
    if workers < 2:
        decided = []
        for t, o in zip(targets, originals):
            decided.append((t, o, layerwise.layer(t, o)))
            advance()
        return decided
    with one_thread_per_worker(device, workers), worker_pool(workers) as pool:
        # the largest first (a solve's products grow as out × in²), so the last one is a small one
        order = sorted(range(len(targets)), key=lambda i: -originals[i].shape[0] * originals[i].shape[1] ** 2)
        futures = {i: pool.submit(layerwise.layer, targets[i], originals[i]) for i in order}
        for _ in as_completed(futures.values()):
            advance()
        return [(t, o, futures[i].result()) for i, (t, o) in enumerate(zip(targets, originals))]


def _checkpoint_reader(plan):
    """A function target → its dense [out, in] matrix as the checkpoint stores it."""
    from .checkpoint import tensor_reader

    read = tensor_reader(plan.source.path, plan.files)

    def matrix(target) -> torch.Tensor:
        tensor = read(target.weight_key)
        if target.index is not None or target.transposed:
            tensor = target.matrix(tensor)
        return tensor.clone()

    return matrix


def _moved(obj, device: torch.device, dtype: torch.dtype | None = None):
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device)
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _moved(v, device, dtype) for k, v in obj.items()}
    return obj


def _add_bias(linear: nn.Module, delta: torch.Tensor, device: torch.device) -> None:
    """Add a bias-correction change to ``linear``'s bias (created when it has none), as the checkpoint will."""
    weight = linear.weight
    with torch.no_grad():
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=device),
                                       requires_grad=False)
        linear.bias.add_(delta.to(linear.bias.device, linear.bias.dtype))
