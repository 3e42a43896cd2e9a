"""Which start-up stage a vLLM server on this machine is in, read from ``/proc`` (stdlib only).

Why: vLLM opens its port only when start-up is over, so for the whole cold
start (tens of minutes for DeepSeek V4 Pro) every probe sees the same
"connection refused". An operator wants to know whether the weights are still
being read, or whether the read is over and the engine is compiling, profiling
and capturing graphs. The probe runs inside the serving container (compose's
healthcheck shares the server's process namespace), so it can look at the
server's processes:

* a vLLM process is one whose command line runs vLLM (``vllm serve``,
  ``python -m vllm.…``) or whose title vLLM set (``VLLM::EngineCore``,
  ``VLLM::Worker…``);
* while the weights load, the workers hold the checkpoint's ``*.safetensors``
  files open or memory-mapped (``/proc/PID/fd``, ``/proc/PID/maps``); shard
  names of the form ``…-00041-of-00163.safetensors`` give the progress;
* no checkpoint file open means the read has not begun or is over.

Nothing here is vLLM's API: it reads the kernel's view of the processes, so it
works for every vLLM version and every loader that opens the files. Where the
probe cannot see the server (another machine, another container, no ``/proc``)
it says so instead of guessing.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


@dataclass(frozen=True)
class VllmProcess:
    pid: int
    title: str
    age_s: float | None
    checkpoint_files: tuple[str, ...]


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return None


def _is_vllm(argv: list[str]) -> bool:
    if not argv:
        return False
    if argv[0].startswith("VLLM::"):
        return True
    words = [os.path.basename(a) for a in argv[:3]]
    if "vllm" in words:
        return True
    return any(a == "-m" and b.split(".")[0] == "vllm" for a, b in itertools.pairwise(argv))


def _age_s(proc: Path, root: Path) -> float | None:
    """Seconds since the process started (``stat`` field 22 against ``/proc/uptime``)."""
    stat = _read(proc / "stat")
    uptime = _read(root / "uptime")
    if stat is None or uptime is None:
        return None
    try:
        fields = stat.rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 overall; fields[0] is field 3
        return float(uptime.split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def _checkpoint_files(proc: Path) -> set[str]:
    """``*.safetensors`` paths the process has open or memory-mapped."""
    found: set[str] = set()
    maps = _read(proc / "maps")
    for line in (maps or b"").decode("utf-8", "replace").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            found.add(parts[5])
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith(".safetensors"):
            found.add(target)
    return found


def vllm_processes(root: Path = Path("/proc")) -> list[VllmProcess]:
    """Every vLLM process visible under ``root`` (a procfs), oldest first."""
    out = []
    try:
        entries = [p for p in root.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for proc in entries:
        cmdline = _read(proc / "cmdline")
        if not cmdline:
            continue
        argv = [a.decode("utf-8", "replace") for a in cmdline.rstrip(b"\0").split(b"\0")]
        if not _is_vllm(argv):
            continue
        title = argv[0] if argv[0].startswith("VLLM::") else " ".join(argv[:3])
        out.append(
            VllmProcess(
                int(proc.name), title, _age_s(proc, root), tuple(sorted(_checkpoint_files(proc)))
            )
        )
    return sorted(out, key=lambda p: -(p.age_s or 0.0))


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"; vLLM up {seconds / 60:.0f} min"


def describe(processes: list[VllmProcess]) -> str:
    """One clause naming the stage, for the probe's "still loading" line."""
    if not processes:
        return "no vLLM process visible to this probe (run it inside the server's container)"
    age = _minutes(processes[0].age_s)
    files = {f for p in processes for f in p.checkpoint_files}
    if not files:
        return (
            f"{len(processes)} vLLM processes, no checkpoint file open: before the weight "
            f"read, or after it (profiling, compiling, capturing CUDA graphs){age}"
        )
    shards = [m for m in (_SHARD.search(f) for f in files) if m]
    if shards:
        top = max(shards, key=lambda m: int(m.group(1)))
        progress = f"shard {int(top.group(1))} of {int(top.group(2))}"
    else:
        progress = f"{len(files)} files open"
    return f"loading weights: {progress} open{age}"
