"""The model card (``README.md``) of every checkpoint stade writes, for the hub and for the person reading it.

The hub reads the YAML front matter: ``base_model`` links a derivative to its base (the model tree),
``library_name``, ``pipeline_tag``, ``license`` and ``tags`` are what users filter by. The base model's own card
is never copied (it would present the pruned model as the original); its license is carried over only when its
card or config states one. The text says what was done (from the report), the command that reproduces it, and
a results table that ``stade eval OUT --record`` fills in.

Everything here is a pure function of the report (``render``) or of the base checkpoint's files
(``base_facts``); the writer and ``eval --record`` only put the text in place.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Mapping

from .recipes import as_flag

CARD_NAME = "README.md"
PIPELINE = "text-generation"
_HUB_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[^/]+)/?$")


# ----------------------------------------------------------------------------------------- the base model
def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``---`` … ``---`` at its top), or {} when there is none or it
    does not parse."""
    import yaml

    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_facts(path: Path, ref: str, revision: str | None, from_hub: bool) -> dict:
    """What the card may say about the base model, read from its files and never invented: its hub id (when
    MODEL was one, or is a hub cache snapshot), the revision, its license (from its card's metadata, else its
    config), and its pipeline tag."""
    path = Path(path)
    hub_id, rev = (ref, revision) if from_hub else (None, None)
    cached = _HUB_CACHE.search(path.as_posix())
    if cached:
        hub_id = hub_id or f"{cached['org']}/{cached['name']}"
        rev = rev or cached["rev"]
    meta: dict = {}
    card = path / CARD_NAME
    if card.is_file():
        try:
            meta = front_matter(card.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            meta = {}
    facts: dict[str, Any] = {"hub_id": hub_id, "revision": rev, "name": hub_id or path.name}
    for key in ("license", "license_name", "license_link"):
        if isinstance(meta.get(key), (str, list)) and meta[key]:
            facts[key] = meta[key]
    if "license" not in facts:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if isinstance(config.get("license"), str) and config["license"]:
            facts["license"] = config["license"]
    tag = meta.get("pipeline_tag")
    facts["pipeline_tag"] = tag if isinstance(tag, str) and tag else PIPELINE
    return facts


# ----------------------------------------------------------------------------------------- the command
_NOT_FLAGS = {"model", "out", "options", "reporter", "placement", "force", "given", "device"}


def command_line(args: Mapping[str, Any], defaults: Mapping[str, Any], option_defaults: Mapping[str, Any]) -> str:
    """``stade prune MODEL … -o OUT`` with every argument and method option that differs from its default:
    the command that writes the same checkpoint (the device and where the weights are placed do not change
    what is computed, and are left out)."""
    parts = ["stade", "prune", shlex.quote(str(args["model"]))]
    for name, value in args.items():
        if name in _NOT_FLAGS or value is None and defaults.get(name) is None or value == defaults.get(name):
            continue
        if value is None:
            continue
        parts.append(as_flag(name, value))
    for name, value in (args.get("options") or {}).items():
        if name not in option_defaults or value != option_defaults[name]:
            parts.append(as_flag(name, value))
    parts += ["-o", shlex.quote(str(args["out"]))]
    return " ".join(parts)


# ----------------------------------------------------------------------------------------- the card
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _what_was_done(report: Mapping[str, Any]) -> list[str]:
    lines = []
    method, pattern = report.get("method"), report.get("pattern")
    structure, experts = report.get("structure"), report.get("experts") or {}
    overall, coverage = report.get("overall") or {}, report.get("coverage") or {}
    if structure:
        lines.append(f"- **Structured pruning**: {_structure_line(structure)}; a smaller dense model, not zeros.")
    if method:
        gradual = report.get("update") == "admm" and (report.get("options") or {}).get("admm_gradual")
        lines.append(f"- **Method**: `{method}`" + (f", with the {'gradual ' if gradual else ''}`{report['update']}` "
                                                    "weight update (the kept weights refitted to the calibration "
                                                    "Gram matrix)" if report.get("update") else "") + ".")
    if method and not structure:
        target = report.get("target_sparsity")
        lines.append(f"- **Pattern**: {pattern}" + (f" (per {report['group']})" if pattern == "unstructured"
                                                     and report.get("group") else "")
                     + f"; target sparsity {_pct(target)}, achieved {_pct(overall.get('sparsity'))} of the pruned "
                       f"layers' weights ({overall.get('zeros', 0):,} of {overall.get('params', 0):,}).")
        if coverage:
            lines.append(f"- **Pruned layers**: {100 * coverage.get('share', 0):.2f}% of the decoder blocks' weights were "
                         "targets (attention and MLP linears); embeddings, norms and the output head stay dense.")
    bias = report.get("bias_correction") or {}
    if method:
        lines.append(f"- **Bias correction**: {'on, ' + str(bias['layers']) + ' layers' if bias.get('layers') else 'off'}.")
        layer = report.get("layer_sparsity") or {}
        lines.append(f"- **Layer sparsity**: {layer.get('method', 'uniform')}"
                     + (" (OWL: blocks with more outlier activations keep more weights)"
                        if layer.get("method") == "owl" else " (every layer the same)") + ".")
        lines.append(f"- **Mode**: {report.get('mode', 'one-shot')}.")
    refine = report.get("refine")
    if refine:
        warmup = f", rising over the first {refine['warmup']:.0%} of them" if refine.get("warmup") else ""
        lines.append(f"- **Block-wise refinement**: {refine['steps']} Adam steps per decoder block (lr "
                     f"{refine['lr']:g}{warmup}) fitted the kept weights to the dense model's block outputs on "
                     f"{refine['samples']} × {refine['seqlen']} calibration tokens"
                     + (f" ({refine['loss']} loss)" if refine.get("loss", "mse") != "mse" else "")
                     + (f" ({refine['precision']} matrix products)" if refine.get("precision", "float32") != "float32" else "")
                     + "; the zeros stayed zeros.")
    if experts.get("removal"):
        lines.append(f"- **Experts**: {_experts_line(experts['removal'])}.")
    recipe = report.get("recipe")
    if recipe:
        lines.append(f"- **Recipe** `{recipe['name']}`: `{recipe['flags']}`"
                     + (f" (overridden: `{' '.join(recipe['overridden'])}`)" if recipe.get("overridden") else "") + ".")
    stats = report.get("stats") or {}
    if stats:
        dataset = str(stats.get("dataset", "?"))
        names = ", ".join(Path(p).name if "/" in p else p for p in dataset.split(","))
        lines.append(f"- **Calibration**: {stats.get('nsamples', '?')} windows × {stats.get('seqlen', '?')} tokens "
                     f"of {names}, seed {stats.get('seed', '?')}"
                     + (" (with Gram matrices)" if stats.get("gram") else "") + ".")
    return lines


def _structure_line(structure: Mapping[str, Any]) -> str:
    """What ``--structure`` removed, in words: how many channels of each MLP and how they were ranked, or which
    blocks."""
    if structure.get("kind") == "channels":
        done = [f"ranked by {structure.get('metric')}"]
        if structure.get("folded"):
            done.append("their mean output folded into the down projection's bias")
        if structure.get("refit"):
            done.append("the kept channels refitted from the calibration Gram matrix")
        return (f"{structure.get('removed_per_block', '?')} of the {structure.get('width', '?')} channels of every "
                f"MLP removed ({', '.join(done)})")
    if structure.get("kind") == "blocks":
        removed = structure.get("removed") or []
        return (f"{len(removed)} of {structure.get('blocks', '?')} decoder blocks removed "
                f"({', '.join(map(str, removed))}: those that change their input least), the rest renumbered")
    return str(structure.get("kind"))


def _experts_line(removal: Mapping[str, Any]) -> str:
    """What ``--experts K`` removed: how many experts each MoE block keeps and by which score (which ones: the
    report's ``experts.removal``)."""
    kept, removed = removal.get("kept") or {}, removal.get("removed") or {}
    counts = {(len(v), len(v) + len(removed.get(b, []))) for b, v in kept.items()}
    each = f"{next(iter(counts))[0]} of {next(iter(counts))[1]}" if len(counts) == 1 else "some"
    blocks = len(kept)
    return (f"{each} experts kept in each of {blocks} mixture-of-experts blocks, chosen by {removal.get('score')}; "
            "the others removed with their router rows (which ones: `stade_report.json`, `experts.removal`)")


def _size(report: Mapping[str, Any]) -> str:
    params, written = report.get("params") or {}, report.get("weight_bytes") or {}
    if report.get("structure") or (params.get("removed") or 0) > 0:
        text = (f"This is a **smaller dense checkpoint**: {params.get('after', 0):,} parameters instead of "
                f"{params.get('before', 0):,} ({_pct(params.get('removed'))} fewer)")
        if written:
            text += f", {written['after'] / 2**20:,.0f} MiB of weights instead of {written['before'] / 2**20:,.0f} MiB"
        return text + ". It loads and runs like any model of its architecture."
    return ("This is a **dense checkpoint with zeros**: the pruned weights are stored as 0 in ordinary safetensors, "
            "so it loads anywhere the base model loads and has the same size on disk and in memory; the zeros pay "
            "off with sparse kernels or compression, not by themselves.")


def _results(report: Mapping[str, Any]) -> list[str]:
    rows = report.get("evaluations") or []
    if not rows:
        return ["No evaluation recorded yet: `stade eval OUT --record` (perplexity) or `stade eval OUT --tasks "
                "boolq,piqa --record` (zero-shot accuracy) adds its result here and to `stade_report.json`."]
    out = ["| evaluation | data | metric | value | recorded |", "|---|---|---|---|---|"]
    for r in rows:
        when = str(r.get("recorded", ""))[:10]
        if "ppl" in r:
            data = f"{Path(str(r.get('dataset', '?'))).name}, {r.get('windows', '?')} × {r.get('seqlen', '?')} tokens"
            out.append(f"| perplexity | {data} | ppl | {r['ppl']:.4f} | {when} |")
        for task, metrics in (r.get("tasks") or {}).items():
            metric = next((m for m in ("acc", "acc_norm") if m in metrics), None)
            if metric is not None and metrics[metric] is not None:
                shots = f"{r.get('num_fewshot', 0)}-shot" + (f", ≤ {r['limit']} examples" if r.get("limit") else "")
                out.append(f"| {task} | {shots} | {metric} | {metrics[metric]:.4f} | {when} |")
    return out


def calibrate_line(report: Mapping[str, Any]) -> str | None:
    """The ``stade calibrate`` command that made the stats a ``--stats`` prune used (from their manifest)."""
    try:
        words = shlex.split(report.get("command") or "")
    except ValueError:
        return None
    stats = report.get("stats") or {}
    if "--stats" not in words or words.index("--stats") + 1 >= len(words) or not stats.get("dataset"):
        return None
    model = (stats.get("model") or {}).get("ref") or words[2]
    parts = ["stade", "calibrate", model, "--dataset", str(stats["dataset"])]
    for key in ("nsamples", "seqlen", "seed"):
        if stats.get(key) is not None:
            parts += [f"--{key}", str(stats[key])]
    if stats.get("gram"):
        parts.append("--gram")
    return " ".join(shlex.quote(p) if not p.startswith("--") else p for p in parts) + \
        f" -o {shlex.quote(words[words.index('--stats') + 1])}"


def metadata(report: Mapping[str, Any]) -> dict:
    """The card's YAML front matter."""
    base = report.get("base") or {}
    tags = ["pruned", "stade"]
    for tag in (report.get("method"), report.get("pattern"), "structured" if report.get("structure") else None,
                "sparse" if report.get("method") and not report.get("structure") else None):
        if tag and tag not in tags:
            tags.append(str(tag))
    meta: dict[str, Any] = {}
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = base.get("pipeline_tag", PIPELINE)
    for key in ("license", "license_name", "license_link"):
        if base.get(key):
            meta[key] = base[key]
    meta["tags"] = tags
    return meta


def render(report: Mapping[str, Any]) -> str:
    """The whole card (front matter, then the text) for a stade report."""
    import yaml

    base = report.get("base") or {}
    name = base.get("name") or Path(str((report.get("model") or {}).get("ref", "the base model"))).name
    origin = f"[{base['hub_id']}](https://huggingface.co/{base['hub_id']})" if base.get("hub_id") else f"`{name}`"
    revision = f" at revision `{base['revision']}`" if base.get("revision") else ""
    lines = ["---", yaml.safe_dump(metadata(report), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}, pruned", "",
             f"A pruned version of {origin}{revision}, written by [stade](https://pypi.org/project/stade-cli/) "
             f"{report.get('version', '')} on {str(report.get('created', ''))[:10]}, after training and without "
             "retraining.", "", _size(report), "", "## What was done", ""]
    lines += _what_was_done(report)
    if not base.get("license"):
        lines += ["", "The base model's card and config state no license; this card states none either: the "
                      "base model's terms apply."]
    lines += ["", "## Reproduce", ""]
    if report.get("command"):
        calibrate = calibrate_line(report)
        lines += ["```sh", *([calibrate] if calibrate else []), report["command"], "```", ""]
    else:
        lines += ["The settings above, with `stade prune` (the command was not recorded).", ""]
    lines += ["`stade_report.json` beside this card holds every layer's sparsity and the full settings; "
              "`stade inspect` reads it.", "", "## Results", ""]
    lines += _results(report)
    return "\n".join(lines) + "\n"
