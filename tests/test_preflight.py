"""`dsv4-nvfp4 preflight`: every check on CPU for real, the GPU checks on recorded device answers.

The device query layer (``DeviceQuery``) is the one thing replaced: its answers
are ``nvidia-smi`` texts recorded on an H200 (one GPU, driver 580.159.04) and
the same shapes for 8 B200s (183359 MiB, compute capability 10.0, as
``nvidia-smi --query-gpu`` prints them on a B200). The checkpoint, host,
compose and read-speed checks run on a real tiny checkpoint and the
repository's compose.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.lock import make_lock, write_lock
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.cli import main
from dsv4_nvfp4.deploy import preflight as pf

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"

# Recorded on an H200 (nvidia-smi 580.159.04): the --query-gpu line and the banner's header.
H200_CSV = "0, NVIDIA H200, 9.0, 143771, 0, 143156, 580.159.04\n"
BANNER = """Fri Dec  4 18:39:20 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |                    0 |
| N/A   39C    P0             81W /  700W |       0MiB / 143771MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+
"""


def b200_csv(used: dict[int, int] | None = None) -> str:
    used = used or {}
    return "".join(f"{i}, NVIDIA B200, 10.0, 183359, {used.get(i, 0)}, "
                   f"{183359 - 763 - used.get(i, 0)}, 580.82.07\n" for i in range(8))


class Recorded(pf.DeviceQuery):
    """The device query layer with recorded answers."""

    def __init__(self, csv: str | None = None, banner: str | None = BANNER,
                 image_cuda: str | None = "13.0", jit: str | None = "recorded device") -> None:
        self.csv = b200_csv() if csv is None else csv
        self.text, self.cuda, self.jit = banner, image_cuda, jit

    def gpus_csv(self) -> str | None:
        return self.csv

    def banner(self) -> str | None:
        return self.text

    def image_cuda(self) -> str | None:
        return self.cuda

    def jit_unavailable(self) -> str | None:
        return self.jit


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("preflight") / "B", Layout.B, mtp=True)


@pytest.fixture
def model(tiny_b: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_b, tmp_path / "model"))


def opts(model: Path, **kw) -> pf.Options:
    return pf.Options(model, compose_file=COMPOSE, sample_bytes=1 << 20, threads=2, **kw)


def by_name(checks: list[pf.Check]) -> dict[str, pf.Check]:
    return {c.name: c for c in checks}


# --- the device query layer ----------------------------------------------------------------


def test_the_recorded_h200_answers_parse() -> None:
    assert pf.parse_gpus(H200_CSV) == [
        pf.Gpu(0, "NVIDIA H200", (9, 0), 143771, 0, 143156, "580.159.04")]
    assert pf.driver_cuda(BANNER) == "13.0"
    gpus = pf.parse_gpus(b200_csv())
    assert len(gpus) == 8 and {g.capability for g in gpus} == {(10, 0)}
    with pytest.raises(ValueError, match=r"nvidia-smi line 1: expected 7 fields"):
        pf.parse_gpus("0, NVIDIA B200, 10.0\n")
    with pytest.raises(ValueError, match=r"expected numbers"):
        pf.parse_gpus("0, NVIDIA B200, [N/A], 183359, 0, 182596, 580.82.07\n")


def test_eight_b200s_pass_every_gpu_check(model: Path) -> None:
    checks = by_name(pf.run_checks(opts(model, jit="off"), Recorded(), environ={}))
    assert checks["driver"].status == pf.PASS
    assert checks["driver"].detail == ("driver 580.82.07 supports CUDA 13.0; the image's torch "
                                       "is built for CUDA 13.0")
    assert checks["gpu count"].status == pf.PASS and checks["gpu count"].detail == "8 x NVIDIA B200"
    assert checks["sm100"].detail == "compute capability 10.0"
    hbm = checks["hbm"]
    shards = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    kv = pf.kv_cache_bytes(json.loads((model / "config.json").read_text()), 131072)
    assert hbm.status == pf.PASS
    assert hbm.detail.startswith(f"weights {shards / 8 / 2**30:.1f} GiB (checkpoint / 8) + KV "
                                 f"{kv / 2**30:.2f} GiB (one 131072-token sequence) + reserve "
                                 "10 GiB = ")
    assert "of 161.2 GiB (0.9 x 179.1 GiB)" in hbm.detail


def test_the_h200_fails_count_and_sm100_with_the_fix(model: Path) -> None:
    checks = by_name(pf.run_checks(opts(model, jit="off"), Recorded(csv=H200_CSV), environ={}))
    count, sm = checks["gpu count"], checks["sm100"]
    assert (count.status, sm.status) == (pf.FAIL, pf.FAIL)
    assert count.detail == "expected 8 GPUs (--tensor-parallel-size), found 1"
    assert "GPU_COUNT=all" in count.fix
    assert sm.detail == ("expected compute capability 10.x (SM100, B200) on every GPU, found "
                         "GPU 0 NVIDIA H200 9.0")
    assert sm.lines()[1].startswith("       fix: run on a B200 node")
    assert checks["jit"].status == pf.SKIP  # off


def test_a_driver_older_than_the_image_names_the_driver_to_install() -> None:
    old = BANNER.replace("CUDA Version: 13.0", "CUDA Version: 12.8").replace("580.159.04",
                                                                             "570.133.20")
    (drv,) = [c for c in pf.gpu_checks(Recorded(banner=old), pf.Settings(), None, None)
              if c.name == "driver"]
    assert drv.status == pf.FAIL
    assert drv.detail == ("expected a driver supporting CUDA 13.0 (the image's), found driver "
                          "580.82.07 supporting CUDA 12.8")
    assert drv.fix == "install NVIDIA driver 580.65.06 or newer"
    (drv,) = [c for c in pf.gpu_checks(Recorded(image_cuda=None), pf.Settings(), None, None)
              if c.name == "driver"]
    assert drv.status == pf.WARN and drv.fix == "run preflight inside the image (make preflight)"


def test_no_nvidia_smi_and_a_broken_answer_are_one_line_each() -> None:
    (c,) = pf.gpu_checks(Recorded(csv="", banner=None), pf.Settings(), None, None)
    assert c.status == pf.FAIL and c.detail.startswith("nvidia-smi not found")
    (c,) = pf.gpu_checks(Recorded(csv="garbage\n"), pf.Settings(), None, None)
    assert c.status == pf.FAIL and c.detail.startswith("nvidia-smi line 1: expected 7 fields")


def test_a_gpu_held_by_another_process_fails_hbm() -> None:
    gpus = pf.parse_gpus(b200_csv({3: 50000}))
    c = pf.hbm_check(gpus, pf.Settings(), 913 * 10**9, 1 << 30)
    assert c.status == pf.FAIL
    assert c.detail == ("GPU 3: expected at least 161.2 GiB free (--gpu-memory-utilization 0.9 "
                        "of 179.1 GiB), found 129.5 GiB free (48.8 GiB in use)")
    assert "make ps, make down" in c.fix


def test_weights_that_do_not_fit_fail_hbm_with_the_shortfall() -> None:
    gpus = pf.parse_gpus(b200_csv())
    c = pf.hbm_check(gpus, pf.Settings(max_model_len=131072), 1500 * 10**9, 1 << 30)
    assert c.status == pf.FAIL
    # 1500e9 / 8 = 174.6 GiB + 1 + 10 = 185.6 GiB against 0.9 x 179.1 = 161.2 GiB
    assert c.detail.endswith("= 185.6 GiB within 0.9 x 179.1 GiB = 161.2 GiB, found 24.5 GiB "
                             "short")
    assert c.fix.startswith("lower MAX_MODEL_LEN")
    # NVIDIA's ~913 GB checkpoint: 106.3 GiB of weights per GPU fits
    assert pf.hbm_check(gpus, pf.Settings(max_model_len=131072), 913 * 10**9,
                        1 << 30).status == pf.PASS


def test_kv_cache_of_one_sequence_uses_vllms_per_state_bytes(tiny_b: Path) -> None:
    """head_dim 512 + rope 64 + 8 = 584 B per compressed state (vLLM 0.34.0's fp8_ds_mla),
    68 B per mxfp4 indexer state, one state per r tokens, plus each layer's window."""
    cfg = json.loads((tiny_b / "config.json").read_text())
    cfg.update(head_dim=512, qk_rope_head_dim=64, index_head_dim=128, sliding_window=128)
    ratios = [*cfg["compress_ratios"]]
    assert sorted(set(ratios)) == [0, 4, 128]
    n4, n128 = ratios.count(4), ratios.count(128)
    per_token = n4 * (584 / 4 + 68 / 4) + n128 * 584 / 128
    want = per_token * 131072 + len(ratios) * 128 * 584
    assert pf.kv_cache_bytes(cfg, 131072) == int(want) + (want % 1 > 0)
    # Pro's shape: ~30 CSA + ~31 HCA layers and one MTP layer -> ~0.6 GiB at 131072 tokens
    pro = dict(cfg, num_hidden_layers=61, num_nextn_predict_layers=1,
               compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    assert 0.5 * 2**30 < pf.kv_cache_bytes(pro, 131072) < 0.7 * 2**30


# --- host ----------------------------------------------------------------------------------


def test_memlock_and_shm_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checks = by_name(pf.host_checks(pf.Settings(), tmp_path, memlock=lambda: (65536, 65536)))
    assert checks["memlock"].status == pf.FAIL
    assert checks["memlock"].detail == "expected an unlimited memlock limit, found 64 KiB"
    import resource

    inf = resource.RLIM_INFINITY
    checks = by_name(pf.host_checks(pf.Settings(), tmp_path, memlock=lambda: (inf, inf)))
    assert checks["memlock"].status == pf.PASS

    class Small:  # Docker's default /dev/shm: 64 MiB
        f_frsize, f_blocks = 4096, 16384

    monkeypatch.setattr(pf.os, "statvfs", lambda _p: Small)
    (shm,) = [c for c in pf.host_checks(pf.Settings(), Path("/dev/shm"), lambda: (inf, inf))
              if c.name == "shm"]
    assert shm.status == pf.FAIL
    assert shm.detail == "expected /dev/shm of at least 8 GiB, found 0.06 GiB"
    assert "ipc: host" in shm.fix


def test_compose_settings_are_read_from_the_real_file_and_a_broken_one_fails(
        tmp_path: Path) -> None:
    s, problems = pf.settings_from(COMPOSE, {}, None)
    assert problems == []
    assert (s.tensor_parallel, s.gpu_memory_utilization, s.max_model_len) == (8, 0.9, 131072)
    assert s.start_period_s == 90 * 60
    assert pf.compose_host_check(s).status == pf.PASS
    s, _ = pf.settings_from(COMPOSE, {"MAX_MODEL_LEN": "393216"}, None)
    assert s.max_model_len == 393216
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    ipc: host\n", "")
                      .replace("memlock: -1", "memlock: 65536"))
    s, problems = pf.settings_from(broken, {}, None)
    c = pf.compose_host_check(s)
    assert c.status == pf.FAIL
    assert c.detail == (f"{broken}: services.vllm: expected `ipc: host` and ulimits.memlock -1, "
                        "found neither `ipc: host` nor shm_size; ulimits.memlock 65536")
    assert c.fix == "add `ipc: host` to services.vllm; set ulimits: memlock: -1"
    assert pf.parse_duration("1h30m") == 5400 and pf.parse_duration("5400s") == 5400
    with pytest.raises(ValueError, match="expected a duration"):
        pf.parse_duration("ninety")


# --- checkpoint ----------------------------------------------------------------------------


def test_a_good_checkpoint_and_its_lock_pass(model: Path, tmp_path: Path) -> None:
    lock, _, _ = make_lock(model, "nvidia/DeepSeek-V4-Pro-NVFP4", "a" * 40)
    write_lock(lock, tmp_path / "lock.json")
    checks, facts = pf.checkpoint_checks(model, tmp_path / "lock.json")
    c = by_name(checks)
    assert [x.status for x in checks] == [pf.PASS] * 3
    assert c["checkpoint"].detail.startswith("layout B")
    assert c["checkpoint"].detail.endswith("no findings (verify's quick mode: headers and config)")
    assert c["lock"].detail.startswith(f"{len(lock.files)} files of nvidia/DeepSeek-V4-Pro-NVFP4@")
    assert facts.weights_bytes == sum(p.stat().st_size for p in model.glob("*.safetensors"))


def test_a_truncated_shard_fails_verify_and_the_lock(model: Path, tmp_path: Path) -> None:
    lock, _, _ = make_lock(model, "r/x", "a" * 40)
    write_lock(lock, tmp_path / "lock.json")
    shard = sorted(model.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    c = by_name(pf.checkpoint_checks(model, tmp_path / "lock.json")[0])
    assert c["checkpoint"].status == pf.FAIL and shard.name in c["checkpoint"].detail
    assert c["checkpoint"].fix.startswith(f"dsv4-nvfp4 verify {model} lists every finding")
    assert c["lock"].status == pf.FAIL
    assert c["lock"].detail == (f"{shard.name}: expected {size} bytes ({tmp_path / 'lock.json'}), "
                                f"found {size - 100} bytes")


def test_a_missing_or_unreadable_model_dir(tmp_path: Path, model: Path) -> None:
    (c,) = pf.checkpoint_checks(tmp_path / "absent", None)[0]
    assert c.status == pf.FAIL and c.detail.endswith("expected a checkpoint directory, found "
                                                     "nothing")
    if os.geteuid() != 0:  # root reads anything
        shard = sorted(model.glob("*.safetensors"))[0]
        shard.chmod(0)
        (c,) = pf.checkpoint_checks(model, None)[0]
        assert c.status == pf.FAIL and "permission denied" in c.detail


# --- read speed and the start budget -------------------------------------------------------


def test_read_sample_reads_what_it_reports(model: Path) -> None:
    shards = sorted(model.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    sample = pf.read_sample(shards, 10**12, threads=2)
    biggest = sorted((p.stat().st_size for p in shards), reverse=True)[:2]
    assert sample.bytes == sum(biggest) and sample.files == 2 and sample.seconds > 0
    small = pf.read_sample(shards, 1000, threads=2)
    assert small.bytes == 1000 and total > 1000


def test_the_start_budget_from_a_measured_speed() -> None:
    s = pf.Settings(start_period_s=5400, engine_timeout_s=5400)
    fast = pf.start_budget_check(pf.ReadSample(10 * 10**9, 1.0, 8, True), 913 * 10**9, s)
    assert fast.status == pf.PASS
    assert fast.detail == ("read 10.00 GB from 8 files in 1.00 s (cold): 10.00 GB/s, so 913.0 GB "
                           "load in >= 1.5 min; start_period >= (1.5 + 30) x 1.5 = 50 min; "
                           "compose start_period 90 min, VLLM_ENGINE_READY_TIMEOUT_S 90 min")
    # network storage at 0.2 GB/s: 76 min of load alone
    slow = pf.start_budget_check(pf.ReadSample(2 * 10**9, 10.0, 8, True), 913 * 10**9, s)
    assert slow.status == pf.FAIL
    assert pf.suggested_start_minutes(913 * 10**9, 0.2) == 160
    assert slow.fix.startswith("raise healthcheck.start_period to 160m in compose.yaml and "
                               "VLLM_ENGINE_READY_TIMEOUT_S to 9600 in .env")


# --- the JIT and the command ---------------------------------------------------------------


def test_the_jit_runs_only_where_possible_and_only_through_its_one_function(
        model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = pf.run_checks(opts(model), Recorded(), environ={})
    assert by_name(checks)["jit"].detail == ("recorded device; the B200 acceptance runbook "
                                             "runs it")
    called = []

    def fake_jit() -> list[pf.Check]:
        called.append(1)
        return [pf.Check("jit: nvfp4_mega_moe warm-up", pf.PASS, "stand-in")]

    # this CPU runner's own /dev/shm and memlock are not a B200 node's: leave them out here
    monkeypatch.setattr(pf, "host_checks", lambda s: [])
    checks = pf.run_checks(opts(model, jit="on"), Recorded(jit=None), environ={}, jit=fake_jit)
    assert [c.status for c in checks if c.status == pf.FAIL] == []
    assert called == [1] and checks[-1].name == "jit: nvfp4_mega_moe warm-up"
    # after a failed check the minute-long compile is not attempted
    checks = pf.run_checks(opts(model, jit="on"), Recorded(csv=H200_CSV, jit=None), environ={},
                           jit=fake_jit)
    assert called == [1] and by_name(checks)["jit"].detail == "a check above failed"


def test_the_command_prints_each_check_and_writes_json(model: Path, tmp_path: Path,
                                                       capsys) -> None:
    out = tmp_path / "preflight.json"
    code = main(["preflight", "--model-dir", str(model), "--compose-file", str(COMPOSE),
                 "--skip-gpu", "--jit", "off", "--sample-gb", "0.001", "--json", str(out)])
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert code == (1 if report["failed"] else 0)
    names = [c["name"] for c in report["checks"]]
    assert names[:2] == ["gpu", "shm"] and "checkpoint" in names and "start budget" in names
    assert "[ok  ] checkpoint: layout B" in printed.out
    assert printed.out.splitlines()[-1].startswith("preflight: ")
    assert main(["preflight", "--model-dir", str(model), "--sample-gb", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("preflight: expected --sample-gb > 0 and "
                                               "--threads >= 1, found 0.0 and 8")


def test_make_up_runs_preflight_in_the_servers_container_unless_skipped() -> None:
    import subprocess

    def make(*args: str) -> list[str]:
        done = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        return done.stdout.splitlines()

    run = ("docker compose run --rm --no-deps -T -v "
           f'"{ROOT}/compose.yaml":/etc/dsv4-nvfp4/compose.yaml:ro')
    tail = ("--entrypoint dsv4-nvfp4 vllm preflight --model-dir /model --compose-file "
            "/etc/dsv4-nvfp4/compose.yaml")
    (pre,) = make("preflight", "LOCK=locks/x.json", "MAX_MODEL_LEN=393216")
    assert run in pre and tail in pre and "-e MAX_MODEL_LEN=393216 " in pre
    assert pre.rstrip().endswith("--lock /etc/dsv4-nvfp4/lock.json")
    assert f'-v "{ROOT}/locks/x.json":/etc/dsv4-nvfp4/lock.json:ro' in pre
    up = make("up", "VLLM_API_KEY=k")
    assert run in up[-2] and tail in up[-2] and up[-1].endswith("docker compose up -d")
    up = make("up", "VLLM_API_KEY=k", "PREFLIGHT=0")
    assert up[-2] == 'echo "make up: preflight skipped (PREFLIGHT=0)"'
    assert up[-1].endswith("docker compose up -d")
