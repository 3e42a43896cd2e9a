"""``dsv4-nvfp4 serve``: the server command is compose.yaml's, minus GPU-only flags with --cpu.

The expected flags are read from compose.yaml through the one reader
(``dsv4_nvfp4.deploy.compose``), never written out here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.deploy import compose
from dsv4_nvfp4.launch import serve
from dsv4_nvfp4.launch.vllm_process import LocalServer

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"
ENV = {"VLLM_API_KEY": "k", "SERVED_MODEL_NAME": "m"}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.cpu
def test_gpu_command_is_exactly_compose(model_dir) -> None:
    cfg = serve.build_server_config(model_dir, compose_file=COMPOSE, environ=ENV)
    expected = compose.serve_command(COMPOSE, environ=ENV)
    assert list(cfg.serve_args) == expected.flags
    assert cfg.served_model_name == "m" and cfg.api_key == "k" and cfg.cpu_shim is False
    assert cfg.env == compose.service_environment(COMPOSE, environ=ENV)
    argv = LocalServer(cfg).command()
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    assert argv.count("--served-model-name") == 1  # compose names the model; not added twice
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "8000"]


@pytest.mark.cpu
def test_cpu_command_drops_gpu_only_flags(model_dir) -> None:
    cfg = serve.build_server_config(model_dir, cpu=True, compose_file=COMPOSE, environ=ENV)
    names = {n for n, _ in compose.split_flags(cfg.serve_args)}
    assert names.isdisjoint(compose.GPU_ONLY_FLAGS)
    kept = compose.cpu_flags(compose.serve_command(COMPOSE, environ=ENV).flags)
    for name, value in compose.split_flags(kept):
        if name != "--max-model-len":
            assert (name, value) in compose.split_flags(cfg.serve_args)
    pairs = dict(compose.split_flags(cfg.serve_args))
    assert pairs["--max-model-len"] == "1024"
    assert pairs["--kv-cache-memory-bytes"] == "134217728" and "--enforce-eager" in pairs
    assert cfg.cpu_shim is True


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("env", "model", "message"),
    [
        ({"SERVED_MODEL_NAME": "m"}, "ok", "required variable VLLM_API_KEY is missing"),
        (ENV, None, "no model directory: pass --model-dir or set MODEL_DIR in .env"),
        (ENV, "missing", "model directory not found"),
    ],
)
def test_bad_input_is_one_line(model_dir, tmp_path, env, model, message) -> None:
    path = {"ok": model_dir, "missing": tmp_path / "nope", None: None}[model]
    with pytest.raises(serve.ServeError) as err:
        serve.build_server_config(path, compose_file=COMPOSE, environ=env)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.cpu
def test_dry_run_prints_the_command_without_the_key(model_dir, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "secret-value")
    code = cli_main(
        ["serve", "--model-dir", str(model_dir), "--compose-file", str(COMPOSE), "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "secret-value" not in out and "VLLM_API_KEY=..." in out
    assert "vllm.entrypoints.openai.api_server --model" in out
    assert "--speculative-config" in out  # the GPU command keeps MTP
