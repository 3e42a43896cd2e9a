"""``dsv4-nvfp4 lock``: a per-file SHA-256 lock of a downloaded checkpoint, and its check.

Why: ``verify`` proves a checkpoint is *a* valid layout-B checkpoint; a lock proves
it is *the* one pinned — every file of one Hugging Face revision, byte for byte.
A truncated or re-uploaded shard, a file from another revision, a stray file
that vLLM would also read: each is one line naming the file, what the lock
expects and what is on disk.

    dsv4-nvfp4 lock MODEL_DIR --repo nvidia/DeepSeek-V4-Pro-NVFP4 --revision REV -o locks/NAME.json
    dsv4-nvfp4 verify MODEL_DIR --against locks/NAME.json

The lock is JSON: ``repo``, ``revision``, ``total_size`` and, per file, ``name``
(relative, ``/``-separated), ``size`` and ``sha256``. Every regular file under
MODEL_DIR is locked except the download tool's own state (``.cache/``).

What a download recorded is used when it is there: ``hf download --local-dir``
keeps, per file, ``.cache/huggingface/download/NAME.metadata`` with the commit
it came from and the Hub's ETag, which for a large (LFS/Xet) file is the SHA-256
the Hub publishes for it. ``lock`` takes the revision from there when
``--revision`` is not given, refuses a directory mixed from two revisions, and
compares each such SHA-256 with the one it computes: a file that differs from
what the Hub published is reported, not locked.

Hashing streams each file through one reused 16 MiB buffer (``readinto``, no
per-block allocation) and hashes several files at once on a thread pool
(``hashlib`` releases the GIL); the time and GB/s are reported.
``quick_check`` compares names and sizes only, without reading a byte: what
``preflight`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, fail

LOCK_FORMAT = 1
HF_STATE_DIR = ".cache"  # what `hf download --local-dir` keeps beside the files
HF_METADATA_DIR = Path(".cache") / "huggingface" / "download"
BUFFER_BYTES = 16 << 20
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LockedFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Lock:
    repo: str
    revision: str
    files: tuple[LockedFile, ...]
    path: Path | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict:
        return {"format": LOCK_FORMAT, "repo": self.repo, "revision": self.revision,
                "total_size": self.total_size, "file_count": len(self.files),
                "files": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                          for f in self.files]}


@dataclass(frozen=True)
class Mismatch:
    """One file that is not what the lock says: ``name: expected ..., found ...``."""

    name: str
    expected: str
    found: str

    def line(self) -> str:
        return f"{self.name}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class HashRun:
    """What a hashing pass read, and how fast."""

    digests: dict[str, str]
    bytes: int
    seconds: float
    threads: int

    def summary(self) -> str:
        gbps = self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")
        return (f"{len(self.digests)} files, {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"({gbps:.2f} GB/s, {self.threads} threads)")


# --- files and hashes ----------------------------------------------------------------------


def checkpoint_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` by its ``/``-separated relative name, except ``.cache/``.

    Symbolic links are followed only when they point to a regular file (what a
    Hugging Face cache snapshot holds); anything else is refused.
    """
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint directory, found "
                              f"{'a file' if root.exists() else 'nothing'}")
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d != HF_STATE_DIR]
        dirnames.sort()
        for fn in sorted(filenames):
            p = here / fn
            if not p.is_file():
                raise CheckpointError(f"{p}: expected a regular file, found "
                                      f"{'a dangling link' if p.is_symlink() else 'another kind'}")
            out[p.relative_to(root).as_posix()] = p
    return out


def sha256_of(path: Path, buffer: bytearray | None = None,
              on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of ``path``, streamed through ``buffer`` (16 MiB, reused)."""
    buf = buffer if buffer is not None else bytearray(BUFFER_BYTES)
    view = memoryview(buf)
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def hash_files(paths: dict[str, Path], threads: int | None = None,
               progress: bool = False) -> HashRun:
    """SHA-256 of every file, several at once (largest first), with the wall time."""
    threads = threads or default_threads()
    sizes = {n: p.stat().st_size for n, p in paths.items()}
    total = sum(sizes.values())
    done = [0]
    last = [0.0]
    t0 = time.monotonic()

    def tick(n: int) -> None:
        done[0] += n  # a race only blurs the progress figure
        now = time.monotonic()
        if progress and now - last[0] > 2:
            last[0] = now
            rate = done[0] / 1e9 / max(now - t0, 1e-9)
            print(f"\rhashing: {done[0] / 1e9:.1f} / {total / 1e9:.1f} GB, {rate:.2f} GB/s",
                  end="", file=sys.stderr, flush=True)

    def one(name: str) -> tuple[str, str]:
        try:
            return name, sha256_of(paths[name], bytearray(BUFFER_BYTES), tick)
        except OSError as e:
            raise CheckpointError(f"{paths[name]}: expected a readable file, found "
                                  f"{e.strerror or e}") from None

    order = sorted(paths, key=lambda n: -sizes[n])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = dict(pool.map(one, order))
    seconds = time.monotonic() - t0
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    return HashRun({n: digests[n] for n in sorted(digests)}, total, seconds, threads)


# --- what a Hugging Face download recorded -------------------------------------------------


@dataclass(frozen=True)
class HubRecord:
    commit: str
    etag: str

    @property
    def sha256(self) -> str | None:
        """The Hub's SHA-256: the ETag of an LFS/Xet file (a small file's ETag is a git id)."""
        return self.etag if _HEX64.fullmatch(self.etag) else None


def hub_records(root: Path, names: Iterable[str]) -> dict[str, HubRecord]:
    """``hf download --local-dir``'s per-file metadata (commit, ETag), where it exists."""
    out = {}
    for name in names:
        meta = root / HF_METADATA_DIR / f"{name}.metadata"
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) >= 2 and _HEX40.fullmatch(lines[0].strip()):
            out[name] = HubRecord(lines[0].strip(), lines[1].strip().strip('"'))
    return out


