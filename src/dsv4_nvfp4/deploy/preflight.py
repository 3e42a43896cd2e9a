"""``dsv4-nvfp4 preflight``: minutes of checks before the hour-long start.

A cold start of DeepSeek V4 Pro reads ~900 GB and compiles for half an hour
before vLLM says anything useful; a wrong driver, a GPU held by another
process, a 64 MiB ``/dev/shm``, a half-downloaded checkpoint or storage too slow
for the health-check budget each surface only at its end. This command checks
them first. ``make up`` runs it inside the serving image, in the compose
service's own container (``docker compose run``: same GPUs, ``ipc``, ulimits,
mounts and caches), unless ``PREFLIGHT=0``.

What it checks, each a ``[ok]`` / ``[FAIL]`` / ``[warn]`` / ``[skip]`` line, a
failure followed by the fix:

* **driver**: the CUDA version the driver supports (``nvidia-smi``) against the
  CUDA this image's torch was built for;
* **GPUs**: as many as ``--tensor-parallel-size`` (8), every one SM100
  (compute capability 10.x);
* **HBM** per GPU: free memory at least ``--gpu-memory-utilization`` of the total
  (vLLM refuses to start otherwise), and that share holding the weights per GPU
  (checkpoint / tensor-parallel size) plus the KV cache of one ``MAX_MODEL_LEN``
  sequence (from the checkpoint's config) plus a working reserve;
* **host**: ``/dev/shm`` size and the memlock limit where it runs, and
  ``compose.yaml``'s ``ipc: host`` (or ``shm_size``) and ``ulimits.memlock: -1``;
* **checkpoint**: ``MODEL_DIR`` readable; its layout and ``verify``'s quick
  mode (headers and config, no values, no hashing); with ``--lock``, the lock's
  names and sizes (no hashing);
* **read speed**: a sample read cold (pages dropped first) on parallel
  threads, and from it the load time of the whole checkpoint and a suggested
  health-check ``start_period``, against compose's and
  ``VLLM_ENGINE_READY_TIMEOUT_S``;
* **NVFP4 MegaMoE JIT**: one compile of vLLM's NVFP4 MegaMoE kernel into the
  DeepGEMM cache volume (``doctor --gpu``'s kernel check). It runs only on an
  SM100 GPU inside the image, behind :func:`megamoe_jit`; elsewhere it is
  reported as skipped.

Everything the GPUs are asked goes through :class:`DeviceQuery` (``nvidia-smi``
CSV, its banner, torch's CUDA version): tests pass one with recorded answers.
Exit 0 when nothing failed, 1 otherwise, 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from dsv4_nvfp4.checkpoint.config import dims_from_config
from dsv4_nvfp4.checkpoint.errors import CheckpointError
from dsv4_nvfp4.checkpoint.lock import quick_check, read_lock
from dsv4_nvfp4.deploy.compose import (
    ComposeError,
    find_compose_file,
    flag_value,
    load_compose,
    serve_command,
    service_environment,
)

PASS, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
GIB = 1 << 30

# Used only where no compose file is at hand (compose.yaml's command owns them).
DEFAULT_TP = 8
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default of --gpu-memory-utilization
# Activations, CUDA graphs, NCCL and MegaMoE buffers: an estimate; vLLM profiles the
# real figure at start and gives the KV cache what is left.
WORKING_RESERVE_BYTES = 10 * GIB
# Docker's default /dev/shm is 64 MiB; NCCL and vLLM's shared-memory broadcast between
# the 8 workers need far more (vLLM's docs: `ipc: host` or a large shm_size).
SHM_MIN_BYTES = 8 * GIB
# The start after the weight load, in minutes (docs/deploy.md's startup budget):
# torch.compile 10 + DeepGEMM JIT 10 + FlashInfer autotune and CUDA graphs 10.
AFTER_LOAD_MINUTES = 30
SAFETY = 1.5
# Minimum Linux driver of a CUDA release (NVIDIA's CUDA release notes), for the fix line.
MIN_DRIVER = {"12.8": "570.26", "12.9": "575.51.03", "13.0": "580.65.06"}
GPU_FIELDS = ("index", "name", "compute_cap", "memory.total", "memory.used", "memory.free",
              "driver_version")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"[{self.status:<4}] {self.name}: {self.detail}"]
        if self.fix and self.status in (FAIL, WARN):
            out.append(f"       fix: {self.fix}")
        return out


# --- the device query layer ----------------------------------------------------------------


class DeviceQuery:
    """Everything preflight asks the GPUs and the image's CUDA, in one place.

    Each method returns the raw answer (text) or None when the tool is absent;
    tests replace this class with recorded answers.
    """

    def gpus_csv(self) -> str | None:
        """``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``."""
        return self._smi("--query-gpu=" + ",".join(GPU_FIELDS), "--format=csv,noheader,nounits")

    def banner(self) -> str | None:
        """Plain ``nvidia-smi``: its header carries ``CUDA Version: X.Y`` (the driver's)."""
        return self._smi()

    def image_cuda(self) -> str | None:
        """The CUDA this Python's torch was built for (the image's), None for a CPU build."""
        try:
            import torch
        except ImportError:
            return None
        return torch.version.cuda

    def jit_unavailable(self) -> str | None:
        """Why the MegaMoE JIT cannot run here, or None: it needs SM100 inside the image."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed here (run preflight inside the image: make preflight)"
        try:
            import torch
        except ImportError:
            return "no torch"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU"
        major, minor = torch.cuda.get_device_capability(0)
        if major != 10:
            return f"GPU 0 is compute capability {major}.{minor}, the kernel is SM100's"
        return None

    @staticmethod
    def _smi(*args: str) -> str | None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(" ".join((done.stderr or done.stdout).split())[:200]
                               or f"nvidia-smi exited {done.returncode}")
        return done.stdout


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    total_mib: int
    used_mib: int
    free_mib: int
    driver: str


def parse_gpus(csv: str) -> list[Gpu]:
    """The rows of ``nvidia-smi --query-gpu`` (``GPU_FIELDS``, csv, noheader, nounits)."""
    out = []
    for n, line in enumerate(csv.strip().splitlines(), 1):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(GPU_FIELDS):
            raise ValueError(f"nvidia-smi line {n}: expected {len(GPU_FIELDS)} fields "
                             f"({','.join(GPU_FIELDS)}), found {line.strip()!r}")
        try:
            major, _, minor = cells[2].partition(".")
            out.append(Gpu(int(cells[0]), cells[1], (int(major), int(minor or 0)),
                           int(cells[3]), int(cells[4]), int(cells[5]), cells[6]))
        except ValueError:
            raise ValueError(f"nvidia-smi line {n}: expected numbers for index, "
                             f"compute_cap and memory, found {line.strip()!r}") from None
    return out


_CUDA_VERSION = re.compile(r"CUDA Version:\s*([0-9]+\.[0-9]+)")


def driver_cuda(banner: str) -> str | None:
    m = _CUDA_VERSION.search(banner)
    return m.group(1) if m else None


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


# --- what the serve command asks for -------------------------------------------------------


@dataclass
class Settings:
    """The figures preflight judges by: compose's where it is at hand, else the defaults."""

    tensor_parallel: int = DEFAULT_TP
    gpu_memory_utilization: float = VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    start_period_s: float | None = None
    engine_timeout_s: float | None = None
    compose_file: Path | None = None
    compose: dict | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float:
    """Compose's duration (``90m``, ``1h30m``, ``5400s``) in seconds; ValueError if not one."""
    text = str(text).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"expected a duration like 90m or 1h30m, found {text!r}")
    return sum(float(a) * _UNIT_S[b] for a, b in parts)


