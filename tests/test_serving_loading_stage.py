"""The probe names the start-up stage from the server's processes (real /proc, real processes).

A stand-in for a loading vLLM worker: a Python interpreter started under the
name ``vllm`` (a symlink), so its command line is a vLLM one, which memory-maps
a file named like a checkpoint shard, as safetensors' loader does, and later
unmaps it, as vLLM does once the weights are on the GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from probe_cli import isolated_health_argv

from dsv4_nvfp4.launch.vllm_process import free_port
from dsv4_nvfp4.serving import loading_stage

pytestmark = pytest.mark.cpu

WORKER = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
f.close()
print("mapped", flush=True)
sys.stdin.readline()
m.close()
print("unmapped", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def loading_worker(tmp_path: Path):
    shard = tmp_path / "model" / "model-00041-of-00163.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"\0" * 4096)
    vllm = tmp_path / "bin" / "vllm"
    vllm.parent.mkdir()
    vllm.symlink_to(sys.executable)
    proc = subprocess.Popen(
        [str(vllm), "-c", WORKER, str(shard)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "mapped\n"
        yield proc, shard
    finally:
        proc.kill()
        proc.wait()


def _mine(pid: int) -> loading_stage.VllmProcess:
    (found,) = [p for p in loading_stage.vllm_processes() if p.pid == pid]
    return found


def test_a_worker_with_a_mapped_shard_is_loading_weights(loading_worker) -> None:
    proc, shard = loading_worker
    worker = _mine(proc.pid)
    assert worker.checkpoint_files == (str(shard),)
    assert worker.age_s is not None and 0 <= worker.age_s < 60
    assert loading_stage.describe([worker]) == (
        "loading weights: shard 41 of 163 open; vLLM up 0 min"
    )
    # the probe's own line, run the way compose runs it
    port = free_port()
    out = subprocess.run(isolated_health_argv("live", "--url", f"http://127.0.0.1:{port}"),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.startswith(f"live still loading: connection refused at http://127.0.0.1:{port}")
    assert "; stage: loading weights: shard 41 of 163 open" in out.stderr


def test_after_the_read_no_checkpoint_file_is_open(loading_worker) -> None:
    proc, _ = loading_worker
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "unmapped\n"
    worker = _mine(proc.pid)
    assert worker.checkpoint_files == ()
    assert loading_stage.describe([worker]) == (
        "1 vLLM processes, no checkpoint file open: before the weight read, or after it "
        "(profiling, compiling, capturing CUDA graphs); vLLM up 0 min"
    )


def test_no_vllm_process_is_said_plainly(tmp_path: Path) -> None:
    assert loading_stage.vllm_processes(tmp_path) == []  # an empty procfs: nothing visible
    assert loading_stage.describe([]) == (
        "no vLLM process visible to this probe (run it inside the server's container)"
    )


@pytest.mark.parametrize(
    ("argv", "is_vllm"),
    [
        (["/usr/local/bin/vllm", "serve", "/model"], True),
        (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], True),
        (["VLLM::EngineCore"], True),
        (["VLLM::Worker_TP3"], True),
        (["python3", "-m", "dsv4_nvfp4", "health", "ready"], False),
        (["python3", "tests/vllm034/test_x.py"], False),
        ([], False),
    ],
)
def test_which_command_lines_are_vllm(argv: list[str], is_vllm: bool) -> None:
    assert loading_stage._is_vllm(argv) is is_vllm
