"""`stade inspect PATH`: per-layer sparsity of a checkpoint, or the activation statistics of a STATS dir."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import UsageError
from .options import Json, Quiet
from .output import state, emit_json, stdout_console


def inspect(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A checkpoint directory or a STATS directory.", show_default=False)],
    pattern: Annotated[Optional[str], typer.Option(help="N:M pattern to check conformance against \\[default: the report's].", show_default=False)] = None,
    against: Annotated[Optional[Path], typer.Option(help="Compare PATH with this checkpoint: which layers differ, how many weights changed.", show_default=False)] = None,
    layers: Annotated[bool, typer.Option("--layers/--summary", help="Also list every layer, after the summary and the blocks (--summary: only those).")] = True,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw it into this .png: per-block bars and a heat map of every layer (needs matplotlib).", show_default=False)] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Report per-layer sparsity (computed from the tensors) or per-layer activation statistics."""
    st = state(ctx, json_out, quiet)
    from ..report import inspect as inspect_path  # lazy: keeps `stade --help` fast

    if plot is not None:
        from ..plots import check_plot_path, need_matplotlib

        if against is not None:
            raise UsageError("--plot draws one checkpoint or stats directory, not a comparison",
                             "drop --against, or plot each side on its own")
        need_matplotlib()
        plot = check_plot_path(plot)
    summary = inspect_path(path, pattern, against)
    if st.json:
        emit_json(summary)
    elif summary["kind"] == "checkpoint":
        render_checkpoint(summary, layers)
    elif summary["kind"] == "stats":
        render_stats(summary, layers)
    else:
        render_comparison(summary)
    if plot is not None:
        from ..plots import checkpoint_plot, stats_plot

        drawn = (checkpoint_plot if summary["kind"] == "checkpoint" else stats_plot)(summary, plot)
        st.reporter.log(f"drew {drawn}")