def settings_from(compose_file: Path | None, environ: Mapping[str, str],
                  max_model_len: int | None) -> tuple[Settings, list[Check]]:
    """Read compose's serve flags and health check; a problem with them is a failed check."""
    s, checks = Settings(), []
    if compose_file is None:
        try:
            compose_file = find_compose_file()
        except ComposeError:
            compose_file = None
    if compose_file is not None:
        try:
            flags = serve_command(compose_file, environ=environ).flags
            s.compose = load_compose(compose_file)
            s.compose_file = compose_file
            tp = flag_value(flags, "--tensor-parallel-size")
            s.tensor_parallel = int(tp) if tp else 1
            util = flag_value(flags, "--gpu-memory-utilization")
            s.gpu_memory_utilization = float(util) if util else s.gpu_memory_utilization
            mml = flag_value(flags, "--max-model-len")
            s.max_model_len = int(mml) if mml else None
            period = ((s.compose.get("services") or {}).get("vllm") or {}).get(
                "healthcheck", {}).get("start_period")
            s.start_period_s = parse_duration(period) if period else None
        except (ComposeError, ValueError, AttributeError) as e:
            checks.append(Check("compose", FAIL, f"{compose_file}: {e}",
                                "fix compose.yaml (docker compose config shows what it resolves)"))
    if max_model_len is not None:
        s.max_model_len = max_model_len
    timeout = environ.get("VLLM_ENGINE_READY_TIMEOUT_S")
    if timeout is None and s.compose_file is not None:
        try:
            timeout = service_environment(s.compose_file, environ=environ).get(
                "VLLM_ENGINE_READY_TIMEOUT_S")
        except ComposeError:
            timeout = None
    try:
        s.engine_timeout_s = float(timeout) if timeout else None
    except ValueError:
        checks.append(Check("compose", FAIL, f"VLLM_ENGINE_READY_TIMEOUT_S: expected seconds, "
                            f"found {timeout!r}", "set a number of seconds in .env"))
    return s, checks


