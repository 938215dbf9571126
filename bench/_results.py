"""A bench script's results folder: its own files are replaced atomically, nothing else in it is touched."""
from __future__ import annotations

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
