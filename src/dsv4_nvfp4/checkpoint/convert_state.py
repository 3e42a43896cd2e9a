"""What DST already holds of a conversion: its lock, its resume records, its sources' hashes.

Why a module of its own: ``convert`` is resumable, and deciding what a rerun may
keep is its own small protocol, apart from planning and from writing. One
conversion writes a destination at a time (``DST/.dsv4-convert.lock``, flock).
While it runs, ``DST/.dsv4-convert/`` holds ``plan.json`` (the plan's
fingerprint) and one ``done-NNNNN.json`` per finished output shard (its size,
sha256 and the sha256 of the source bytes it was made from); ``manifest.json``,
written last, holds the same records for a complete conversion. A rerun of the
same plan re-hashes the sources of the finished shards and keeps only those
whose sources are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from .convert_plan import MANIFEST, Plan
from .errors import CheckpointError
from .reader import TensorReader
from .writer import write_text_atomic

STATE_DIR = ".dsv4-convert"
LOCK_NAME = ".dsv4-convert.lock"


def check_dst(src: Path, dst: Path) -> None:
    """DST must neither be SRC, nor lie inside it, nor contain it."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise CheckpointError(f"{dst}: expected a directory outside SRC ({src}) and not "
                              "containing it, found an overlap")


def load_json(p: Path) -> dict | None:
    """A JSON file's content; None if it is missing or not JSON."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class DestinationLock:
    """``flock`` on ``DST/.dsv4-convert.lock``: one conversion per destination.

    Held for the whole run and released (the file removed) at the end; a second
    ``convert`` into the same DST stops at once with one line. A holder that
    removes the file while another process waits on the old inode is caught by
    comparing inodes after locking. DST is created here if needed, and removed
    again if the run leaves nothing in it.
    """

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.path = dst / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> DestinationLock:
        if self.dst.exists() and not self.dst.is_dir():
            raise CheckpointError(f"{self.dst}: expected a directory, found a file")
        self.created = not self.dst.exists()
        self.dst.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._tidy()
                raise CheckpointError(f"{self.dst}: expected no other conversion writing to "
                                      f"it, found another conversion holding {LOCK_NAME} "
                                      "(wait for it to finish, or stop it)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # the previous holder removed the file we locked: again
        raise CheckpointError(f"{self.dst}: expected to take {LOCK_NAME}, found it replaced "
                              "10 times in a row")

    def _tidy(self) -> None:
        if self.created:
            with contextlib.suppress(OSError):
                self.dst.rmdir()  # only if the run left nothing

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        self._tidy()


def prepare_dst(p: Plan, dst: Path) -> tuple[str, dict[int, dict], dict]:
    """('complete', shard records, manifest) if DST holds this conversion's plan;
    ('resume', records, {}) for an interrupted run of it; ('fresh', {}, {}) otherwise."""
    state = dst / STATE_DIR
    if any(f.name != LOCK_NAME for f in dst.iterdir()):
        man = load_json(dst / MANIFEST)
        if isinstance(man, dict) and man.get("fingerprint") == p.fingerprint:
            shutil.rmtree(state, ignore_errors=True)  # killed after the manifest, before cleanup
            shards = man.get("shards")
            recs = dict(enumerate(shards)) if isinstance(shards, list) and \
                len(shards) == len(p.files) else {}
            return "complete", recs, man
        st = load_json(state / "plan.json")
        if isinstance(st, dict) and st.get("fingerprint") == p.fingerprint:
            recs = {}
            for i in range(len(p.files)):
                rec = load_json(state / f"done-{i:05d}.json")
                if isinstance(rec, dict):
                    recs[i] = rec
            return "resume", recs, {}
        raise CheckpointError(f"{dst}: expected an empty directory or an interrupted run of this "
                              "same conversion, found other files")
    _write_plan_marker(state, p.fingerprint)
    return "fresh", {}, {}


def _write_plan_marker(state: Path, fingerprint: str) -> None:
    state.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state / "plan.json", json.dumps({"fingerprint": fingerprint}) + "\n")


def record_done(dst: Path, i: int, rec: dict) -> None:
    """Record output shard ``i`` as finished (its file is in place under its final name)."""
    write_text_atomic(dst / STATE_DIR / f"done-{i:05d}.json", json.dumps(rec) + "\n")


def reopen_complete(p: Plan, dst: Path, records: dict[int, dict]) -> None:
    """Make a complete conversion whose SRC changed since an interrupted one that keeps
    ``records`` (the shards whose sources are unchanged): the state first, so that a kill
    in between leaves it "complete", then the manifest goes."""
    _write_plan_marker(dst / STATE_DIR, p.fingerprint)
    for i, rec in records.items():
        record_done(dst, i, rec)
    (dst / MANIFEST).unlink()


# The source fingerprint of an output shard: sha256 over the sha256 of each unit's input
# bytes (in plan order). Computed while streaming; recomputed from SRC on a rerun.
CHECK_PIECE_BYTES = 1 << 24


def source_fingerprint(unit_digests: list[str]) -> str:
    """A shard's source fingerprint from its units' input digests (in plan order)."""
    return hashlib.sha256("".join(unit_digests).encode()).hexdigest()


def _source_digest(p: Plan, i: int, reader: TensorReader, buf: memoryview, bar=None) -> str:
    """The source fingerprint of shard ``i``, read from SRC now (no output written)."""
    out = []
    for u in p.shards[i]:
        h = hashlib.sha256()
        for t in u.inputs:
            for start in range(0, t.nbytes, len(buf)):
                view = buf[:min(len(buf), t.nbytes - start)]
                reader.read_range(t, start, view)
                h.update(view)
        out.append(h.hexdigest())
        if bar is not None:
            bar.update(u.in_bytes)
    return source_fingerprint(out)


def unchanged_shards(p: Plan, dst: Path, claimed: dict[int, dict], progress: bool
                     ) -> dict[int, dict]:
    """The claimed finished shards whose file is there and whose sources hash as recorded."""
    keep: dict[int, dict] = {}
    candidates = {i: rec for i, rec in claimed.items() if isinstance(rec, dict)
                  and (dst / p.files[i]).is_file()
                  and (dst / p.files[i]).stat().st_size == rec.get("size")
                  and isinstance(rec.get("source_sha256"), str)}
    bar = None
    if progress and candidates:
        from tqdm import tqdm

        bar = tqdm(total=sum(u.in_bytes for i in candidates for u in p.shards[i]), unit="B",
                   unit_scale=True, desc="check source", file=sys.stderr)
    buf = memoryview(bytearray(CHECK_PIECE_BYTES))
    with TensorReader() as r:
        for i, rec in sorted(candidates.items()):
            if _source_digest(p, i, r, buf, bar) == rec["source_sha256"]:
                keep[i] = rec
    if bar is not None:
        bar.close()
    return keep