# --- GPU checks ----------------------------------------------------------------------------


def gpu_checks(dev: DeviceQuery, s: Settings, weights_bytes: int | None,
               kv_bytes: int | None) -> list[Check]:
    try:
        csv, banner, image_cuda = dev.gpus_csv(), dev.banner(), dev.image_cuda()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return [Check("gpu", FAIL, f"nvidia-smi failed: {e}",
                      "check the driver (nvidia-smi on the host) and the NVIDIA Container "
                      "Toolkit")]
    if csv is None or banner is None:
        return [Check("gpu", FAIL, "nvidia-smi not found: no NVIDIA driver is visible here",
                      "install the NVIDIA driver; in a container, start it with the GPUs "
                      "(compose's deploy.resources; docker run --gpus all)")]
    try:
        gpus = parse_gpus(csv)
    except ValueError as e:
        return [Check("gpu", FAIL, str(e), "run nvidia-smi by hand to see what is wrong")]
    out = []
    drv = gpus[0].driver if gpus else "?"
    dcuda = driver_cuda(banner)
    if image_cuda is None:
        out.append(Check("driver", WARN, f"driver {drv} (CUDA {dcuda or '?'}); this Python's "
                         "torch has no CUDA build, so the image's CUDA is not known here",
                         "run preflight inside the image (make preflight)"))
    elif dcuda is None:
        out.append(Check("driver", FAIL, f"driver {drv}: nvidia-smi reports no CUDA version",
                         "check the driver installation"))
    elif _version(dcuda) < _version(image_cuda):
        need = MIN_DRIVER.get(".".join(map(str, _version(image_cuda))))
        out.append(Check("driver", FAIL, f"expected a driver supporting CUDA {image_cuda} (the "
                         f"image's), found driver {drv} supporting CUDA {dcuda}",
                         f"install NVIDIA driver {need or 'a release for CUDA ' + image_cuda}"
                         f"{' or newer' if need else ''}"))
    else:
        out.append(Check("driver", PASS, f"driver {drv} supports CUDA {dcuda}; the image's "
                         f"torch is built for CUDA {image_cuda}"))
    names = sorted({g.name for g in gpus})
    if len(gpus) != s.tensor_parallel:
        out.append(Check("gpu count", FAIL, f"expected {s.tensor_parallel} GPUs "
                         f"(--tensor-parallel-size), found {len(gpus)}",
                         "give the container every GPU (GPU_COUNT=all in .env) and check "
                         "nvidia-smi -L on the host"))
    else:
        out.append(Check("gpu count", PASS, f"{len(gpus)} x {', '.join(names)}"))
    not_sm100 = [g for g in gpus if g.capability[0] != 10]
    if not gpus or not_sm100:
        found = ", ".join(f"GPU {g.index} {g.name} {g.capability[0]}.{g.capability[1]}"
                          for g in not_sm100) or "no GPU"
        out.append(Check("sm100", FAIL, f"expected compute capability 10.x (SM100, B200) "
                         f"on every GPU, found {found}",
                         "run on a B200 node: vLLM's NVFP4 MegaMoE and the mxfp4 indexer "
                         "cache are SM100 kernels"))
    else:
        caps = sorted({f"{g.capability[0]}.{g.capability[1]}" for g in gpus})
        out.append(Check("sm100", PASS, f"compute capability {', '.join(caps)}"))
    out.append(hbm_check(gpus, s, weights_bytes, kv_bytes))
    return out


