"""`stade eval --tasks`: zero-shot accuracy through lm-evaluation-harness, offline, on a tiny local task."""
import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.loading import dtype_kwarg

runner = CliRunner()

ROWS = [
    {"question": "The sun rises in the", "choices": ["east", "west", "sea"], "label": 0},
    {"question": "Two plus two is", "choices": ["three", "four"], "label": 1},
    {"question": "Water freezes when it is", "choices": ["hot", "cold"], "label": 1},
    {"question": "A cat says", "choices": ["meow", "moo", "quack"], "label": 0},
    {"question": "The opposite of up is", "choices": ["left", "down"], "label": 1},
]

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A directory holding the tiny_mc task YAML and its JSONL data (one per module: lm_eval indexes it once)."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "tiny_mc.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    # a second task on the same data and a group of both, to check that only leaf tasks are reported
    (root / "tiny_mc2.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data)))
                                        .replace("task: tiny_mc", "task: tiny_mc2").replace("Answer:", "A:"))
    (root / "tiny_group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_mc2\n"
                                          "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                                          "metadata:\n  version: 1.0\n")
    return root


def test_zero_shot_json(tiny_llama, task_dir):
    pytest.importorskip("lm_eval")
    r = run("eval", tiny_llama, "--tasks", "tiny_mc", "--task-path", task_dir, "--json", "--limit", 4)
    out = json.loads(r.stdout)  # stdout is the JSON object and nothing else
    assert set(out) >= {"model", "tasks", "mean_acc", "limit", "num_fewshot", "seconds"}
    assert out["model"] == str(tiny_llama) and out["limit"] == 4 and out["num_fewshot"] == 0
    task = out["tasks"]["tiny_mc"]
    for metric in ("acc", "acc_norm"):
        assert math.isfinite(task[metric]) and 0.0 <= task[metric] <= 1.0
        assert task[metric] * 4 == pytest.approx(round(task[metric] * 4))  # a count out of 4 examples
        assert task[f"{metric}_stderr"] is None or task[f"{metric}_stderr"] >= 0
    assert task["samples"] == 4
    assert out["mean_acc"] == pytest.approx(task["acc"])


def test_zero_shot_group(tiny_llama, task_dir):
    """A group expands to its tasks; mean_acc is the plain mean of their acc (the group's own row is left out)."""
    pytest.importorskip("lm_eval")
    out = json.loads(run("eval", tiny_llama, "--tasks", "tiny_group", "--task-path", task_dir, "--json",
                         "--limit", 3).stdout)
    assert set(out["tasks"]) == {"tiny_mc", "tiny_mc2"}
    assert out["mean_acc"] == pytest.approx((out["tasks"]["tiny_mc"]["acc"] + out["tasks"]["tiny_mc2"]["acc"]) / 2)


def test_zero_shot_table(tiny_llama, task_dir):
    pytest.importorskip("lm_eval")
    r = run("eval", tiny_llama, "--tasks", "tiny_mc", "--task-path", task_dir, "--limit", 2, "--quiet")
    assert "tiny_mc" in r.stdout and "acc_norm" in r.stdout and "mean" in r.stdout
    assert r.stderr == ""  # --quiet: lm_eval's own progress and warnings are silenced too


def test_unknown_task(tiny_llama, task_dir):
    pytest.importorskip("lm_eval")
    r = run("eval", tiny_llama, "--tasks", "tiny_mc,tiny_mcq", "--task-path", task_dir, code=2)
    assert "unknown task 'tiny_mcq'" in r.stderr and "tiny_mc" in r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [r.stderr.strip().splitlines()[-1]]
    assert "Traceback" not in r.stderr and r.stdout == ""
    from lm_eval.tasks import TaskManager

    if hasattr(TaskManager, "load"):  # lm_eval >= 0.4.12: a task asked for twice is refused before the model loads
        r = run("eval", tiny_llama, "--tasks", "tiny_group,tiny_mc", "--task-path", task_dir, code=2)
        assert "Duplicate task 'tiny_mc'" in r.stderr and "Traceback" not in r.stderr


def test_missing_extra(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    r = run("eval", tiny_llama, "--tasks", "boolq", code=1)
    assert "pip install 'stade-cli[lm-eval]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--tasks", "boolq", "--dataset", "builtin"], "--dataset"),
    (["--tasks", "boolq", "--max-windows", "3"], "--max-windows"),
    (["--limit", "3"], "--limit"),
    (["--num-fewshot", "1"], "--num-fewshot"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--tasks", "boolq", "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", "boolq", "--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
])
def test_option_errors(tiny_llama, args, message):
    """Contradictory or out-of-range options fail with exit 2 before lm_eval is even imported."""
    r = run("eval", tiny_llama, *args, code=2)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_zero_shot_offloaded_equals_in_memory(tiny_llama, task_dir, tmp_path):
    """--tasks with a device map that sends part of the model to disk: accelerate's hooks, same accuracies."""
    pytest.importorskip("lm_eval")
    size = sum(f.stat().st_size for f in Path(tiny_llama).glob("*.safetensors"))
    args = ["eval", tiny_llama, "--tasks", "tiny_mc", "--task-path", task_dir, "--json", "--limit", 4]
    mem = json.loads(run(*args).stdout)["tasks"]["tiny_mc"]
    off = json.loads(run(*args, "--max-memory", f"cpu={size // 2}", "--offload-dir", tmp_path / "od").stdout)["tasks"]
    assert off["tiny_mc"]["acc"] == mem["acc"] and off["tiny_mc"]["acc_norm"] == mem["acc_norm"]
    assert math.isfinite(mem["acc"])


def _direct_accuracy(model_dir):
    """acc and acc_norm computed by hand: for each row, the summed log-probability of " choice" after
    "Question: q\\nAnswer:" (the task's delimiter is a space), argmax against the label; acc_norm divides each
    log-likelihood by the choice's length in characters (the continuation's, space included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()
    hits = norm_hits = 0
    for row in ROWS:
        context = f"Question: {row['question']}\nAnswer:"
        lls, lens = [], []
        for choice in row["choices"]:
            cont = " " + choice
            ctx_ids = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + cont, add_special_tokens=False).input_ids
            cont_ids = whole[len(ctx_ids):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
            positions = range(len(whole) - len(cont_ids) - 1, len(whole) - 1)
            lls.append(sum(float(logp[p, t]) for p, t in zip(positions, cont_ids)))
            lens.append(len(cont))
        hits += int(max(range(len(lls)), key=lambda i: lls[i]) == row["label"])
        norm_hits += int(max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == row["label"])
    return hits / len(ROWS), norm_hits / len(ROWS)


def test_zero_shot_accuracy_equals_log_likelihoods_computed_directly(tiny_llama, task_dir):
    out = json.loads(run("eval", tiny_llama, "--tasks", "tiny_mc", "--task-path", task_dir, "--json",
                         "--dtype", "float32").stdout)
    acc, acc_norm = _direct_accuracy(tiny_llama)
    assert out["tasks"]["tiny_mc"]["samples"] == len(ROWS)
    assert out["tasks"]["tiny_mc"]["acc"] == pytest.approx(acc) and out["tasks"]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)