_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(fraction: float, width: int = 24) -> str:
    """A bar of ``width`` cells with eighth-cell steps: 1/192 of the scale, so 48% and 52% differ."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width, "·")


def render_checkpoint(s: dict, layers: bool = True) -> None:
    """Summary first, then the blocks, then the layers, and the summary's two lines again at the end: on a
    model of hundreds of layers the top has scrolled away when the user looks."""
    console = stdout_console()
    o = s["overall"]
    console.print(f"[bold]{s['path']}[/]")
    what, line = _checkpoint_summary(s)
    console.print(what)
    console.print(line)
    st = s.get("structure")
    cov = s.get("coverage")
    if cov and not st:
        console.print(f"targets: {cov['share']:.2%} of the decoder blocks' weights ({cov['target_params']:,} of "
                      f"{cov['block_params']:,})")
    for text in experts_lines(s.get("experts")):
        console.print(text, highlight=False)
    for text in structure_lines(s.get("structure"), s.get("params")):
        console.print(text, highlight=False)
    if s.get("nm_ok") is not None and s.get("target_sparsity") is not None:
        extra = o["zeros"] - round(o["params"] * s["target_sparsity"])
        if extra > 0:
            console.print(f"({extra:,} zeros beyond {s['pattern']}'s share: weights that were zero already)")
    _checkpoint_tables(console, s, layers)
    console.rule("summary", align="left", style="dim")
    console.print(what)
    console.print(line)


def _checkpoint_summary(s: dict) -> tuple[str, str]:
    """(method · pattern · target · layers, overall sparsity and whether the report and the pattern hold)."""
    o = s["overall"]
    from ..report import _how

    method = _how(s)
    if method and s.get("recipe"):
        method = f"{method} (recipe {s['recipe']})"
    removed = ((s.get("experts") or {}).get("removal")) is not None
    st = s.get("structure")
    none = ("– (experts removed, nothing else pruned)" if removed else
            f"{st.get('metric', '')} ({st['kind']} removed)".strip() if st else "– (no stade report)")
    what = [f"method {method or none}", f"pattern {s.get('pattern') or 'dense'}"]
    if s.get("target_sparsity") is not None:
        what.append(f"target {s['target_sparsity']:.2%}")
    what.append(f"{len(s['layers'])} target layers")
    line = f"overall: {o['zeros']:,} of {o['params']:,} weights are zero ({o['sparsity']:.2%})"
    if "report_agrees" in s:
        line += "; the report agrees" if s["report_agrees"] else "; [red]the report disagrees with the tensors[/]"
    if s.get("nm_ok") is not None:
        line += f"; every row follows {s['pattern']}" if s["nm_ok"] else f"; [red]some rows break {s['pattern']}[/]"
    return " · ".join(what), line


def _checkpoint_tables(console, s: dict, layers: bool) -> None:
    blocks = Table(title="per block", title_justify="left")
    for col in ("block", "target", "sparsity", "zeros", "params"):
        blocks.add_column(col, justify="right")
    blocks.add_column("sparsity, 0 → 100%", justify="left")
    for b in s["blocks"]:
        target = f"{b['target']:.2%}" if b.get("target") is not None else "–"
        sparsity = f"{b['sparsity']:.2%}" if not b.get("off_target") else f"[bold yellow]{b['sparsity']:.2%}[/]"
        blocks.add_row(str(b["block"]), target, sparsity, f"{b['zeros']:,}", f"{b['params']:,}",
                       f"[cyan]{bar(b['sparsity'])}[/]")
    console.print(blocks)
    if layers:
        nm = s.get("nm_ok") is not None
        table = Table(title="per layer", title_justify="left")
        for col, justify in (("layer", "left"), ("shape", "right"), ("zeros", "right"), ("sparsity", "right")):
            table.add_column(col, justify=justify)
        if nm:
            table.add_column(s["pattern"], justify="center")
        for name, l in s["layers"].items():
            sparsity = f"{l['sparsity']:.2%}" if not l.get("off_target") else f"[bold yellow]{l['sparsity']:.2%}[/]"
            row = [name, "×".join(map(str, l["shape"])), f"{l['zeros']:,}", sparsity]
            if nm:
                row.append("ok" if l["nm_ok"] else "[red]no[/]")
            table.add_row(*row)
        console.print(table)
    off = [n for n, l in s["layers"].items() if l.get("off_target")]
    off_blocks = [b["block"] for b in s["blocks"] if b.get("off_target")]
    if off or off_blocks:
        console.print(f"[bold yellow]{len(off)} layer(s) and {len(off_blocks)} block(s) differ from the target "
                      "sparsity[/] (highlighted)")


def structure_lines(st: dict | None, params: dict | None) -> list[str]:
    """What --structure removed: channels per MLP, or which blocks."""
    from .prune import structure_text

    return [f"structure: {structure_text(st, params)}"] if st else []


def experts_lines(e: dict | None) -> list[str]:
    """A mixture of experts: how many, which were removed, which were pruned from fallback statistics."""
    if not e:
        return []
    lines = [f"mixture of experts: {'/'.join(map(str, e['per_block']))} experts in each of {e['blocks']} blocks"]
    removal = e.get("removal")
    if removal:
        removed = next(iter(removal["removed"].values()), [])
        lines[0] += f"; {len(removed)} per block removed (ranked by {removal['score']})"
    fallback = e.get("fallback")
    if fallback and fallback.get("experts"):
        which = ", ".join(f"block {b} expert {x} ({n} tokens)" for b, x, n in fallback["experts"][:4])
        more = f" and {len(fallback['experts']) - 4} more" if len(fallback["experts"]) > 4 else ""
        lines.append(f"{len(fallback['experts'])} expert(s) saw fewer than {fallback['min_tokens']} calibration "
                     f"tokens and were pruned from fallback statistics (gate/up: the block's pooled input, down: "
                     f"magnitude): {which}{more}")
    elif fallback is not None:
        lines.append(f"every expert saw at least {fallback['min_tokens']} calibration tokens")
    return lines


def render_stats(s: dict, layers: bool = True) -> None:
    """Summary first (what was measured, on what, what it enables), then the blocks, then the layers."""
    from ..plots import dataset_name

    console = stdout_console()
    m = s["manifest"]
    console.print(f"[bold]{s['path']}[/]", highlight=False)
    console.print(f"stats of {m['model']['ref']} (fingerprint {m['model']['fingerprint']})", highlight=False,
                  markup=False)
    calibration = (f"calibration: {dataset_name(m['dataset'])} · {m['nsamples']} × {m['seqlen']} tokens · "
                   f"seed {m['seed']} · {m['dtype']}")
    console.print(calibration, highlight=False, markup=False)
    gram = (f"Gram matrices: yes ({s['gram_bytes'] / 2**20:,.1f} MiB): every method can use these stats"
            if s.get("gram_bytes") else
            "Gram matrices: no (sparsegpt needs them: stade calibrate --gram); every other method can use these")
    inputs = f"{len(s['layers'])} layer inputs in {len(s['blocks'])} blocks · {gram}"
    console.print(inputs, highlight=False)
    e = s.get("experts")
    if e:
        console.print(f"mixture of experts: {'/'.join(map(str, e['per_block']))} experts in each of {e['blocks']} "
                      f"blocks; tokens routed to an expert: {e['tokens_min']:,} to {e['tokens_max']:,} (median "
                      f"{e['tokens_median']:,}); "
                      + ("router weights recorded (--expert-score reap, frequency or random)" if e["reap"] else
                         "no router weights (transformers 4.x): --expert-score frequency or random"), highlight=False)
    if s["blocks"]:
        scale = max(b["mean_over_std"] for b in s["blocks"]) or 1.0
        blocks = Table(title="per block (mean over the block's layers; |μ|/σ large: STADE and Wanda rank "
                             "weights differently)", title_justify="left")
        for col in ("block", "layers", "mean σ", "mean |μ|", "max σ", "|μ|/σ"):
            blocks.add_column(col, justify="right")
        blocks.add_column(f"|μ|/σ, 0 → {scale:.3g}", justify="left")
        for b in s["blocks"]:
            blocks.add_row(str(b["block"]), str(b["layers"]), f"{b['mean_std']:.4f}", f"{b['mean_abs_mean']:.4f}",
                           f"{b['max_std']:.2f}", f"{b['mean_over_std']:.3f}",
                           f"[cyan]{bar(b['mean_over_std'] / scale)}[/]")
        console.print(blocks)
    if layers:
        table = Table(title="per layer, largest mean |μ| first (where STADE and Wanda disagree most)",
                      title_justify="left")
        for col, justify in (("layer", "left"), ("in", "right"), ("mean |μ|", "right"), ("mean σ", "right"),
                             ("max σ", "right"), ("max |μ|", "right")):
            table.add_column(col, justify=justify)
        for r in s["layers"]:
            table.add_row(r["name"], str(r["in_features"]), f"{r['mean_abs_mean']:.4f}", f"{r['mean_std']:.4f}",
                          f"{r['max_std']:.2f}", f"{r['max_abs_mean']:.2f}")
        console.print(table)
    if s["blocks"] or layers:           # the top has scrolled away: what these stats are, once more
        console.rule("summary", align="left", style="dim")
        console.print(f"stats of {m['model']['ref']} · {calibration}", highlight=False, markup=False)
        console.print(inputs, highlight=False)


def render_comparison(s: dict) -> None:
    console = stdout_console()

    def side(key: str) -> str:
        method, pattern = s.get(f"{key}_method"), s.get(f"{key}_pattern")
        return f"{s[key]} ({method}, {pattern})" if method else f"{s[key]} (no stade report: dense?)"

    console.print(f"A: {side('a')}", highlight=False)
    console.print(f"B: {side('b')}", highlight=False)
    table = Table(caption="weights changed: any value that differs; mask changed: zero in one, not in the other "
                          "(they differ when a method also updates the kept weights, as SparseGPT does)")
    for col, justify in (("layer", "left"), ("weights changed", "right"), ("mask changed", "right"),
                         ("sparsity A", "right"), ("sparsity B", "right")):
        table.add_column(col, justify=justify)
    for name, l in s["layers"].items():
        style = "" if l["changed"] else "dim"
        table.add_row(name, f"{l['changed']:,}", f"{l['mask_changed']:,}", f"{l['sparsity_a']:.2%}",
                      f"{l['sparsity_b']:.2%}", style=style)
    console.print(table)
    console.print(f"{len(s['differing_layers'])} of {len(s['layers'])} layers differ; "
                  f"{s['changed']:,} of {s['params']:,} weights changed ({s['changed'] / max(s['params'], 1):.2%}), "
                  f"{s['mask_changed']:,} of them in the mask")
