"""Write one safetensors shard tensor by tensor, under a temporary name, renamed when complete.

The header (names, dtypes, shapes, offsets) is known before any data exists —
the converter plans every output shape from the input headers — so the header
is written first and each tensor's bytes are appended as soon as they are
computed. Memory stays at one tensor, and the byte stream is a pure function of
the plan and the tensors: a rerun writes an identical file.

The file becomes visible under its final name only after every byte is written
and fsynced (``os.replace`` of ``.<name>.partial``), so a killed run never
leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import CheckpointError
from .reader import expected_nbytes, st_dtype


def header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
                 ) -> bytes:
    """The 8-byte length + JSON header, padded with spaces to an 8-byte boundary."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape in entries:
        n = expected_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Streams the tensors of one planned shard, in plan order, into ``.<name>.partial``.

    ``write`` checks each tensor against the plan (name, dtype, shape); a
    mismatch is our bug and raises. The sha256 is computed on the fly in a
    helper thread (hashlib releases the GIL, and at ~1 GB/s it is the slowest
    step of a copy): ``write`` returns that tensor's hash future, and a buffer
    passed to ``write`` must not be reused before its future is done.

    A tensor can also be streamed in pieces: :meth:`begin` (checked against
    the plan like ``write``), then :meth:`piece` until its bytes are complete —
    the converter's copy path, so that bytes are read, written and hashed while
    they are still in the CPU cache.

    ``finish`` flushes and returns the sha256; ``commit`` then fsyncs and
    renames to the final name — separate so that a caller can overlap the
    fsync of one shard with writing the next. ``close`` does both.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, fsync: bool = True) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.entries = entries
        self.fsync = fsync
        self._next = 0
        self._open = 0  # bytes still owed to the tensor being streamed by piece()
        self._sha = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._last: Future | None = None
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._emit(header_bytes(entries, metadata or {}))

    def _emit(self, data: bytes | memoryview) -> Future:
        self._f.write(data)
        self._last = self._hasher.submit(self._sha.update, data)
        return self._last

    def drain(self) -> None:
        """Wait until every byte written so far is hashed."""
        if self._last is not None:
            self._last.result()

    def _check_next(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._open:
            raise RuntimeError(f"{self.path.name}: {name} begun with {self._open} bytes of "
                               f"{self.entries[self._next - 1][0]} still owed")
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path.name}: {name} is beyond the planned tensors")
        want_name, want_dtype, want_shape = self.entries[self._next]
        if name != want_name or dtype != want_dtype or tuple(shape) != want_shape:
            raise RuntimeError(f"{self.path.name}: planned {want_name} {want_dtype} "
                               f"{list(want_shape)}, got {name} {dtype} {list(shape)}")
        self._next += 1

    def write(self, name: str, t: torch.Tensor) -> Future:
        self._check_next(name, st_dtype(t), tuple(t.shape))
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        return self._emit(memoryview(data))

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        """Start streaming the next planned tensor; returns the bytes :meth:`piece` owes."""
        self._check_next(name, dtype, shape)
        self._open = expected_nbytes(dtype, shape)
        return self._open

    def piece(self, data: memoryview, also=None) -> Future:
        """The next bytes of the tensor begun; ``data`` must not change before the future.

        ``also``: a second hash object (``hashlib``) fed the same bytes on the hashing
        thread, after the shard's own (the converter's fingerprint of its inputs).
        """
        if len(data) > self._open:
            raise RuntimeError(f"{self.path.name}: {len(data)} bytes given, {self._open} owed "
                               f"to {self.entries[self._next - 1][0]}")
        self._open -= len(data)
        fut = self._emit(data)
        if also is not None:
            fut = self._last = self._hasher.submit(also.update, data)
        return fut

    def finish(self) -> str:
        """Every planned tensor written: flush and return the sha256 (still the temp name)."""
        if self._next != len(self.entries) or self._open:
            self.abort()
            raise RuntimeError(f"{self.path.name}: wrote {self._next} of "
                               f"{len(self.entries)} planned tensors")
        self._f.flush()
        self.drain()
        self._hasher.shutdown()
        return self._sha.hexdigest()

    def commit(self) -> None:
        """fsync (unless disabled) and rename to the final name; on failure no temporary
        file is left."""
        try:
            if self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            if not self._f.closed:
                self._f.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def close(self) -> str:
        sha = self.finish()
        self.commit()
        return sha

    def abort(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                = None, fsync: bool = False) -> str:
    """Write a whole in-memory dict as one shard (small checkpoints: ``tiny``)."""
    entries = [(k, st_dtype(v), tuple(v.shape)) for k, v in tensors.items()]
    w = ShardWriter(path, entries, metadata, fsync=fsync)
    try:
        for k, v in tensors.items():
            w.write(k, v)
    except BaseException:
        w.abort()
        raise
    return w.close()


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file, written to a hidden temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: expected a writable location, found {e.strerror}") from None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
