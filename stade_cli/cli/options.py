"""Shared ``Annotated`` options, so every command spells them the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint directory or Hugging Face hub id.",
                                          show_default=False)]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to write (atomically).", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Replace OUTPUT if empty or stade's own output of this kind (nothing else).")]
Dataset = Annotated[str, typer.Option(help="c4 | wikitext2 | builtin | a local .txt/.jsonl/.parquet file or folder (read whole).")]
EvalDataset = Annotated[str, typer.Option(
    "--dataset", help="Held-out text: wikitext2 (its test split, from the Hugging Face hub or your datasets cache) | "
                      "c4 (validation) | builtin (its last quarter) | a local .txt/.jsonl/.parquet file or directory, "
                      "read whole: give other files than the calibration text.")]
NSamples = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per window \\[default: the model's context length, capped by the text].", show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed for sampling calibration windows.")]
Device = Annotated[str, typer.Option(help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N.", rich_help_panel="Placement")]
DType = Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16 (auto: the checkpoint's; float32 on the CPU for half types).")]
BatchSize = Annotated[int, typer.Option(help="Windows per forward pass.")]
MaxWindows = Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr.")]

# Where the model runs; for models larger than the device, accelerate's device map, run block by block (see
# stade_cli/blockwise.py).
_BIG = "Placement"
DeviceMap = Annotated[Optional[str], typer.Option(help="auto | balanced | sequential | stream: blocks run one at a time, the rest on CPU or disk (stream: read as they run).", rich_help_panel=_BIG, show_default=False)]
MaxMemory = Annotated[Optional[str], typer.Option(help="Memory budget per device for the device map, e.g. 0=20GiB,cpu=64GiB (implies --device-map auto).", rich_help_panel=_BIG, show_default=False)]
OffloadDir = Annotated[Optional[Path], typer.Option(help="Where offloaded weights and spilled block inputs go \\[default: a temp dir].", rich_help_panel=_BIG, show_default=False)]
Spill = Annotated[str, typer.Option(help="Cached block inputs: auto (on the device if they fit, else on disk) | device | disk.", rich_help_panel=_BIG)]


def cli_flag(name: str) -> str:
    """The command-line flag of an option or method-option name: ``ria_alpha`` → ``--ria-alpha``."""
    return "--" + name.replace("_", "-")


def placement(device_map: str | None, max_memory: str | None, offload_dir: Path | None, spill: str):
    from ..loading import Placement  # lazy: keeps `stade --help` fast

    return Placement(device_map, max_memory, offload_dir, spill)
