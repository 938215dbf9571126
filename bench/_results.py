"""A bench script's results folder: its own files are replaced atomically, nothing else in it is touched."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stade_cli.outputs import json_with_keys, replace_file


class ResultFiles:
    """``NAME.json`` (recognised as the script's by its top-level ``keys``) and the text files beside it."""

    def __init__(self, script: str, name: str, keys: tuple[str, ...], others: tuple[str, ...]):
        self.script, self.json, self.others = script, f"{name}.json", others
        self.ours = json_with_keys(*keys)

    def check(self, out: Path) -> None:
        """``out`` may be new, or hold this script's results. A text file beside no JSON of ours is someone
        else's: refused before any work."""
        if out.exists() and not out.is_dir():
            raise SystemExit(f"error: --out {out} is a file (give a directory)")
        names = (self.json,) + self.others
        present = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
        if present and not ((out / self.json).is_file() and self.ours(out / self.json)):
            raise SystemExit(f"error: --out {out} holds {', '.join(present)}, which {self.script} did not write "
                             "(choose another --out, or move them yourself)")

    def write(self, out: Path, result: dict, texts: dict[str, str | bytes]) -> None:
        """The JSON and each text, replaced atomically (a reader never sees half a file). Call ``check`` first."""
        what = f"results of {self.script}"
        replace_file(out / self.json, json.dumps(result, indent=2) + "\n", self.ours, what)
        for name, data in texts.items():
            replace_file(out / name, data, lambda p: True, what)


def protocol_arguments(p: argparse.ArgumentParser, device_help: str | None = None) -> None:
    """The flags that fix the protocol (model, texts, cells, windows, seed, device), spelled alike in every
    script, so two scripts' results given the same flags measure the same thing."""
    p.add_argument("--model", required=True, help="checkpoint directory (or hub id)")
    p.add_argument("--calib", nargs="+", required=True, help="calibration text files (.txt/.jsonl/.parquet)")
    p.add_argument("--eval", nargs="+", required=True, help="held-out evaluation text files")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5],
                   help="unstructured sparsities (default: 0.5)")
    p.add_argument("--patterns", nargs="+", default=["unstructured"],
                   help="unstructured and/or N:M patterns such as 2:4 (default: unstructured)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length")
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=device_help)
