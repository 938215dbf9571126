"""What a person sees on a terminal: commands run on a pseudo-terminal of a fixed size, the screen read back."""
import re

import pytest

pyte = pytest.importorskip("pyte")

from terminal import screen  # noqa: E402


@pytest.fixture(scope="module")
def deep_pruned(tiny_factory, tmp_path_factory):
    """A tiny Llama with 8 blocks (56 layers: the layer table is longer than a 40-row screen), pruned with OWL."""
    model = tiny_factory("llama", num_hidden_layers=8)
    out = tmp_path_factory.mktemp("screens") / "owl"
    done = screen(["prune", model, "--metric", "wanda", "--layer-sparsity", "owl", "--dataset", "builtin",
                   "--nsamples", 4, "--seqlen", 32, "-o", out], 120, 40)
    assert done.returncode == 0, "\n".join(done.lines)
    # prune's last words: the path on stdout, and before it what a dense checkpoint with zeros gives
    assert done.lines[-1] == str(out)
    assert any("same size on disk" in line and "sparse kernels" in line for line in done.lines)
    return out


def test_inspect_summary_on_the_first_screen(deep_pruned):
    """At 120×40 the first screen holds the title, the summary and the per-block table with its headers and
    each block's OWL target; the 56-row layer table comes after it; --summary fits on one screen."""
    shown = screen(["inspect", deep_pruned], 120, 40)
    assert shown.returncode == 0
    first = shown.first(40)
    assert shown.lines[0] == str(deep_pruned)
    assert "method wanda · pattern unstructured · target 50.00% · 56 target layers" in first
    assert "overall:" in first and "the report agrees" in first
    for header in ("block", "target", "sparsity", "zeros", "params", "sparsity, 0 → 100%"):
        assert header in first
    targets = {line.split("│")[2].strip() for line in shown.lines[:40] if line.count("│") > 5
               and line.split("│")[1].strip().isdigit()}
    assert len(targets) > 1                       # OWL: every block its own target, shown
    assert len(shown.lines) > 40 and first.index("per block") < first.index("per layer")   # layers come last
    end = [line for line in shown.visible if line]    # the end: the layer table, then the summary again
    assert end[-4].startswith("└") and "layers.7.mlp.down_proj" in end[-5] and end[-3].startswith("summary ─")
    assert end[-2] == "method wanda · pattern unstructured · target 50.00% · 56 target layers"
    assert end[-1].startswith("overall:") and end[-1].endswith("the report agrees")
    assert all(len(line) <= 120 for line in shown.lines)
    summary = screen(["inspect", deep_pruned, "--summary"], 120, 40)
    assert len(summary.lines) <= 40 and "per layer" not in "\n".join(summary.lines)
    assert summary.visible[0] == str(deep_pruned)  # nothing scrolled away


def test_inspect_of_210_layers_ends_with_what_matters(tiny_factory, tmp_path):
    """SmolLM2's 30 blocks × 7 linears: the first lines scrolled away long before the end, and the last
    screen (a prompt takes its bottom row) still shows the method and the overall sparsity."""
    model = tiny_factory("llama", num_hidden_layers=30)
    out = tmp_path / "out"
    assert screen(["prune", model, "--metric", "magnitude", "--sparsity", 0.6, "-o", out], 120, 40).returncode == 0
    shown = screen(["inspect", out], 120, 40)
    assert shown.returncode == 0 and len(shown.lines) > 5 * 40
    last = "\n".join(shown.visible[:-1])
    assert "method magnitude · pattern unstructured · target 60.00% · 210 target layers" in last
    assert re.search(r"overall: [\d,]+ of [\d,]+ weights are zero \(5\d\.\d\d%\); the report agrees", last)