def hbm_check(gpus: list[Gpu], s: Settings, weights_bytes: int | None,
              kv_bytes: int | None) -> Check:
    if not gpus:
        return Check("hbm", SKIP, "no GPU")
    util = s.gpu_memory_utilization
    held = [g for g in gpus if g.free_mib < util * g.total_mib]
    if held:
        g = held[0]
        want = util * g.total_mib / 1024
        return Check("hbm", FAIL, f"GPU {g.index}: expected at least {want:.1f}"
                     f" GiB free (--gpu-memory-utilization {util} of {g.total_mib / 1024:.1f} "
                     f"GiB), found {g.free_mib / 1024:.1f} GiB free ({g.used_mib / 1024:.1f} GiB "
                     f"in use){f'; {len(held)} GPUs so' if len(held) > 1 else ''}",
                     "stop what holds the GPU memory (nvidia-smi lists it; is the server "
                     "already up? make ps, make down)")
    if weights_bytes is None:
        return Check("hbm", WARN, f"{min(g.free_mib for g in gpus) / 1024:.1f} GiB free per GPU "
                     "at least; the checkpoint size is unknown, so its fit was not judged",
                     "fix the checkpoint check above")
    per_gpu = weights_bytes / s.tensor_parallel
    need = per_gpu + (kv_bytes or 0) + WORKING_RESERVE_BYTES
    g = min(gpus, key=lambda g: g.total_mib)
    budget = util * g.total_mib * (1 << 20)
    parts = (f"weights {per_gpu / GIB:.1f} GiB (checkpoint / {s.tensor_parallel}) + KV "
             + (f"{kv_bytes / GIB:.2f} GiB (one {s.max_model_len}-token sequence)"
                if kv_bytes is not None else "not estimated (MAX_MODEL_LEN unknown)")
             + f" + reserve {WORKING_RESERVE_BYTES / GIB:.0f} GiB")
    if need > budget:
        return Check("hbm", FAIL, f"GPU {g.index}: expected {parts} = {need / GIB:.1f} GiB "
                     f"within {util} x {g.total_mib / 1024:.1f} GiB = {budget / GIB:.1f} GiB, "
                     f"found {(need - budget) / GIB:.1f} GiB short",
                     "lower MAX_MODEL_LEN in .env, or serve on GPUs with more memory")
    status = PASS if kv_bytes is not None else WARN
    return Check("hbm", status, f"{parts} = {need / GIB:.1f} GiB of {budget / GIB:.1f} GiB "
                 f"({util} x {g.total_mib / 1024:.1f} GiB); {budget / GIB - need / GIB:.1f} GiB "
                 "left for more KV cache",
                 "" if kv_bytes is not None else "pass --max-model-len")


# --- KV cache of one sequence --------------------------------------------------------------


