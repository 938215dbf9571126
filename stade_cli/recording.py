"""``stade eval OUT --record``: an evaluation's result added to the report and the model card of a checkpoint
stade wrote, atomically and under the output's lock, so the output stays stade's own.

``eval`` without ``--record`` never writes anything. With it, the output is locked before the evaluation
starts (a ``prune --force`` into the same directory fails at once instead of replacing the model being
measured), and the report and card are replaced together at the end (``outputs.amend``).
"""
from __future__ import annotations

import datetime as _dt
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .card import CARD_NAME, render
from .checkpoint import REPORT_NAME
from .errors import UsageError
from .outputs import Output, amend, foreign, is_or_holds

# what a recorded row keeps of an evaluation's result (the rest, e.g. per-task sample counts, stays in --json)
_KEEP = ("dataset", "ppl", "nll", "windows", "seqlen", "tokens", "tasks", "mean_acc", "num_fewshot", "limit",
         "dtype", "device", "batch_size", "lm_eval", "seconds")


def recorded_row(result: dict, when: str | None = None) -> dict:
    """The row ``--record`` appends to the report's ``evaluations``: the result's measures and settings, and
    when it was recorded."""
    row = {"recorded": when or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    row.update({k: result[k] for k in _KEEP if k in result})
    return row


@contextmanager
def record_into(model: str, log: Callable[[str], None] | None = None) -> Iterator[Callable[[dict], dict]]:
    """Lock ``model`` (a pruned checkpoint stade wrote) and yield ``commit(result)``, which adds the result to
    its report and card and returns the row added. Refused, before any work, for anything else."""
    path = Path(model).expanduser()
    hint = "--record adds the result to a pruned checkpoint that stade wrote; evaluate without it"
    if not path.is_dir():
        raise UsageError(f"--record needs a local checkpoint directory that stade wrote, not {model}", hint)
    if not (path / REPORT_NAME).is_file():
        raise UsageError(f"{model} has no {REPORT_NAME}: stade did not write it", hint)
    reason = foreign(path, "checkpoint")
    if reason is not None:
        raise UsageError(f"cannot record into {model}: {reason}", hint)
    if is_or_holds(path.resolve(), Path.cwd().resolve()):
        # the record replaces the folder in one exchange: a shell inside it would be left in the old one
        raise UsageError(f"--record cannot rewrite {model}: it is (or holds) the current directory",
                         f"run it from outside: cd {path.resolve().parent} && stade eval {path.resolve().name} --record")
    # the folder is exchanged for its amended copy; "recorded in …" says what changed, not "replaced"
    with Output(path, "checkpoint", force=True, log=log, says_replaced=False) as out:

        def commit(result: dict) -> dict:
            report = json.loads((path / REPORT_NAME).read_text())
            row = recorded_row(result)
            report["evaluations"] = [*(report.get("evaluations") or []), row]
            amend(out, {CARD_NAME: render(report), REPORT_NAME: json.dumps(report, indent=2) + "\n"})
            return row

        yield commit
