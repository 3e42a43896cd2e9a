"""`dsv4-nvfp4 lock` and `verify --against LOCK` on a real tiny layout-B checkpoint.

The digests are checked against hashlib over the file bytes; every corruption
(one flipped byte, a truncated shard, a missing or extra file, a file that
differs from the Hub's SHA-256 the download recorded) is one line naming the
file, what the lock expects and what was found, and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dsv4_nvfp4.checkpoint import lock as lock_mod
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.cli import main

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

REPO = "nvidia/DeepSeek-V4-Pro-NVFP4"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("lock") / "B", Layout.B, mtp=True)


@pytest.fixture
def model(tiny_b: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, free to corrupt."""
    return Path(shutil.copytree(tiny_b, tmp_path / "model"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def make(model: Path, out: Path, *extra: str) -> int:
    return main(["lock", str(model), "--repo", REPO, "-o", str(out), *extra])


def test_lock_records_every_file_with_its_size_and_sha256(model: Path, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "locks" / "tiny.json"
    assert make(model, out, "--revision", REV) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    files = sorted(p for p in model.rglob("*") if p.is_file())
    assert data["format"] == 1 and data["repo"] == REPO and data["revision"] == REV
    assert data["files"] == [{"name": p.relative_to(model).as_posix(), "size": p.stat().st_size,
                              "sha256": sha(p)} for p in files]
    assert data["total_size"] == sum(p.stat().st_size for p in files)
    assert data["file_count"] == len(files) >= 4  # config, index, shards, tokenizer
    assert {"config.json", "model.safetensors.index.json"} <= {f["name"] for f in data["files"]}
    assert f"lock: {out}: {REPO}@{REV}, {len(files)} files" in printed
    assert "GB/s" in printed
    assert list(out.parent.iterdir()) == [out]  # nothing half-written left beside it


def test_verify_against_the_lock_passes_and_reports_time_and_speed(model: Path, tmp_path: Path,
                                                                   capsys) -> None:
    out = tmp_path / "tiny.json"
    assert make(model, out, "--revision", REV) == 0
    capsys.readouterr()
    assert main(["verify", str(model), "--against", str(out), "--no-values"]) == 0
    printed = capsys.readouterr().out
    first, *rest = printed.splitlines()
    assert first.startswith(f"lock: every file matches {out} ({REPO}@{REV}, ")
    assert " in " in first and "GB/s" in first and "threads)" in first
    assert rest[-1] == "result: clean"  # the lint ran after the lock


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "extra"])
def test_verify_against_the_lock_names_the_file_expected_and_found(model: Path, tmp_path: Path,
                                                                   capsys, damage: str) -> None:
    out = tmp_path / "tiny.json"
    assert make(model, out, "--revision", REV) == 0
    capsys.readouterr()
    victim = shards(model)[-1]
    size, digest = victim.stat().st_size, sha(victim)
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0x01
        victim.write_bytes(bytes(data))
        want = (f"error: {victim.name}: expected sha256 {digest} ({out}), "
                f"found {sha(victim)}")
    elif damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(size - 7)
        want = f"error: {victim.name}: expected {size} bytes ({out}), found {size - 7} bytes"
    elif damage == "remove":
        victim.unlink()
        want = f"error: {victim.name}: expected a file of {size} bytes ({out}), found absent"
    else:
        (model / "stray.safetensors").write_bytes(b"x")
        want = (f"error: stray.safetensors: expected only the files the lock lists ({out}), "
                "found a file it does not list")
    assert main(["verify", str(model), "--against", str(out)]) == 1
    cap = capsys.readouterr()
    assert cap.err.splitlines() == [want]
    assert cap.out.startswith("lock: 1 of ")
    assert "result:" not in cap.out  # a wrong file is not linted


def test_lock_takes_the_revision_and_checks_the_sha256_the_download_recorded(
        model: Path, tmp_path: Path, capsys) -> None:
    """`hf download --local-dir` keeps commit and ETag per file; an LFS ETag is a SHA-256."""
    meta = model / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    files = sorted(p for p in model.iterdir() if p.is_file())
    for p in files:
        etag = sha(p) if p.suffix == ".safetensors" else "a" * 40  # small files: a git blob id
        (meta / f"{p.name}.metadata").write_text(f"{REV}\n{etag}\n1712656091.123\n")
    out = tmp_path / "tiny.json"
    assert make(model, out) == 0  # no --revision: the download's commit
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["revision"] == REV
    assert ".cache" not in json.dumps(data["files"])  # the download's own state is not locked
    assert f"; {len(shards(model))} files equal to the Hub's SHA-256" in printed
    # a branch name resolves to the recorded commit; another commit is refused
    assert make(model, out, "--revision", "main") == 0
    assert json.loads(out.read_text())["revision"] == REV
    other = "f" * 40
    assert make(model, out, "--revision", other) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {model}: expected revision {other}, found files downloaded from {REV} "
        "(.cache/huggingface/download/)")
    # a shard that is not what the Hub published is reported, not locked
    victim = shards(model)[0]
    hub = sha(victim)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    out.unlink()
    assert make(model, out) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {victim.name}: expected sha256 {hub} (the Hub's, recorded by the download), "
        f"found {sha(victim)}")
    assert not out.exists()


