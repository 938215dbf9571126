"""Pictures of what inspect and sweep report, as PNG files (matplotlib: the optional ``plot`` extra).

Every function takes the plain data the library returns (``report.inspect``, ``sweep.sweep``) and a path.
A PNG is written atomically, and only where nothing is or where a PNG stade drew is (each carries a
``Software: stade`` text chunk), so ``--plot`` never overwrites a user's picture.
"""
from __future__ import annotations

import io
import math
import struct
from pathlib import Path

from ._version import __version__
from .errors import UsageError

SOFTWARE = "stade"


def need_matplotlib():
    """pyplot on the Agg backend, or a one-line refusal naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         "pip install 'stade-cli[plot]' (or pip install matplotlib)") from None
    return plt


def check_plot_path(path: str | Path, output: str | Path | None = None) -> Path:
    """Refuse, before any work, a --plot path that is not a .png, holds something stade did not draw, or lies
    inside a stade output (``output``: the one this command writes, which may not exist yet): a file added to an
    output makes it no longer stade's own, so a later ``--force`` or ``eval --record`` would refuse it."""
    from .outputs import MARKER, check_file

    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path} is not a .png file name", "e.g. --plot sweep.png")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"--plot {path}: {path.parent} is not a directory")
    real = path.absolute().resolve()
    mine = Path(output).expanduser().absolute().resolve() if output is not None else None
    for folder in real.parents:
        if folder == mine or (folder / MARKER).is_file():
            raise UsageError(f"--plot {path} is inside {folder}, an output of stade's: a file added to it would make "
                             "a later --force refuse it as not stade's own",
                             f"draw it beside it, e.g. --plot {folder.parent / (folder.name + '-' + path.name)}")
    check_file(path, png_is_ours, "a plot stade drew")
    return path


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file ({} for anything that is not a PNG)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {}
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return {}
    out, at = {}, 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        at += 12 + length
    return out


def png_is_ours(path: Path) -> bool:
    return png_text(path).get("Software", "").startswith(SOFTWARE)


def save(fig, path: str | Path, ours=None) -> Path:
    """``ours``: which existing file may be replaced [default: a PNG stade drew]."""
    from .outputs import replace_file

    plt = need_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": f"{SOFTWARE} {__version__}"})
    plt.close(fig)
    path = Path(path).expanduser()
    replace_file(path, buf.getvalue(), ours or png_is_ours, "a plot stade drew")
    return path


def _log_axis(ax) -> None:
    """Perplexity on a log scale with plain numbers (20, 50, 100), minor ticks labelled when they fit."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    if hi / lo < 30:
        ax.yaxis.set_minor_formatter(plain)
    elif hi / lo < 1e4:
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def sweep_plot(result: dict, path: str | Path, title: str | None = None, ours=None) -> Path:
    """Perplexity (log) against sparsity, a line per method; N:M cells as hollow squares at their sparsity."""
    plt = need_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dense = (result.get("dense") or {}).get("ppl")
    if dense is not None and math.isfinite(dense):
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    any_nm = False
    for i, row in enumerate(result["rows"]):
        color = colors[i % len(colors)]
        line, squares = [], []
        for c in result["cells"]:
            ppl = row["cells"].get(c["label"], {}).get("ppl")
            if ppl is None or not math.isfinite(ppl) or ppl <= 0:
                continue
            (line if c["pattern"] == "unstructured" else squares).append((100 * c["implied_sparsity"], ppl,
                                                                          c["label"]))
        if line:
            line.sort()
            ax.plot([x for x, _, _ in line], [y for _, y, _ in line], marker="o", color=color, label=row["label"])
        for x, y, label in squares:
            ax.scatter([x], [y], marker="s", s=60, facecolors="none", edgecolors=color, linewidths=1.5,
                       label=None if line else row["label"], zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 0), fontsize=8, color=color,
                        va="center")
            any_nm = True
    if any_nm:
        ax.scatter([], [], marker="s", facecolors="none", edgecolors="gray", label="N:M (at its sparsity)")
    _log_axis(ax)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("perplexity (log scale; lower is better)")
    ax.set_title(title or f"{Path(result['settings']['model']).name}: perplexity vs sparsity", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path, ours)


def _blocks_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")


def _short(role: str) -> str:
    """A column label: the layer's own name, with its expert when it has one (``e3.w1``, ``gate_up_proj[3]``)."""
    parts = role.split(".")
    if len(parts) >= 2 and parts[-2].isdigit():
        return f"e{parts[-2]}.{parts[-1]}"
    return parts[-1]


