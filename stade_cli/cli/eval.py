"""`stade eval MODEL_OR_DIR`: perplexity, or zero-shot accuracy with --tasks (lm-evaluation-harness).

stdout: the perplexity, or with --tasks a table of accuracies; JSON with --json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (BatchSize, EvalDataset, Device, DeviceMap, DType, Json, MaxMemory, MaxWindows, ModelArg, OffloadDir,
                      Quiet, SeqLen, Spill, placement)
from .output import state, emit_json, emit_line, stdout_console

Tasks = Annotated[Optional[str], typer.Option(
    help="Zero-shot accuracy on these lm-evaluation-harness tasks instead of perplexity, comma-separated "
         "(e.g. boolq,piqa,hellaswag; the papers report boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge and rte). "
         "Needs stade-cli\\[lm-eval] (pip install 'stade-cli\\[lm-eval]').",
    show_default=False)]
NumFewshot = Annotated[int, typer.Option(help="With --tasks: in-context examples per question.")]
Limit = Annotated[Optional[int], typer.Option(help="With --tasks: at most this many examples per task (quick runs).",
                                              show_default=False)]
TaskPath = Annotated[Optional[Path], typer.Option(help="With --tasks: an extra directory of lm-eval task YAMLs.",
                                                  show_default=False)]
Record = Annotated[bool, typer.Option("--record", help="Add the result to the report and model card of MODEL, a "
                                      "pruned checkpoint stade wrote (atomically; without it eval writes nothing).")]

PERPLEXITY_ONLY = ("dataset", "seqlen", "max_windows")
TASKS_ONLY = ("num_fewshot", "limit", "task_path")


def _given(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` that were set on the command line (not left at their defaults)."""
    out = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.append("--" + name.replace("_", "-"))
    return out


def eval_command(
    ctx: typer.Context,
    model: ModelArg,
    dataset: EvalDataset = "wikitext2",
    seqlen: SeqLen = None,
    max_windows: MaxWindows = None,
    tasks: Tasks = None,
    num_fewshot: NumFewshot = 0,
    limit: Limit = None,
    task_path: TaskPath = None,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: BatchSize = 1,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    spill: Spill = "auto",
    record: Record = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on the held-out split of DATASET (non-overlapping windows, Wanda protocol), or with
    --tasks its zero-shot accuracy on lm-evaluation-harness tasks."""
    st = state(ctx, json_out, quiet)
    from contextlib import nullcontext

    from ..recording import record_into

    # --record: the output is locked before the work and written after it
    with record_into(model, st.reporter.log) if record else nullcontext() as commit:
        result = _evaluate(ctx, st, model, dataset, seqlen, max_windows, tasks, num_fewshot, limit, task_path,
                           device, dtype, batch_size, device_map, max_memory, offload_dir, spill)
        if commit is not None:
            commit(result)
            st.reporter.log(f"recorded in {model}/stade_report.json and {model}/README.md")
    if "tasks" in result:
        _show_tasks(st, result)
    else:
        emit_json(result) if st.json else emit_line(f"{result['ppl']:.4f}")


def _evaluate(ctx, st, model, dataset, seqlen, max_windows, tasks, num_fewshot, limit, task_path, device, dtype,
              batch_size, device_map, max_memory, offload_dir, spill) -> dict:
    from ..errors import UsageError

    if tasks is not None:       # one process: zero_shot() refuses a launcher before any work
        if clash := _given(ctx, PERPLEXITY_ONLY):
            raise UsageError(f"{', '.join(clash)} only apply to perplexity and cannot be combined with --tasks",
                             "run perplexity and zero-shot as two commands")
        return _zero_shot(st, model, tasks, num_fewshot, limit, task_path, device, dtype, batch_size,
                          placement(device_map, max_memory, offload_dir, spill))
    if needs := _given(ctx, TASKS_ONLY):
        raise UsageError(f"{', '.join(needs)} only apply to zero-shot evaluation", "add --tasks NAME[,NAME...]")

    from ..evaluation import evaluate  # lazy: keeps `stade --help` fast

    result = evaluate(model, dataset=dataset, seqlen=seqlen, max_windows=max_windows, device=device,
                      dtype=dtype, batch_size=batch_size, reporter=st.reporter,
                      placement=placement(device_map, max_memory, offload_dir, spill))
    st.reporter.log(f"{result['windows']} windows × {result['seqlen']} tokens in {result['seconds']:.1f}s")
    return result


def _zero_shot(st, model, tasks, num_fewshot, limit, task_path, device, dtype, batch_size, where) -> dict:
    from ..zeroshot import zero_shot  # lazy: lm_eval is an optional extra and slow to import

    r = zero_shot(model, tasks, num_fewshot=num_fewshot, limit=limit, task_path=task_path, device=device,
                  dtype=dtype, batch_size=batch_size, reporter=st.reporter, placement=where)
    st.reporter.log(f"{len(r['tasks'])} task(s) in {r['seconds']:.1f}s")
    return r


def _show_tasks(st, r: dict) -> None:
    from rich.table import Table

    if st.json:
        emit_json(r)
        return
    header = f"{r['model']}: " + (f"{r['num_fewshot']}-shot" if r["num_fewshot"] else "zero-shot")
    if r["limit"]:
        header += f", at most {r['limit']} examples per task"
    console = stdout_console()
    console.print(header, highlight=False, markup=False)
    table = Table()
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("stderr", "right")):
        table.add_column(col, justify=justify)
    for name, metrics in r["tasks"].items():
        shown = [m for m in ("acc", "acc_norm") if m in metrics] or \
                [m for m in metrics if not m.endswith("_stderr") and m not in ("samples", "num_fewshot")]
        for i, metric in enumerate(shown):
            value, err = metrics[metric], metrics.get(f"{metric}_stderr")
            table.add_row(name if i == 0 else "", metric, "n/a" if value is None else f"{value:.4f}",
                          "" if err is None else f"± {err:.4f}")
    table.add_section()
    table.add_row("mean", "acc", "n/a" if r["mean_acc"] is None else f"{r['mean_acc']:.4f}", "")
    console.print(table)