def kv_cache_bytes(config: dict, max_model_len: int) -> int:
    """KV cache bytes per GPU for one ``max_model_len`` sequence of DeepSeek V4, fp8 cache.

    vLLM 0.34.0 (``vllm/models/deepseek_v4/attention.py``): a compressed layer of
    ratio r stores one 584-byte state per r tokens (``fp8_ds_mla``: fp8 NoPE, bf16
    RoPE, scales; head_dim 512 + rope 64 + 8), replicated on every tensor-parallel
    rank (one KV head, ``max_tp_shards=1``); a ratio-4 layer's indexer adds 68 bytes
    per 4 tokens with the mxfp4 indexer cache; every layer keeps a sliding window
    of ``sliding_window`` uncompressed states.
    """
    d = dims_from_config(config)
    rope = config.get("qk_rope_head_dim", 64)
    state = d.head_dim + (rope if isinstance(rope, int) else 64) + 8
    index_state = d.index_head_dim // 2 + d.index_head_dim // 32
    ratios = [*d.ratios, *d.mtp_ratios]
    per_token = sum(state / r + (index_state / r if r == 4 else 0) for r in ratios if r > 1)
    window = config.get("sliding_window", 128)
    window = window if isinstance(window, int) and window > 0 else 128
    return math.ceil(per_token * max_model_len + len(ratios) * window * state)


# --- host checks ---------------------------------------------------------------------------


def host_checks(s: Settings, shm: Path = Path("/dev/shm"),
                memlock: Callable[[], tuple[int, int]] | None = None) -> list[Check]:
    out = []
    try:
        st = os.statvfs(shm)
        size = st.f_frsize * st.f_blocks
    except OSError as e:
        size = None
        out.append(Check("shm", FAIL, f"{shm}: {e.strerror or e}",
                         "add `ipc: host` to services.vllm in compose.yaml"))
    if size is not None:
        if size < SHM_MIN_BYTES:
            out.append(Check("shm", FAIL, f"expected {shm} of at least "
                             f"{SHM_MIN_BYTES / GIB:.0f} GiB, found {size / GIB:.2f} GiB",
                             "keep `ipc: host` in compose.yaml (or set shm_size), or grow the "
                             "host's /dev/shm"))
        else:
            out.append(Check("shm", PASS, f"{shm}: {size / GIB:.0f} GiB"))
    soft, _hard = (memlock or (lambda: resource.getrlimit(resource.RLIMIT_MEMLOCK)))()
    if soft != resource.RLIM_INFINITY:
        out.append(Check("memlock", FAIL, f"expected an unlimited memlock limit, found "
                         f"{soft // 1024} KiB",
                         "keep `ulimits: memlock: -1` in compose.yaml; on bare metal, "
                         "`ulimit -l unlimited` (limits.conf)"))
    else:
        out.append(Check("memlock", PASS, "unlimited"))
    if s.compose is not None:
        out.append(compose_host_check(s))
    return out


def compose_host_check(s: Settings) -> Check:
    svc = ((s.compose or {}).get("services") or {}).get("vllm") or {}
    problems, fixes = [], []
    shm_size = svc.get("shm_size")
    if svc.get("ipc") != "host" and shm_size is None:
        problems.append("neither `ipc: host` nor shm_size")
        fixes.append("add `ipc: host` to services.vllm")
    memlock = (svc.get("ulimits") or {}).get("memlock")
    values = ([memlock.get("soft"), memlock.get("hard")] if isinstance(memlock, dict)
              else [memlock])
    if any(str(v) != "-1" for v in values):
        problems.append(f"ulimits.memlock {memlock!r}")
        fixes.append("set ulimits: memlock: -1")
    where = f"{s.compose_file}: services.vllm"
    if problems:
        return Check("compose host settings", FAIL, f"{where}: expected `ipc: host` and "
                     f"ulimits.memlock -1, found {'; '.join(problems)}", "; ".join(fixes))
    ipc = "ipc: host" if svc.get("ipc") == "host" else f"shm_size {shm_size}"
    return Check("compose host settings", PASS, f"{where}: {ipc}, ulimits.memlock -1")


# --- checkpoint checks ---------------------------------------------------------------------


@dataclass
class CheckpointFacts:
    weights_bytes: int | None = None
    config: dict | None = None


