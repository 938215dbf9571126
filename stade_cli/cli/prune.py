"""`stade prune MODEL --metric NAME --sparsity S -o OUT`: write a pruned checkpoint. stdout: OUT.

``prune`` is a plain function; ``command()`` gives it one flag per method option, from the method registry
(so a new method's options appear without editing this file), each method's in a help panel of its own.
"""
from __future__ import annotations

import copy
import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (cli_flag, BatchSize, Dataset, Device, DeviceMap, DType, Force, Json, MaxMemory, ModelArg, NSamples, OffloadDir,
                      Output, Quiet, SeqLen, Seed, Spill, placement)
from .output import state, emit_json, emit_line
from ..recipes import RECIPES

_RECIPE_FLAGS = RECIPES["best"].flags()


def prune(
    ctx: typer.Context,
    model: ModelArg,
    output: Output,
    metric: Annotated[Optional[str], typer.Option(help="The method (the list comes from the registry).")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights to zero, in [0, 1) \\[default: 0.5; implied by an N:M pattern].", show_default=False)] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M (e.g. 2:4) keeping N of every M consecutive inputs.")] = "unstructured",
    group: Annotated[str, typer.Option(help="row or layer: where unstructured sparsity compares weights.")] = "row",
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help="Fold the pruned weights' mean input into the bias \\[default: on for stade, stadew].", show_default=False)] = None,
    layer_sparsity: Annotated[str, typer.Option(help="uniform, or owl: blocks with more outlier activations keep more weights.")] = "uniform",
    owl_m: Annotated[float, typer.Option(help="OWL: a score is an outlier above this many times its block's mean.")] = 5.0,
    owl_lambda: Annotated[float, typer.Option(help="OWL: block sparsities span 2 × lambda around a mean of --sparsity.")] = 0.08,
    update: Annotated[str, typer.Option(help="none, or admm: refit the kept weights to the Gram matrix (needs --gram stats, or --sequential).")] = "none",
    sequential: Annotated[bool, typer.Option("--sequential", help="Prune block by block on the pruned blocks' outputs.")] = False,
    structure: Annotated[Optional[str], typer.Option(help="channels or blocks: remove that share of MLP channels or of blocks (a smaller model).", show_default=False)] = None,
    experts: Annotated[Optional[int], typer.Option(help="Keep K experts per MoE block, remove the rest (alone: nothing else).", show_default=False)] = None,
    expert_score: Annotated[str, typer.Option(help="How --experts ranks them: reap, frequency or random.")] = "reap",
    expert_min_tokens: Annotated[int, typer.Option(help="Experts that saw fewer calibration tokens use fallback statistics.")] = 128,
    refine: Annotated[int, typer.Option(help="Adam steps per decoder block fitting its kept weights to the dense block's outputs (0: off).")] = 0,
    refine_lr: Annotated[float, typer.Option(help="Refinement: peak learning rate (cosine decay to 0).")] = 1e-3,
    refine_warmup: Annotated[float, typer.Option(help="Refinement: share of the steps over which the learning rate first rises linearly to --refine-lr.")] = 0.0,
    refine_loss: Annotated[str, typer.Option(help="Refinement: mse (the mean squared difference from the dense block's outputs) or balanced (plus the same relative to each token's size, each part scaled to 1 at the first step).")] = "mse",
    refine_batch: Annotated[int, typer.Option(help="Refinement: calibration windows per step.")] = 4,
    refine_samples: Annotated[int, typer.Option(help="Refinement: calibration windows (from the stats' text and seed). More quality for more time: raise it with --refine (twice both: about twice the time).")] = 16,
    refine_seqlen: Annotated[int, typer.Option(help="Refinement: tokens per window.")] = 256,
    refine_precision: Annotated[str, typer.Option(help="Refinement: auto (bfloat16 products where the device is fast at them: CUDA, AMX, AVX512-BF16), float32 or bfloat16.")] = "auto",
    recipe: Annotated[Optional[str], typer.Option(help="best: the best measured composition, i.e. " + _RECIPE_FLAGS + "; flags you give win.", show_default=False)] = None,
    stats: Annotated[Optional[Path], typer.Option(help="STATS directory from `stade calibrate` \\[default: calibrate now].", show_default=False)] = None,
    only: Annotated[Optional[str], typer.Option(help="Regex: prune only the linears it matches.", show_default=False)] = None,
    skip: Annotated[Optional[str], typer.Option(help="Regex: keep the linears it matches dense.", show_default=False)] = None,
    dataset: Dataset = "c4",
    nsamples: NSamples = 128,
    seqlen: SeqLen = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: BatchSize = 1,
    force: Force = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    spill: Spill = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
    **method_options,
) -> None:
    """Score every target linear of MODEL, zero the lowest-scored weights, and write OUTPUT."""
    st = state(ctx, json_out, quiet)
    from ..pruning import prune as prune_model  # lazy: keeps `stade --help` fast

    given = None
    if recipe is not None:      # the flags typed on the command line win over the recipe's
        given = {name for name in ctx.params       # typer may carry its own click: the source's name, not its class
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
        method_options = {k: v for k, v in method_options.items() if k in given}
    report = prune_model(model, output, metric=metric, sparsity=sparsity, pattern=pattern, group=group,
                         stats=stats, bias_correction=bias_correction, layer_sparsity=layer_sparsity, owl_m=owl_m,
                         owl_lambda=owl_lambda, sequential=sequential, options=method_options,
                         dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                         dtype=dtype, batch_size=batch_size, only=only, skip=skip, force=force, update=update,
                         experts=experts, expert_score=expert_score, expert_min_tokens=expert_min_tokens,
                         structure=structure, refine=refine, refine_lr=refine_lr, refine_batch=refine_batch,
                         refine_samples=refine_samples, refine_seqlen=refine_seqlen,
                         refine_precision=refine_precision, refine_warmup=refine_warmup, refine_loss=refine_loss,
                         recipe=recipe, given=given,
                         reporter=st.reporter, placement=placement(device_map, max_memory, offload_dir, spill))
    if report is None:      # another rank than 0 under a launcher: rank 0 reports
        return
    for line in summary_lines(report, output):
        st.reporter.log(line)
    if st.json:
        emit_json({"output": str(Path(output).expanduser().resolve()), "overall": report["overall"], "method": report["method"],
                   "pattern": report["pattern"], "target_sparsity": report["target_sparsity"]})
    else:
        emit_line(str(output))


def count(n: int) -> str:
    """A parameter count as people read it: 134.5M, 6.74B, 40,352."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def structure_text(st: dict, params: dict | None) -> str:
    """What --structure removed, in one sentence (prune's last lines, inspect)."""
    if st["kind"] == "channels":
        how = st["metric"] + (", mean folded into the down projection's bias" if st["folded"] else "") + (
            ", kept channels refitted" if st["refit"] else "")
        line = (f"every MLP keeps {st['kept_per_block']} of its {st['width']} channels ({st['removed_per_block']} "
                f"removed; {how})")
    else:
        line = (f"{len(st['kept'])} of {st['blocks']} blocks kept (removed, those that change their input least: "
                f"{', '.join(map(str, st['removed']))})")
    if params:
        line += f"; parameters {count(params['before'])} → {count(params['after'])} (−{params['removed']:.1%})"
    return line


def summary_lines(report: dict, output) -> list[str]:
    """What prune says when it is done: what it removed, what it pruned, the targets' share of the blocks."""
    lines = []
    cov = report.get("coverage") or {}
    experts = report.get("experts") or {}
    removal = experts.get("removal")
    size = report.get("weight_bytes") or {}
    if removal:
        kept = len(next(iter(removal["kept"].values())))
        gone = len(next(iter(removal["removed"].values())))
        lines.append(f"removed {gone} of {kept + gone} experts in each of {len(removal['kept'])} MoE blocks (ranked "
                     f"by {removal['score']}); the config says {kept} experts"
                     + (f"; weights {size['before'] / 2**20:,.1f} → {size['after'] / 2**20:,.1f} MiB" if size else ""))
    structure = report.get("structure")
    if structure:
        lines.append(structure_text(structure, report.get("params")))
        lines.append(f"{output} is a smaller dense checkpoint: it loads wherever the model loads, and its config says "
                     "so; no retraining was done (a short fine-tune recovers more)")
        return lines
    if report["method"] is None:
        lines.append("no weight was zeroed in the kept experts and the other layers (add --sparsity S or an N:M "
                     "--pattern to prune them in the same run)")
        return lines
    corrected = report["bias_correction"]["layers"]
    how = report["method"] + (f" + {report['update']}" if report.get("update") else "") + (
        f" + refine ({report['refine']['steps']} steps a block)" if report.get("refine") else "")
    if report.get("recipe"):
        how = f"recipe {report['recipe']['name']}: {how}"
    fallback = (experts.get("fallback") or {}).get("experts") or []
    lines.append(f"pruned {len(report['layers'])} layers with {how} ({report['pattern']}, "
                 f"{report['mode']}): {report['overall']['sparsity']:.2%} of their weights are zero"
                 + (f"; {corrected} bias-corrected" if corrected else "")
                 + (f"; {len(fallback)} expert(s) on fallback statistics" if fallback else "")
                 + (f"; targets: {cov['share']:.2%} of the decoder blocks' weights" if cov else ""))
    lines.append(f"{output} is a dense checkpoint with zeros: it loads wherever the model loads and is "
                 + ("smaller only by the removed experts" if removal else "the same size on disk")
                 + "; speed-ups need sparse kernels (" + ("2:4 runs on recent NVIDIA GPUs" if
                 report["pattern"] == "2:4" else "e.g. a 2:4 pattern on recent NVIDIA GPUs") + ").")
    return lines


# The help's panels, in this order: what goes in and out, what is pruned, each method's options (from the
# registry), how calibration runs when prune calibrates itself, and where the model runs.
_GROUPS = {
    "Model and output": ("output", "stats", "force", "json_out", "quiet"),
    "Sparsity": ("recipe", "metric", "sparsity", "pattern", "group", "layer_sparsity", "owl_m", "owl_lambda", "only",
                 "skip", "update", "sequential", "refine", "refine_lr", "refine_warmup", "refine_loss", "refine_batch",
                 "refine_samples", "refine_seqlen", "refine_precision", "structure", "experts", "expert_score", "expert_min_tokens"),
    "Bias correction": ("bias_correction",),
    "Calibration (without --stats, or for --sequential)": ("dataset", "nsamples", "seqlen", "seed", "dtype",
                                                           "batch_size"),
    "Placement": ("device", "device_map", "max_memory", "offload_dir", "spill"),
}
_PANELS = {name: panel for panel, names in _GROUPS.items() for name in names}

# Shown by `stade prune --help-method NAME`, not in --help (which then fits about two screens): each method's own
# options (from the registry) and the details of the stages that are not methods.
_STAGES = {
    "refine": ("refine", "refine_lr", "refine_warmup", "refine_loss", "refine_batch", "refine_samples",
               "refine_seqlen", "refine_precision"),
    "owl": ("layer_sparsity", "owl_m", "owl_lambda"),
    "experts": ("experts", "expert_score", "expert_min_tokens"),
}
_DETAILS = {name for names in _STAGES.values() for name in names[1:]}


def _in_panel(annotation, panel: str, hidden: bool = False):
    """``Annotated[T, typer.Option(...)]`` with the option shown in ``panel`` of the help (or only by
    ``--help-method``)."""
    info = copy.copy(annotation.__metadata__[0])
    info.rich_help_panel = panel
    info.hidden = hidden
    return Annotated[annotation.__origin__, info]


def help_topics() -> list[str]:
    """What ``--help-method`` explains: every method with options of its own, then the stages."""
    from ..metrics import option_specs
    from ..metrics.base import RUN_SEED

    users = [u for spec in option_specs().values() if spec.name != RUN_SEED for u in spec.users]
    return list(dict.fromkeys(users)) + list(_STAGES)


def method_help(name: str) -> list[tuple[str, str, str]]:
    """(flag, default, description) of every option of method or stage ``name``."""
    from ..metrics import methods, option_specs
    from ..metrics.base import RUN_SEED

    if name in _STAGES:
        own = inspect.signature(prune, eval_str=True).parameters
        rows = []
        for key in _STAGES[name]:
            info = own[key].annotation.__metadata__[0]
            default = own[key].default
            rows.append((cli_flag(key), _shown(default), info.help or ""))
        return rows
    if name not in methods():
        from ..errors import UsageError

        raise UsageError(f"--help-method: no method or stage {name!r}", f"choose one of: {', '.join(help_topics())}"
                         f" (the other methods, {', '.join(m for m in methods() if m not in help_topics())}, have "
                         "no options of their own)")
    return [(cli_flag(s.name), _shown(s.default), s.help) for s in option_specs().values()
            if name in s.users and s.name != RUN_SEED]


def _shown(default) -> str:
    return "–" if default is None else {True: "on", False: "off"}.get(default, str(default)) \
        if isinstance(default, bool) else str(default)


def _help_method(ctx: typer.Context, value: Optional[str]) -> Optional[str]:
    if value is None or ctx.resilient_parsing:
        return value
    from rich.table import Table

    from ..errors import UsageError
    from ..metrics import methods
    from .output import help_console
    from ._errors import report

    try:
        rows = method_help(value)
    except UsageError as exc:
        raise typer.Exit(report(exc, False)) from None
    console = help_console()
    what = methods()[value].summary if value in methods() else {
        "refine": "block-wise refinement after the masks and the weight update (--refine N)",
        "owl": "non-uniform layer sparsity (--layer-sparsity owl)",
        "experts": "mixtures of experts: whole-expert removal and starved experts"}[value]
    console.print(f"[bold]{value}[/]: {what}", highlight=False)
    if not rows:
        console.print("no options of its own", highlight=False)
    table = Table(box=None, show_header=True, pad_edge=False)
    for col in ("option", "default", "what it does"):
        table.add_column(col, overflow="fold")
    for flag, default, text in rows:
        table.add_row(flag, default, text.replace("\\[", "["))
    if rows:
        console.print(table)
    sys.stdout.write("\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n")
    raise typer.Exit()


def command():
    """``prune`` with the method registry's options as flags (``ria_alpha`` → ``--ria-alpha``), each in the
    help panel of the methods that read it, and the metric list in the help of ``--metric``."""
    from ..metrics import metrics, option_specs
    from ..metrics.base import RUN_SEED

    params = []
    for p in inspect.signature(prune, eval_str=True).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.name == "metric":
            names = " | ".join(metrics())
            p = p.replace(annotation=Annotated[Optional[str], typer.Option(
                help=f"{names} \\[default: wanda; stade with --structure channels].", show_default=False)])
        if p.name in _PANELS:
            p = p.replace(annotation=_in_panel(p.annotation, _PANELS[p.name], hidden=p.name in _DETAILS))
        params.append(p)
        if p.name == "force":
            params.append(inspect.Parameter("help_method", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=(
                Annotated[Optional[str], typer.Option(
                    "--help-method", metavar="NAME", is_eager=True, callback=_help_method, show_default=False,
                    rich_help_panel=_PANELS["force"],
                    help=f"Show NAME's options and exit: {' | '.join(help_topics())}.")])))
        if p.name == "sequential":       # the methods' own options: in the registry, shown by --help-method
            for spec in option_specs().values():
                if spec.name == RUN_SEED:
                    continue              # the run's --seed
                params.append(inspect.Parameter(
                    spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default,
                    annotation=Annotated[spec.type, typer.Option(cli_flag(spec.name), help=spec.help, hidden=True)]))
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p
              for p in params]

    @functools.wraps(prune)
    def run(**kwargs):
        kwargs.pop("help_method", None)
        return prune(**kwargs)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    del run.__wrapped__              # typer must see this signature, not prune's
    return run


def listed(ctx: typer.Context) -> None:
    """Score every target linear of MODEL, zero the lowest-scored weights, and write OUTPUT."""
    raise AssertionError("the full prune command runs instead")  # pragma: no cover - see app.StadeGroup