def test_prune_help_reads_at_80_columns():
    """Usage names MODEL plainly; options sit in panels in a fixed order; no description is cut off."""
    shown = screen(["prune", "--help"], 80, 40)
    assert shown.returncode == 0
    text = "\n".join(shown.lines)
    assert "Usage: stade prune [OPTIONS] MODEL" in text and "{MODEL}" not in text
    panels = ["Arguments", "Model and output", "Sparsity", "Bias correction",
              "Calibration (without --stats, or for --sequential)", "Placement"]
    at = [text.index(f"╭─ {p} ") for p in panels]
    assert at == sorted(at), panels
    assert "╭─ Options ─" not in text              # --help joins the first panel instead of a panel of its own
    assert "…" not in text
    assert all(len(line) <= 80 for line in shown.lines)
    # descriptions get room: about 3 lines an option (4.5 before the panels: 180 lines for 40 options)
    options = sum(1 for line in shown.lines if line.lstrip("│ *").startswith("--"))
    assert len(shown.lines) / options <= 3.3, (len(shown.lines), options)


def test_prune_help_fits_two_screens_and_names_where_every_option_is():
    """--help: at most 100 lines at 80 columns, every method named; each method's own options (and the details of
    refine, owl, experts) are one `--help-method NAME` away, and none is lost on the way."""
    from stade_cli.cli.prune import _DETAILS, help_topics
    from stade_cli.metrics import methods, option_specs
    from stade_cli.metrics.base import RUN_SEED

    shown = screen(["prune", "--help"], 80, 40)
    text = "\n".join(shown.lines)
    assert shown.returncode == 0 and len(shown.lines) <= 100, len(shown.lines)
    for name in methods():                      # every scorer and solver after --metric, admm after --update
        assert re.search(rf"\b{name}\b", text), name
    topics = help_topics()
    assert "--help-method" in text and all(t in text for t in topics)
    details = {}
    for topic in topics:
        page = screen(["prune", "--help-method", topic], 80, 40)
        assert page.returncode == 0 and page.lines[0].startswith(f"{topic}: "), page.lines
        details[topic] = "\n".join(page.lines)
    hidden = {s.name for s in option_specs().values() if s.name != RUN_SEED} | _DETAILS

    def row(flag):         # an option's own row starts at the box's edge; a wrapped description is indented far
        return re.search(rf"^│\s{{1,3}}(\*\s+)?{flag}\s", text, re.M)

    assert row("--refine") and row("--metric") and not row("--no-such-flag")
    for name in hidden:
        flag = "--" + name.replace("_", "-")
        assert not row(flag), flag                                                     # not a row of --help ...
        assert any(re.search(rf"^{flag}\s", page, re.M) for page in details.values()), flag   # ... but one step away
    assert "--percdamp" in details["sparsegpt"] and "--admm-gradual" in details["admm"]
    assert "--refine-lr" in details["refine"] and "0.001" in details["refine"]
    wrong = screen(["prune", "--help-method", "wandaa"], 80, 40)
    assert wrong.returncode == 2 and "choose one of: ria" in "\n".join(wrong.lines)
    no_options = screen(["prune", "--help-method", "wanda"], 80, 40)
    assert no_options.returncode == 0 and "no options of its own" in "\n".join(no_options.lines)


def test_stade_help_ends_with_three_examples():
    shown = screen(["--help"], 80, 40)
    end = [line.strip() for line in shown.lines if line.strip()][-3:]
    assert shown.returncode == 0 and all(line.startswith("stade ") for line in end), end
    assert [line.split()[1] for line in end] == ["calibrate", "prune", "eval"]


def test_every_help_is_whole_at_80_columns():
    for command in ("calibrate", "eval", "inspect", "demo", "sweep"):
        shown = screen([command, "--help"], 80, 40)
        text = "\n".join(shown.lines)
        assert shown.returncode == 0 and f"Usage: stade {command} [OPTIONS]" in text
        assert "…" not in text and "{" not in text.splitlines()[0 if text.startswith("Usage") else 1], command


def test_errors_are_one_line_on_a_terminal(tmp_path):
    shown = screen(["prune", tmp_path / "missing", "-o", tmp_path / "out"], 80, 24)
    assert shown.returncode == 1
    # one line, wrapped by the terminal only where it is full (each wrapped row is 80 columns wide)
    assert shown.lines[0].startswith("error: model path") and shown.lines[-1].endswith(")"), shown.lines
    assert all(len(line) >= 78 for line in shown.lines[:-1]), shown.lines