def checkpoint_checks(model_dir: Path, lock_path: Path | None) -> tuple[list[Check],
                                                                       CheckpointFacts]:
    facts = CheckpointFacts()
    if not model_dir.is_dir():
        return [Check("model dir", FAIL, f"{model_dir}: expected a checkpoint directory, found "
                      f"{'a file' if model_dir.exists() else 'nothing'}",
                      "set MODEL_DIR in .env to the downloaded checkpoint")], facts
    unreadable = [p for p in sorted(model_dir.iterdir())
                  if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable or not os.access(model_dir, os.R_OK | os.X_OK):
        first = unreadable[0] if unreadable else model_dir
        many = f" ({len(unreadable)} files)" if len(unreadable) > 1 else ""
        return [Check("model dir", FAIL, f"{first}: expected readable, found permission "
                      f"denied{many}", "make the checkpoint readable by the container's user "
                      "(chmod -R a+rX)")], facts
    shards = sorted(model_dir.glob("*.safetensors"))
    facts.weights_bytes = sum(p.stat().st_size for p in shards) or None
    out = [Check("model dir", PASS, f"{model_dir}: {len(shards)} safetensors files, "
                 f"{(facts.weights_bytes or 0) / 1e9:.1f} GB")]
    try:
        facts.config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        out.append(Check("checkpoint", FAIL, f"{model_dir / 'config.json'}: expected a JSON "
                         f"config, found {e}", "download the checkpoint again"))
        return out, facts
    from dsv4_nvfp4.checkpoint.verify import verify

    try:
        rep = verify(model_dir, check_values=False, check_hash=False)
    except CheckpointError as e:
        out.append(Check("checkpoint", FAIL, str(e), "download the checkpoint again (or "
                         "convert it: dsv4-nvfp4 convert)"))
        return out, facts
    if rep.findings:
        more = f" (and {len(rep.findings) - 1} more)" if len(rep.findings) > 1 else ""
        out.append(Check("checkpoint", FAIL, f"layout {rep.layout.name}: "
                         f"{rep.findings[0].line()}{more}",
                         f"dsv4-nvfp4 verify {model_dir} lists every finding; download the "
                         "named files again"))
    elif rep.layout.name != "B":
        out.append(Check("checkpoint", WARN, f"layout {rep.layout.title}: the server serves "
                         "layout B (C only without MTP)",
                         f"dsv4-nvfp4 convert {model_dir} OUT --to nvidia-nvfp4"))
    else:
        out.append(Check("checkpoint", PASS, f"layout {rep.layout.title}: {rep.n_tensors} "
                         f"tensors in {rep.n_shards} shards, no findings (verify's quick mode: "
                         "headers and config)"))
    if lock_path is not None:
        try:
            lock = read_lock(lock_path)
            bad = quick_check(model_dir, lock)
        except CheckpointError as e:
            out.append(Check("lock", FAIL, str(e), "regenerate the lock (dsv4-nvfp4 lock)"))
        else:
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                out.append(Check("lock", FAIL, bad[0].line() + more,
                                 f"download the named files again at revision {lock.revision}"))
            else:
                out.append(Check("lock", PASS, f"{len(lock.files)} files of {lock.repo}@"
                                 f"{lock.revision}, names and sizes (verify --against "
                                 f"{lock_path} compares every byte)"))
    return out, facts


# --- read speed and the start budget -------------------------------------------------------


@dataclass
class ReadSample:
    bytes: int
    seconds: float
    files: int
    cold: bool

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


def read_sample(files: list[Path], sample_bytes: int, threads: int = 8,
                block: int = 16 << 20) -> ReadSample:
    """Read ``sample_bytes`` spread over the largest ``files``, on parallel threads, cold.

    Each file's sampled range is dropped from the page cache first
    (``POSIX_FADV_DONTNEED``), so a checkpoint read recently does not pass for fast
    storage: what is measured is what a cold start reads at.
    """
    chosen = sorted(files, key=lambda p: -p.stat().st_size)[:max(1, threads)]
    per = max(1, sample_bytes // len(chosen))
    cold = hasattr(os, "posix_fadvise")

    def one(p: Path) -> int:
        want = min(per, p.stat().st_size)
        buf = bytearray(block)
        view = memoryview(buf)
        got = 0
        with open(p, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, want, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(f.fileno(), 0, want, os.POSIX_FADV_SEQUENTIAL)
            while got < want and (n := f.readinto(view[:min(block, want - got)])):
                got += n
        return got

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
        total = sum(pool.map(one, chosen))
    return ReadSample(total, time.monotonic() - t0, len(chosen), cold)


def suggested_start_minutes(checkpoint_bytes: int, gbps: float) -> int:
    """The health-check budget for a cold start: (load + the rest) x 1.5, in whole 5 minutes."""
    load_min = checkpoint_bytes / 1e9 / gbps / 60
    return int(math.ceil((load_min + AFTER_LOAD_MINUTES) * SAFETY / 5) * 5)


def start_budget_check(sample: ReadSample, checkpoint_bytes: int, s: Settings) -> Check:
    load_min = checkpoint_bytes / 1e9 / sample.gbps / 60
    suggest = suggested_start_minutes(checkpoint_bytes, sample.gbps)
    measured = (f"read {sample.bytes / 1e9:.2f} GB from {sample.files} files in "
                f"{sample.seconds:.2f} s{' (cold)' if sample.cold else ''}: {sample.gbps:.2f} "
                f"GB/s, so {checkpoint_bytes / 1e9:.1f} GB load in >= {load_min:.1f} min; "
                f"start_period >= ({load_min:.1f} + {AFTER_LOAD_MINUTES}) x {SAFETY} = "
                f"{suggest} min")
    budgets = {k: v for k, v in (("compose start_period", s.start_period_s),
                                 ("VLLM_ENGINE_READY_TIMEOUT_S", s.engine_timeout_s))
               if v is not None}
    short = {k: v for k, v in budgets.items() if v < suggest * 60}
    if short:
        have = ", ".join(f"{k} {v / 60:.0f} min" for k, v in short.items())
        return Check("start budget", FAIL, f"{measured}; found {have}",
                     f"raise healthcheck.start_period to {suggest}m in compose.yaml and "
                     f"VLLM_ENGINE_READY_TIMEOUT_S to {suggest * 60} in .env, or put the "
                     "checkpoint on faster local storage")
    have = ", ".join(f"{k} {v / 60:.0f} min" for k, v in budgets.items()) or "no budget known"
    return Check("start budget", PASS, f"{measured}; {have}")


# --- the NVFP4 MegaMoE JIT -----------------------------------------------------------------


def megamoe_jit() -> list[Check]:
    """One NVFP4 MegaMoE call JIT-compiled into DG_JIT_CACHE_DIR: ``doctor --gpu``'s check.

    The only step that needs a B200 inside the image (vLLM's vendored DeepGEMM,
    nvcc, the cache volume); it has not run in this repository's CI.
    """
    from dsv4_nvfp4.deploy.doctor import check_gpu

    status = {True: PASS, False: FAIL, None: SKIP}
    return [Check(f"jit: {c.name}", status[c.ok], c.detail,
                  "dsv4-nvfp4 doctor --gpu shows the whole report" if c.ok is False else "")
            for c in check_gpu()]


# --- running it ----------------------------------------------------------------------------


@dataclass
class Options:
    model_dir: Path
    lock: Path | None = None
    compose_file: Path | None = None
    max_model_len: int | None = None
    sample_bytes: int = 8 * 10**9
    threads: int = 8
    gpu: bool = True
    jit: str = "auto"  # auto | on | off


def run_checks(opts: Options, dev: DeviceQuery | None = None,
               environ: Mapping[str, str] | None = None,
               jit: Callable[[], list[Check]] = megamoe_jit) -> list[Check]:
    dev = dev or DeviceQuery()
    environ = os.environ if environ is None else environ
    s, checks = settings_from(opts.compose_file, environ, opts.max_model_len)
    ck_checks, facts = checkpoint_checks(opts.model_dir, opts.lock)
    kv = None
    if facts.config is not None and s.max_model_len:
        try:
            kv = kv_cache_bytes(facts.config, s.max_model_len)
        except CheckpointError:
            kv = None  # the checkpoint check above names the config problem
    if opts.gpu:
        checks += gpu_checks(dev, s, facts.weights_bytes, kv)
    else:
        checks.append(Check("gpu", SKIP, "--skip-gpu"))
    checks += host_checks(s)
    checks += ck_checks
    shards = sorted(opts.model_dir.glob("*.safetensors")) if opts.model_dir.is_dir() else []
    if shards and facts.weights_bytes:
        try:
            sample = read_sample(shards, opts.sample_bytes, opts.threads)
        except OSError as e:
            checks.append(Check("start budget", FAIL, f"reading the checkpoint: "
                                f"{e.strerror or e}", "check the storage (dmesg)"))
        else:
            checks.append(start_budget_check(sample, facts.weights_bytes, s))
    else:
        checks.append(Check("start budget", SKIP, "no safetensors files to read"))
    if opts.jit == "off":
        checks.append(Check("jit", SKIP, "--jit off"))
    elif opts.jit == "auto" and (why := dev.jit_unavailable()) is not None:
        checks.append(Check("jit", SKIP, f"{why}; the B200 acceptance runbook runs it"))
    elif any(c.status == FAIL for c in checks):
        checks.append(Check("jit", SKIP, "a check above failed"))
    else:
        checks += jit()
    return checks


def write_json(path: Path, obj: dict) -> None:
    """Through a temporary name beside ``path``, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_model_dir(environ: Mapping[str, str]) -> Path | None:
    if environ.get("MODEL_DIR"):
        return Path(environ["MODEL_DIR"])
    return Path("/model") if Path("/model").is_dir() else None  # the serving container


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preflight", help="check driver, GPUs, HBM, host, checkpoint and storage before a start",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None,
                   help="the checkpoint (default: $MODEL_DIR, else /model in the container)")
    p.add_argument("--lock", type=Path, default=None, help="compare names and sizes with LOCK")
    p.add_argument("--compose-file", type=Path, default=None,
                   help="compose.yaml to read flags and host settings from (default: found "
                   "from the current directory)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length for the KV estimate (default: compose's)")
    p.add_argument("--sample-gb", type=float, default=8.0,
                   help="GB read to measure the storage (8)")
    p.add_argument("--threads", type=int, default=8, help="parallel readers (8)")
    p.add_argument("--skip-gpu", action="store_true", help="no GPU checks (a machine without GPUs)")
    p.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                   help="the NVFP4 MegaMoE JIT compile: auto = only on SM100 inside the image")
    p.add_argument("--json", type=Path, default=None, help="also write the checks as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    model_dir = args.model_dir or default_model_dir(os.environ)
    if model_dir is None:
        print("preflight: expected --model-dir or $MODEL_DIR, found neither", file=sys.stderr)
        return 2
    if args.sample_gb <= 0 or args.threads < 1:
        print(f"preflight: expected --sample-gb > 0 and --threads >= 1, found "
              f"{args.sample_gb} and {args.threads}", file=sys.stderr)
        return 2
    opts = Options(model_dir, args.lock, args.compose_file, args.max_model_len,
                   int(args.sample_gb * 1e9), args.threads, not args.skip_gpu, args.jit)
    checks = run_checks(opts)
    for c in checks:
        print("\n".join(c.lines()))
    failed = [c.name for c in checks if c.status == FAIL]
    if args.json:
        write_json(args.json, {"failed": failed, "checks": [asdict(c) for c in checks]})
    counts = {st: sum(c.status == st for c in checks) for st in (FAIL, WARN, PASS, SKIP)}
    print(f"preflight: {counts[FAIL]} failed, {counts[WARN]} warnings, {counts[PASS]} ok, "
          f"{counts[SKIP]} skipped")
    if failed:
        print(f"preflight FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
