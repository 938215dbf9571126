"""Prune, the short story: plan → decide → write.

1. ``plan``: everything decided and checked before any weight is read (``plan.py``), one immutable Plan.
2. ``decide``: per-layer ``LayerDecision``s, from one of two producers: one-shot, from the dense model's
   cached moments, made tensor by tensor as the writer streams (``decide.py``; no forward pass), or
   ``--sequential``, block by block on the pruned model's own activations (``sequential.py``).
3. ``write``: the input shards streamed into the output's staging directory with the index, side files
   and report (``writer.py``); ``outputs.Output`` puts it in place atomically, only over stade's own output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import weight_files
from .decide import one_shot
from .distributed import World, claimed, current
from .errors import check_types
from .loading import CalibrationSpec, Placement, resolve_for, run_inputs
from .metrics.base import check_mapping
from .outputs import Output, check_space
from .plan import PruneRequest, check_request, make_plan
from .runtime import Reporter
from .refine import RefineOptions
from .sequential import sequential as sequential_decisions
from .writer import write


def _needs(plan) -> str:
    """The estimate prune prints before the work (``estimate.py``)."""
    from .estimate import prune_memory
    from .runtime import human_bytes

    sizes = [(plan.source.path / f).stat().st_size for f in plan.files]
    gram = plan.needs_gram and not plan.request.sequential
    memory = prune_memory(max(sizes), plan.arch, gram, workers=1 if plan.device.type != "cpu" else 2)
    where = "" if plan.device.type == "cpu" else f" (and the layers in flight on {plan.device})"
    line = (f"needs about {human_bytes(memory)} of memory{where} and {human_bytes(sum(sizes))} of disk for the output"
            + (" (Gram matrices read one block at a time)" if gram else ""))
    if plan.request.refine.on:
        parts, refined, on_disk = _refine_parts(plan)
        where = "on disk" if on_disk else "in host memory"
        if not on_disk and plan.device.type == "cpu":
            parts["the refined weights until written"] = refined
            where = ""
        line += (f"; the refinement about {human_bytes(sum(parts.values()))} in all on {plan.device.type}: "
                 + ", ".join(f"{what} {human_bytes(n)}" for what, n in parts.items())
                 + (f" (the refined weights wait for the writer {where}: {human_bytes(refined)})" if where else ""))
    return line


def _refine_parts(plan) -> tuple[dict[str, int], int, bool]:
    """What ``--refine`` holds on its device, part by part (``estimate.refine_needs_of``, with the config's
    attention heads), with the model's weights as it loads them (a block at a time where they would not fit) and
    the runner's cached hidden states; then the refined weights' bytes until written (in the host's memory), and
    whether they go to disk instead (``RefinedWeights.open``'s rule)."""
    import torch

    from .checkpoint import checkpoint_dtype
    from .blockwise import HiddenCache
    from .estimate import hidden_width, refine_needs_of, refined_bytes
    from .loading import Runtime
    from .runtime import available_bytes, fits, to_disk

    rt = Runtime.of(plan.source, plan.device, plan.request.dtype)
    text = getattr(rt.config, "text_config", None) or rt.config
    hidden = hidden_width(plan.arch)
    heads = int(getattr(text, "num_attention_heads", None) or max(hidden // 64, 1))
    opts, seqlen = plan.request.refine, plan.refine_windows.seqlen or 2048
    r = refine_needs_of(plan.arch, heads, opts.samples, seqlen, opts.batch)
    weights = rt.footprint()
    loaded = weights.total if fits(weights.total, available_bytes(plan.device)) else weights.block + weights.rest
    refined = refined_bytes(plan.arch, checkpoint_dtype(rt.config).itemsize)
    spill = plan.request.placement.spill if plan.request.placement else "auto"
    parts = {f"the model's weights in {str(rt.dtype).removeprefix('torch.')}"
             + ("" if loaded == weights.total else ", a block at a time"): loaded,
             "a block's weights in float32 with Adam's state": r.block,
             "the windows' hidden states": r.hidden + HiddenCache.nbytes((opts.samples, seqlen, hidden), rt.dtype),
             "a step's activations": r.activations}
    return parts, refined, to_disk(spill, refined, available_bytes(torch.device("cpu")))


def prune(model: str, out: str | Path, *, metric: str | None = None, sparsity: float | None = None,
          pattern: str = "unstructured", group: str = "row", stats: str | Path | None = None,
          bias_correction: bool | None = None, layer_sparsity: str = "uniform", owl_m: float = 5.0,
          owl_lambda: float = 0.08, sequential: bool = False, options: Mapping[str, Any] | None = None,
          dataset: str = "c4", nsamples: int = 128, seqlen: int | None = None, seed: int = 0,
          device: str = "auto", dtype: str = "auto", batch_size: int = 1, only: str | None = None,
          skip: str | None = None, force: bool = False, reporter: Reporter | None = None,
          placement=None, update: str = "none", experts: int | None = None, expert_score: str = "reap",
          expert_min_tokens: int = 128, structure: str | None = None, refine: int = 0, refine_lr: float = 1e-3,
          refine_batch: int = 4, refine_samples: int = 16, refine_seqlen: int | None = 256,
          refine_precision: str = "auto", refine_warmup: float = 0.0, refine_loss: str = "mse",
          recipe: str | None = None, given: set[str] | None = None) -> dict:
    """Prune ``model`` into the checkpoint directory ``out``; returns the report written beside it.

    ``options``: method options by name (``{"ria_alpha": 1.0, "init": "stade"}``; see ``stade prune --help-method NAME``
    or ``stade_cli.metrics.option_specs()``), the rest at their defaults. ``bias_correction`` None means the
    method's default (on for stade and stadew). ``update``: ``admm`` reconstructs the kept weights after the
    mask from the Gram matrix (its options ``admm_*`` in ``options``). ``placement`` (``loading.Placement``: device map, memory
    budget, offload dir, spilling) applies to the forward passes: ``--sequential`` and calibrating on the fly.
    ``force`` replaces only an empty directory or a pruned checkpoint that stade wrote (``outputs.py``).

    Mixtures of experts: every expert's matrices are targets, each with the statistics of the tokens routed to it;
    an expert that saw fewer than ``expert_min_tokens`` tokens uses fallback statistics (``experts.py``).
    ``experts=K`` keeps the K best experts of every MoE block (``expert_score``: reap, frequency or random) and
    removes the others; with ``sparsity=None`` (and no N:M pattern) nothing else is pruned.

    ``refine=N``: after the masks and the update, N Adam steps per block (``refine_lr``, ``refine_batch`` windows
    a step, from ``refine_samples`` windows of ``refine_seqlen`` tokens of the calibration text) fit the kept
    weights of each decoder block to the dense model's block outputs, on the pruned model's inputs (``refine.py``);
    ``refine_precision``: auto (bfloat16 products where the device is fast at them), float32 or bfloat16;
    ``refine_warmup``: the share of the steps over which the learning rate first rises linearly;
    ``refine_loss``: mse, or balanced (``refine.LOSSES``).
    ``recipe`` (``best``: ``recipes.py``) sets the arguments and options it stands for, except those in ``given``
    (the names the caller set; default: the arguments that differ from their defaults, and every key of
    ``options``); the report records the recipe, its flags and what the call overrode.

    ``structure``: ``channels`` removes the fraction ``sparsity`` of every MLP's channels (scored by ``metric``:
    magnitude, wanda, or stade, the default with ``metric=None``, which folds their mean into the down projection's
    bias; ``update="admm"`` refits the kept ones from the Gram matrix); ``blocks`` removes that fraction of the
    decoder blocks, those that change their input least. The output is a smaller dense checkpoint.
    """
    check_mapping(options)          # before the model card's command reads them
    args = {k: v for k, v in locals().items() if k not in ("recipe", "given")}
    caller = dict(args)         # what the caller set, before the recipe fills in the rest (the unused-flag note)
    args, record, command = _resolve(args, recipe, given)
    return _prune(**args, recipe=record, command=command, caller=caller)


def _resolve(args: dict, recipe: str | None, given: set[str] | None) -> tuple[dict, dict | None, str]:
    """``prune()``'s arguments as it runs them: their types checked, the recipe applied (with its record), the
    defaults that depend on the rest filled in; and the ``stade prune`` command of the call (the model card's)."""
    args["model"] = os.fspath(args["model"])                    # a Path is as good as a string
    args["dataset"] = args["dataset"] and os.fspath(args["dataset"])
    check_types(prune, {**args, "recipe": recipe}, skip=("device",))       # a torch.device is a device too
    record, keep = None, set()
    if recipe is not None:
        from .recipes import apply_to_call, get_recipe

        # what the caller set against the recipe stays on the card's command even where it is the general default
        keep = {k for k, v in get_recipe(recipe).values if given and k in given
                and (args["options"] or {}).get(k, args.get(k)) != v}
    command = _command({**args, "recipe": recipe}, keep)
    if recipe is not None:
        args, record = apply_to_call(prune, args, recipe, given)
    # the defaults that depend on the rest: 50% unless an N:M pattern, --experts or --structure says otherwise;
    # Wanda's scores, but --structure has its own default (stade, or wanda where no bias can hold the mean)
    if args["sparsity"] is None and ":" not in args["pattern"] and args["experts"] is None and args["structure"] is None:
        args["sparsity"] = 0.5
    if args["metric"] is None and args["structure"] is None:
        args["metric"] = "wanda"
    return args, record, command


def request(model: str | os.PathLike, **kwargs) -> PruneRequest:
    """The request ``prune(model, OUT, **kwargs)`` runs (the recipe applied, the defaults filled in), before any file
    is read: ``plan.check_request`` checks it as prune does, ``plan.reads`` says what it reads from the stats
    (``stade sweep`` checks its entries and chooses its calibration with them)."""
    defaults = {k: v for k, v in _defaults().items() if k not in ("model", "out")}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"prune() got an unexpected keyword argument {unknown[0]!r}")
    check_mapping(kwargs.get("options"))
    args = {**defaults, **kwargs, "model": model, "out": ""}
    recipe, given = args.pop("recipe"), args.pop("given")
    args, record, command = _resolve(args, recipe, given)
    return _request(args, record, command)


def _request(a: Mapping[str, Any], recipe: Mapping[str, Any] | None, command: str | None) -> PruneRequest:
    """``prune()``'s resolved arguments (by name) as a ``PruneRequest``."""
    return PruneRequest(a["model"], a["metric"], a["sparsity"], a["pattern"], a["group"],
                        Path(a["stats"]) if a["stats"] is not None else None, a["bias_correction"],
                        a["layer_sparsity"], a["owl_m"], a["owl_lambda"], a["sequential"], dict(a["options"] or {}),
                        CalibrationSpec(a["dataset"], a["nsamples"], a["seqlen"], a["seed"], a["batch_size"]),
                        a["device"], a["dtype"], a["only"], a["skip"], a["placement"], a["update"],
                        structure=a["structure"], experts=a["experts"], expert_score=a["expert_score"],
                        expert_min_tokens=a["expert_min_tokens"],
                        refine=RefineOptions(a["refine"], a["refine_lr"], a["refine_batch"], a["refine_samples"],
                                             a["refine_seqlen"], a["refine_precision"], a["refine_warmup"],
                                             a["refine_loss"]),
                        recipe=recipe, command=command)


def _defaults() -> dict[str, Any]:
    """``prune()``'s own defaults, by argument name (what the card's command and the unused-flag notes leave out)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(prune).parameters.items()}


def output_bytes(model: Path) -> int:
    """About what a pruned checkpoint of ``model`` takes on disk: its weights (the same size: zeros are stored),
    its side files (config, tokenizer: copied), and a MiB for the report, the card and the index."""
    from .checkpoint import side_files

    return (sum((model / f).stat().st_size for f in weight_files(model))
            + sum(p.stat().st_size for p in side_files(model)) + (1 << 20))


def _command(args: dict, keep: set[str] = frozenset()) -> str:
    """The ``stade prune`` command line of this call (for the model card); ``keep``: names shown even at their
    default (a recipe's value the caller overrode with it)."""
    from .card import command_line
    from .metrics import option_specs

    defaults = {k: v for k, v in _defaults().items() if k not in keep}
    return command_line(args, defaults, {name: spec.default for name, spec in option_specs().items() if name not in keep})


def _unused(metric, update, structure, layer_sparsity, refine, stats, options: Mapping[str, Any],
            **values) -> list[str]:
    """What the caller set that this run does not read, said so (a flag for another method, OWL's without OWL, the
    refinement's without it, a calibration text beside the stats that fix it): one phrase each."""
    from .metrics import option_specs
    from .recipes import as_flag

    defaults = _defaults()
    changed = {k for k, v in values.items() if v != defaults[k]}
    said = []
    specs = option_specs()
    used = set()
    if metric is not None:          # the metric and what it runs itself (DSnoT: its --init)
        from .metrics import build_options, get_metric

        used = {m.name for m in get_metric(metric).running(build_options(options))}
    if update not in (None, "none") and structure is None:      # --structure's refit has its own damping
        used.add(update)
    def flags(names) -> str:
        names = [as_flag(n, True) for n in names]
        return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]

    def verb(names, one: str, many: str) -> str:
        return one if len(names) == 1 else many

    for name, value in options.items():
        spec = specs.get(name)
        if spec is not None and value != spec.default and not used & set(spec.users):
            why = ("--structure channels refits with its own damping" if structure and "admm" in spec.users
                   else f"only {', '.join(spec.users)} read{'s' if len(spec.users) == 1 else ''} it")
            said.append(f"{flags([name])} changes nothing in this run ({why})")
    owl = sorted(changed & {"owl_m", "owl_lambda"})
    if owl and layer_sparsity != "owl":
        said.append(f"{flags(owl)} {verb(owl, 'applies', 'apply')} only with --layer-sparsity owl")
    tuned = [k for k in values if k.startswith("refine_") and k in changed]
    if tuned and not refine:
        said.append(f"{flags(tuned)} {verb(tuned, 'applies', 'apply')} only with --refine N")
    text = sorted(changed & {"dataset", "nsamples", "seqlen"})        # not --seed: it also seeds stochria, experts
    if text and stats is not None:
        said.append(f"{flags(text)} {verb(text, 'is', 'are')} not used: with --stats every step uses the text "
                    "and windows the stats were calibrated with")
    return said


def _prune(model, out, metric, sparsity, pattern, group, stats, bias_correction, layer_sparsity, owl_m, owl_lambda,
           sequential, options, dataset, nsamples, seqlen, seed, device, dtype, batch_size, only, skip, force,
           reporter, placement, update, experts, expert_score, expert_min_tokens, structure, refine, refine_lr,
           refine_batch, refine_samples, refine_seqlen, refine_precision, refine_warmup, refine_loss, recipe,
           command=None, caller: Mapping[str, Any] | None = None) -> dict:
    request = _request(locals(), recipe, command)     # first: locals() holds the arguments alone
    reporter = reporter or Reporter()
    started = time.perf_counter()
    checked = check_request(request)
    # what the run reads (the recipe applied) against what the caller set: a recipe's own flags that this run does
    # not read (its --refine-lr under --refine 0) are not the caller's to be told about
    mine = caller if caller is not None else locals()
    unused = _unused(metric, update, structure, layer_sparsity, refine, stats, mine["options"] or {},
                     **{k: mine[k] for k in ("owl_m", "owl_lambda", "refine_lr", "refine_batch", "refine_samples",
                                             "refine_seqlen", "refine_precision", "refine_warmup", "refine_loss",
                                             "dataset", "nsamples", "seqlen")})
    if unused:
        reporter.log(f"note: {'; '.join(unused)}")
    world = current()
    if world.several and request.refine.on:
        from .errors import UsageError

        raise UsageError("--refine runs in one process (it trains one block at a time on one device)",
                         "run this prune without the launcher; --device-map spreads a model that does not fit")
    if recipe is not None:
        reporter.log(f"recipe {recipe['name']}: {recipe['flags']}"
                     + (f" (yours instead: {' '.join(recipe['overridden'])})" if recipe["overridden"] else ""))
    out = Path(out).expanduser()
    dest = Output(out, "checkpoint", force, reporter.log)
    with claimed(dest, world, run_inputs(model, dataset, placement, stats)):   # checked and locked before any work
        source = resolve_for(model, dest, world, dataset, placement, stats, then=lambda source: check_space(
            out, output_bytes(source.path)))
        with world.together():
            plan = make_plan(request, checked, source, weight_files(source.path), started, world)
        for note in plan.notes:
            reporter.log(note)
        reporter.log(_needs(plan))
        if world.several and not sequential:
            idle = max(world.size - len(plan.files), 0)
            reporter.log(f"{world.size} ranks share the {len(plan.files)} weight shard(s), balanced by bytes"
                         + (f"; {idle} rank(s) have no shard to write" if idle else ""))
        decisions = (sequential_decisions if sequential else one_shot)(plan, reporter)
        with contextlib.ExitStack() as held:
            if request.refine.on:
                from .refine import RefinedWeights, refine as refined

                # the refined weights wait for the writer in memory or, past half of it, in files removed here
                spill = placement or Placement()
                store = held.enter_context(RefinedWeights(spill.spill, spill.offload_dir))
                decisions = refined(plan, decisions, reporter, store)
            if sequential and world.several:
                # every rank made the same decisions (from the sums over all ranks' windows): rank 0 writes them
                if not world.main:
                    return None
                reporter.log("the forward passes were shared by the ranks; rank 0 writes the checkpoint")
                plan = dataclasses.replace(plan, world=World())
            return write(plan, decisions, dest, reporter)