def test_lock_refuses_a_directory_mixed_from_two_revisions(model: Path, tmp_path: Path,
                                                          capsys) -> None:
    meta = model / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    first, second = shards(model)[:2]
    (meta / f"{first.name}.metadata").write_text(f"{REV}\n{sha(first)}\n1.0\n")
    (meta / f"{second.name}.metadata").write_text(f"{'b' * 40}\n{sha(second)}\n1.0\n")
    assert make(model, tmp_path / "x.json") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {model}: expected files of one revision, found 2 (")
    assert f"{first.name} from {REV}" in err and f"{second.name} from {'b' * 40}" in err


def test_lock_without_revision_or_download_record_is_one_line(model: Path, tmp_path: Path,
                                                             capsys) -> None:
    assert make(model, tmp_path / "x.json") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {model}: expected --revision (no .cache/huggingface/download/ records the "
        "commit this download came from)")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(files=[{**d["files"][0], "name": "../etc/passwd"}]),
     "files[0].name: expected a relative file name inside the checkpoint, found '../etc/passwd'"),
    (lambda d: d["files"][0].update(sha256="XYZ"),
     "files[0].sha256: expected 64 lowercase hex digits, found 'XYZ'"),
    (lambda d: d["files"][0].update(size=-1), "files[0].size: expected a byte count, found -1"),
    (lambda d: d.update(total_size=1), "total_size: expected the sum of the file sizes"),
    (lambda d: d.update(format=2), "format: expected 1, found 2"),
    (lambda d: d.pop("revision"), "revision: expected a non-empty string, found null"),
])
def test_a_malformed_lock_is_one_line_and_exit_2(model: Path, tmp_path: Path, capsys, edit,
                                                 message: str) -> None:
    out = tmp_path / "tiny.json"
    assert make(model, out, "--revision", REV) == 0
    data = json.loads(out.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["verify", str(model), "--against", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}: {message}"), err
    out.write_text("{not json")
    assert main(["verify", str(model), "--against", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: expected a JSON lock, found "
                                              "invalid JSON")


def test_streaming_hash_and_the_thread_pool_agree_with_hashlib(tmp_path: Path) -> None:
    blobs = {f"f{i}.bin": bytes(range(256)) * (1000 + 997 * i) for i in range(5)}
    paths = {}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    want = {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    # a buffer far smaller than each file: many readinto rounds per file
    assert {n: lock_mod.sha256_of(p, bytearray(4093)) for n, p in paths.items()} == want
    for threads in (1, 3):
        run = lock_mod.hash_files(paths, threads=threads)
        assert run.digests == want
        assert run.bytes == sum(map(len, blobs.values())) and run.threads == threads


def test_quick_check_reads_names_and_sizes_only(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    assert make(model, out, "--revision", REV) == 0
    lock = lock_mod.read_lock(out)
    assert lock_mod.quick_check(model, lock) == []
    victim = shards(model)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))  # same size: only the full check sees it
    assert lock_mod.quick_check(model, lock) == []
    mismatches, run = lock_mod.full_check(model, lock)
    assert [m.name for m in mismatches] == [victim.name] and run is not None