# --- making a lock -------------------------------------------------------------------------


def make_lock(root: Path, repo: str, revision: str | None, threads: int | None = None,
              progress: bool = False) -> tuple[Lock, HashRun, int]:
    """Hash ``root`` into a lock: (lock, the hashing run, files equal to the Hub's SHA-256).

    Raises CheckpointError (one line) for a directory mixed from two revisions,
    a revision that differs from the one the download recorded, and a file
    whose SHA-256 differs from the Hub's.
    """
    files = checkpoint_files(root)
    if not files:
        raise CheckpointError(f"{root}: expected checkpoint files, found none")
    records = hub_records(root, files)
    commits = sorted({r.commit for r in records.values()})
    if len(commits) > 1:
        by = {c: sorted(n for n, r in records.items() if r.commit == c)[0] for c in commits}
        raise CheckpointError(f"{root}: expected files of one revision, found {len(commits)} "
                              "(" + ", ".join(f"{n} from {c}" for c, n in by.items()) + ")")
    if commits and revision is not None and _HEX40.fullmatch(revision) \
            and commits[0] != revision:
        raise CheckpointError(f"{root}: expected revision {revision}, found files downloaded "
                              f"from {commits[0]} ({HF_METADATA_DIR}/)")
    if commits:  # a branch or tag given (or none): lock the commit the download resolved
        revision = commits[0]
    elif revision is None:
        raise CheckpointError(f"{root}: expected --revision (no {HF_METADATA_DIR}/ "
                              "records the commit this download came from)")
    run = hash_files(files, threads, progress)
    bad = [Mismatch(n, f"sha256 {r.sha256} (the Hub's, recorded by the download)",
                    run.digests[n])
           for n, r in sorted(records.items()) if r.sha256 and r.sha256 != run.digests[n]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(bad[0].line() + more)
    matched = sum(1 for n, r in records.items() if r.sha256 == run.digests[n])
    locked = tuple(LockedFile(n, files[n].stat().st_size, run.digests[n]) for n in sorted(files))
    return Lock(repo, revision, locked), run, matched


def write_lock(lock: Lock, out: Path) -> None:
    """Write ``out`` through a temporary name in its directory, renamed when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(lock.as_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading and checking a lock -----------------------------------------------------------


def is_lock_path(path: Path) -> bool:
    """``verify --against X``: a file is a lock, a directory an ORIGINAL checkpoint."""
    return path.is_file()


def _bad(path: Path, field: str, expected: str, found: object) -> CheckpointError:
    text = json.dumps(found) if not isinstance(found, str) else repr(found)
    return CheckpointError(f"{path}: {field}: expected {expected}, found {text[:80]}")


def read_lock(path: Path) -> Lock:
    """Parse and validate a lock file; CheckpointError names the field that is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: expected a readable lock file, found "
                              f"{e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: expected a JSON lock, found invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad(path, "lock", "a JSON object", data)
    if data.get("format") != LOCK_FORMAT:
        raise _bad(path, "format", str(LOCK_FORMAT), data.get("format"))
    for key in ("repo", "revision"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _bad(path, key, "a non-empty string", data.get(key))
    entries = data.get("files")
    if not isinstance(entries, list) or not entries:
        raise _bad(path, "files", "a non-empty list", entries)
    files, seen = [], set()
    for i, e in enumerate(entries):
        where = f"files[{i}]"
        if not isinstance(e, dict):
            raise _bad(path, where, "an object with name, size, sha256", e)
        name, size, sha = e.get("name"), e.get("size"), e.get("sha256")
        if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name
                or any(part in ("", ".", "..") for part in name.split("/"))):
            raise _bad(path, f"{where}.name", "a relative file name inside the checkpoint", name)
        if name in seen:
            raise _bad(path, f"{where}.name", "each file once", name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _bad(path, f"{where}.size", "a byte count", size)
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise _bad(path, f"{where}.sha256", "64 lowercase hex digits", sha)
        seen.add(name)
        files.append(LockedFile(name, size, sha))
    lock = Lock(data["repo"], data["revision"], tuple(files), path)
    total = data.get("total_size")
    if total is not None and total != lock.total_size:
        raise _bad(path, "total_size", f"the sum of the file sizes ({lock.total_size})", total)
    return lock


def quick_check(root: Path, lock: Lock) -> list[Mismatch]:
    """Names and sizes against the lock, reading no file's bytes (seconds for 900 GB)."""
    files = checkpoint_files(root)
    where = f"({lock.path or 'lock'})"
    out = []
    for f in lock.files:
        p = files.get(f.name)
        if p is None:
            out.append(Mismatch(f.name, f"a file of {f.size} bytes {where}", "absent"))
        elif (size := p.stat().st_size) != f.size:
            out.append(Mismatch(f.name, f"{f.size} bytes {where}", f"{size} bytes"))
    locked = {f.name for f in lock.files}
    out += [Mismatch(n, f"only the files the lock lists {where}", "a file it does not list")
            for n in sorted(files) if n not in locked]
    return out


def full_check(root: Path, lock: Lock, threads: int | None = None,
               progress: bool = False) -> tuple[list[Mismatch], HashRun | None]:
    """Names, sizes, then the SHA-256 of every file the sizes did not already condemn."""
    out = quick_check(root, lock)
    files = checkpoint_files(root)
    condemned = {m.name for m in out}
    todo = {f.name: files[f.name] for f in lock.files if f.name not in condemned}
    if not todo:
        return out, None
    run = hash_files(todo, threads, progress)
    where = f"({lock.path or 'lock'})"
    out += [Mismatch(f.name, f"sha256 {f.sha256} {where}", run.digests[f.name])
            for f in lock.files if f.name in run.digests and run.digests[f.name] != f.sha256]
    return sorted(out, key=lambda m: m.name), run


def describe(lock: Lock) -> str:
    return (f"{lock.repo}@{lock.revision}, {len(lock.files)} files, "
            f"{lock.total_size / 1e9:.2f} GB")


def check_against_lock(root: Path, lock_path: Path, threads: int | None = None,
                       progress: bool = False, out=None) -> int:
    """``verify ROOT --against LOCK``'s lock part: 0 when every byte matches, 1 otherwise.

    Each mismatch is one line on stderr (file, expected, found); the summary with
    the time and GB/s goes to ``out`` (stdout by default). Unusable input raises
    CheckpointError.
    """
    out = out or sys.stdout
    lock = read_lock(lock_path)
    mismatches, run = full_check(root, lock, threads, progress)
    for m in mismatches:
        print(f"error: {m.line()}", file=sys.stderr)
    speed = f"; hashed {run.summary()}" if run else ""
    if mismatches:
        print(f"lock: {len(mismatches)} of {len(lock.files)} files differ from {lock_path} "
              f"({describe(lock)}){speed}", file=out)
        return 1
    print(f"lock: every file matches {lock_path} ({describe(lock)}){speed}", file=out)
    return 0


# --- CLI -----------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lock", help="write a per-file SHA-256 lock of a downloaded checkpoint",
        description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, metavar="MODEL_DIR")
    p.add_argument("--repo", required=True,
                   help="Hugging Face repo, e.g. nvidia/DeepSeek-V4-Pro-NVFP4")
    p.add_argument("--revision", default=None,
                   help="the commit it was downloaded at (default: what hf download recorded)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="LOCK",
                   help="where to write the lock (JSON), e.g. locks/NAME.json")
    p.add_argument("--threads", type=int, default=None,
                   help=f"files hashed at once (default {default_threads()})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        return fail(f"--threads: expected at least 1, found {args.threads}")
    try:
        lock, hashed, matched = make_lock(args.path, args.repo, args.revision, args.threads,
                                          progress=sys.stderr.isatty())
        write_lock(lock, args.output)
    except CheckpointError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{args.output}: expected a writable lock file, found {e.strerror or e}")
    hub = (f"; {matched} files equal to the Hub's SHA-256 recorded by the download"
           if matched else "")
    pinned = "" if _HEX40.fullmatch(lock.revision) else (
        f"; note: revision {lock.revision!r} is not a commit hash, a branch or tag can move")
    print(f"lock: {args.output}: {describe(lock)}; hashed {hashed.summary()}{hub}{pinned}")
    return 0