def _heat(ax, fig, rows: list[dict], value: str, label: str, cmap: str, vmin=None, vmax=None):
    """Blocks down, roles (q_proj, ..., down_proj) across, colour = ``value``."""
    roles = list(dict.fromkeys(r["role"] for r in rows if "role" in r))
    blocks = sorted({r["block"] for r in rows if "block" in r})
    grid = [[float("nan")] * len(roles) for _ in blocks]
    for r in rows:
        if "role" in r:
            grid[blocks.index(r["block"])][roles.index(r["role"])] = r[value]
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(roles)), [_short(r) for r in roles], rotation=45, ha="right", fontsize=8)
    step = max(1, len(blocks) // 16)
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
    ax.set_ylabel("block")
    fig.colorbar(im, ax=ax, label=label)


def checkpoint_plot(summary: dict, path: str | Path) -> Path:
    """Per-block sparsity (bars, each block's target as a mark) above the layer sparsity heat map."""
    plt = need_matplotlib()
    fig, (top, heat) = plt.subplots(2, 1, figsize=(7.5, 8), dpi=120, gridspec_kw={"height_ratios": [1, 2]})
    blocks = summary["blocks"]
    xs = [b["block"] for b in blocks]
    top.bar(xs, [100 * b["sparsity"] for b in blocks], color="tab:blue", label="sparsity")
    if any(b.get("target") is not None for b in blocks):
        top.scatter(xs, [100 * b["target"] if b.get("target") is not None else float("nan") for b in blocks],
                    marker="_", s=200, color="black", linewidths=2, label="target", zorder=3)
    _blocks_axis(top)
    top.set_ylabel("sparsity (%)")
    top.set_ylim(0, 100)
    top.legend(fontsize=8, loc="lower right")
    what = " · ".join(v for v in (summary.get("method"), summary.get("pattern")) if v)
    top.set_title(f"{Path(summary['path']).name}: {summary['overall']['sparsity']:.1%} of the target weights are "
                  f"zero" + (f" ({what})" if what else ""), fontsize=10)
    rows = [dict(l, name=n, sparsity_pct=100 * l["sparsity"]) for n, l in summary["layers"].items()]
    _heat(heat, fig, rows, "sparsity_pct", "sparsity (%)", "viridis", 0, 100)
    heat.set_title("sparsity of every layer", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def dataset_name(dataset: str) -> str:
    """A dataset as a person reads it: local files by their names, not their whole paths."""
    return ", ".join(Path(p).name if "/" in p else p for p in str(dataset).split(","))


def stats_plot(summary: dict, path: str | Path) -> Path:
    """Per-block mean σ and mean |μ| of the inputs, above the |μ|/σ heat map (where STADE and Wanda differ)."""
    plt = need_matplotlib()
    fig, (top, heat) = plt.subplots(2, 1, figsize=(7.5, 8), dpi=120, gridspec_kw={"height_ratios": [1, 2]})
    blocks = summary["blocks"]
    xs = [b["block"] for b in blocks]
    top.plot(xs, [b["mean_std"] for b in blocks], marker="o", label="mean σ")
    top.plot(xs, [b["mean_abs_mean"] for b in blocks], marker="s", label="mean |μ|")
    top.set_yscale("log")
    _blocks_axis(top)
    top.set_ylabel("input statistic (log)")
    top.legend(fontsize=8)
    m = summary["manifest"]
    top.set_title(f"stats of {Path(str(m['model']['ref'])).name}: {dataset_name(m['dataset'])}, "
                  f"{m['nsamples']} × {m['seqlen']} tokens", fontsize=10)
    rows = [dict(r, ratio=r["mean_abs_mean"] / r["mean_std"] if r["mean_std"] > 0 else 0.0)
            for r in sorted(summary["layers"], key=lambda r: r.get("index", 0))]
    _heat(heat, fig, rows, "ratio", "mean |μ| / mean σ", "magma")
    heat.set_title("mean |μ| / mean σ of every layer's input (large: STADE and Wanda disagree)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
