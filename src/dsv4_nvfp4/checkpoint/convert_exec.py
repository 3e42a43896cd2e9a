"""Run a conversion plan into DST: the threaded, streaming, resumable executor and its report.

Why a module of its own: this is the part that touches DST and the part that has
to be fast. Per output shard it streams module by module — pure copies piece by
piece through a ring of small buffers, conversions computed ahead on a helper
thread — into ``.NAME.partial``, then fsyncs, renames and records the shard as
done (:mod:`.convert_state`) on a committer thread. When every shard is in place
it writes the index, config, side files, ``conversion_report.json`` (the error of
every requantized tensor) and, last, ``manifest.json``. What to write comes from
:mod:`.convert_plan`; this module decides nothing about it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dsv4_nvfp4 import __version__
from dsv4_nvfp4.formats import ConversionError

from .convert_plan import MANIFEST, REPORT, Errors, Outputs, Plan, Unit, json_with_auto_map
from .convert_state import (
    STATE_DIR,
    DestinationLock,
    check_dst,
    prepare_dst,
    record_done,
    reopen_complete,
    source_fingerprint,
    unchanged_shards,
)
from .reader import INDEX_NAME, TensorReader
from .writer import ShardWriter, sha256_file, write_text_atomic

# Conversions are computed ahead of the writer by a helper thread (torch releases the GIL),
# holding at most this many bytes of finished outputs.
LOOKAHEAD_BYTES = 1 << 30
# Copies stream through a ring of small buffers: each piece is read, written and hashed
# (sha256 on the writer's helper thread) while it is still in the CPU cache, instead of
# three passes over a whole tensor in RAM. Measured on a 2-core CPU runner, 15 GB C -> B
# in process: 1 MB x 8 19-20 s, 4 MB x 4 21 s, 16 MB x 4 24-25 s, 256 kB x 16 21-22 s.
PIECE_BYTES = 1 << 20
RING = 8


class _Ring:
    """Reusable copy buffers; a buffer is handed out again only once its hash is done."""

    def __init__(self) -> None:
        self.bufs = [memoryview(bytearray(PIECE_BYTES)) for _ in range(RING)]
        self.pending: list[Future | None] = [None] * RING
        self.k = 0

    def next(self, n: int) -> tuple[int, memoryview]:
        k = self.k
        self.k = (k + 1) % RING
        f = self.pending[k]
        if f is not None:
            f.result()
        return k, self.bufs[k][:n]


def _stream_copy(u: Unit, reader: TensorReader, w: ShardWriter, ring: _Ring, src_hash
                 ) -> None:
    """A copy unit, piece by piece: its outputs are its inputs' bytes, renamed; ``src_hash``
    is fed the same bytes (on the writer's hashing thread)."""
    for t, (name, dtype, shape) in zip(u.inputs, u.outputs, strict=True):
        w.begin(name, dtype, shape)
        for start in range(0, t.nbytes, PIECE_BYTES):
            k, view = ring.next(min(PIECE_BYTES, t.nbytes - start))
            reader.read_range(t, start, view)
            ring.pending[k] = w.piece(view, also=src_hash)


def dense_threads(default: int) -> int:
    """torch intra-op threads for the dense conversions while ``execute`` runs.

    Two cores are taken already: the main thread (pread/write) and the sha256
    thread. Intra-op workers beyond the rest spin-wait against them — on a
    2-core CPU runner two threads cost 13-38 s of user time per 15 GB where one
    costs 13 s, for the same wall time at best.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(default, cores - 2))


def _compute(u: Unit, local: threading.local) -> tuple[Outputs, Errors, int, str]:
    """Run a conversion unit; also returns the sha256 of the input bytes it read."""
    if not hasattr(local, "reader"):
        local.reader = TensorReader()
    h = hashlib.sha256()
    x = {t.name: local.reader.read(t, also=h) for t in u.inputs}
    return (*u.fn(x), h.hexdigest())


def _run_shard(p: Plan, i: int, dst: Path, reader: TensorReader, bar, fsync: bool,
               pool: ThreadPoolExecutor, local: threading.local) -> tuple[ShardWriter, dict]:
    """Write shard ``i`` under its temporary name; the caller commits it."""
    units = p.shards[i]
    entries = [o for u in units for o in u.outputs]
    w = ShardWriter(dst / p.files[i], entries, {"format": "pt"}, fsync=fsync)
    errors: dict[str, dict] = {}
    lossy = 0
    ahead = [k for k, u in enumerate(units) if not u.stream]
    futures: dict[int, Future] = {}
    held = 0  # output bytes of conversions submitted and not yet written
    ring = _Ring()
    digests: list = []  # per unit: the hex digest, or the hash object the writer thread feeds
    try:
        for k, u in enumerate(units):
            while ahead and (not futures or held + units[ahead[0]].out_bytes <=
                             LOOKAHEAD_BYTES):
                j = ahead.pop(0)
                held += units[j].out_bytes
                futures[j] = pool.submit(_compute, units[j], local)
            if u.stream:
                h = hashlib.sha256()
                _stream_copy(u, reader, w, ring, h)
                digests.append(h)
            else:
                out, errs, lz, dig = futures.pop(k).result()
                digests.append(dig)
                held -= u.out_bytes
                for name, _, _ in u.outputs:
                    w.write(name, out[name])
                errors.update({n: _err_dict(e) for n, e in errs})
                lossy += lz
                del out
            if bar is not None:
                bar.update(u.in_bytes)
        sha = w.finish()
    except BaseException:
        for f in futures.values():
            f.cancel()
        w.abort()
        raise
    size = w.tmp.stat().st_size
    src = source_fingerprint([d if isinstance(d, str) else d.hexdigest() for d in digests])
    return w, {"file": p.files[i], "size": size, "sha256": sha, "source_sha256": src,
               "errors": errors, "lossy": lossy}


def _commit(w: ShardWriter, dst: Path, i: int, rec: dict) -> None:
    """fsync + rename the shard, then record it as done (in the background)."""
    w.commit()
    record_done(dst, i, rec)


def _copy_side_files(p: Plan, dst: Path) -> None:
    """SRC's other files (tokenizer, generation config, ...), ``auto_map`` removed from JSON."""
    for name in p.side_files:
        f = p.src.root / name
        stripped = json_with_auto_map(f)
        if stripped is not None:
            stripped.pop("auto_map")
            write_text_atomic(dst / name, json.dumps(stripped, indent=2) + "\n")
            continue
        tmp = dst / f".{name}.partial"
        try:
            shutil.copyfile(f, tmp)
            tmp.replace(dst / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def execute(p: Plan, dst: Path, progress: bool = False, fsync: bool = True) -> str:
    """Run (or resume) the plan into ``dst``. Returns 'done' (nothing to do) or 'converted'."""
    check_dst(p.src.root, dst)
    with DestinationLock(dst):
        return _execute_locked(p, dst, progress, fsync)


def _execute_locked(p: Plan, dst: Path, progress: bool, fsync: bool) -> str:
    mode, claimed, manifest = prepare_dst(p, dst)
    records = unchanged_shards(p, dst, claimed, progress)
    if mode == "complete":
        if len(records) == len(p.files) and manifest.get("side_sha256") == p.side_files:
            return "done"
        reopen_complete(p, dst, records)  # SRC changed since: redo the shards it touched
    for stale in dst.glob(".*.partial"):
        stale.unlink()
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(u.in_bytes for u in p.units)
        done_bytes = sum(u.in_bytes for i in records for u in p.shards[i])
        bar = tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc="convert",
                   file=sys.stderr)
    local = threading.local()
    commits: list[Future] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(dense_threads(threads))
    with TensorReader() as r, ThreadPoolExecutor(1, thread_name_prefix="convert") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
        try:
            for i in range(len(p.files)):
                if i in records:
                    continue
                w, rec = _run_shard(p, i, dst, r, bar, fsync, pool, local)
                commits.append(committer.submit(_commit, w, dst, i, rec))
                records[i] = rec
        finally:
            torch.set_num_threads(threads)
            for c in commits:
                c.result()
    if bar is not None:
        bar.close()
    _finish(p, dst, records)
    return "converted"


def _finish(p: Plan, dst: Path, records: dict[int, dict]) -> None:
    """Index, config, side files and report; the manifest last (its presence: complete)."""
    weight_map = {name: p.files[i] for i, g in enumerate(p.shards) for u in g
                  for name, _, _ in u.outputs}
    total = sum(rec["size"] for rec in records.values())
    write_text_atomic(dst / INDEX_NAME, json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for name, content in p.side.items():
        write_text_atomic(dst / name, json.dumps(content, indent=2) + "\n")
    write_text_atomic(dst / "config.json", json.dumps(p.config, indent=2) + "\n")
    _copy_side_files(p, dst)
    errors: dict[str, dict] = {}
    for i in sorted(records):
        errors.update(records[i]["errors"])
    worst = max(errors.items(), key=lambda kv: _badness(kv[1]), default=None)
    dropped = [f"dropped from SRC: {d}" for d in p.dropped]
    report = {"source_layout": p.src_layout.value, "target": p.target.value,
              "dense": p.dense.value, "warnings": p.warnings + dropped,
              "dropped": p.dropped,
              "lossy_mxfp4_blocks": sum(r["lossy"] for r in records.values()),
              "worst_tensor": worst[0] if worst else None,
              "tensors": dict(sorted(errors.items()))}
    write_text_atomic(dst / REPORT, json.dumps(report, indent=2) + "\n")
    files = sorted(f.name for f in dst.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.name != MANIFEST)
    shas = {i_rec["file"]: i_rec["sha256"] for i_rec in records.values()}
    manifest = {"fingerprint": p.fingerprint, "tool": f"dsv4-nvfp4 {__version__}",
                "files": {f: shas.get(f) or sha256_file(dst / f) for f in files},
                "shards": [records[i] for i in range(len(p.files))],
                "side_sha256": p.side_files}
    write_text_atomic(dst / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dst / STATE_DIR, ignore_errors=True)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _err_dict(e: ConversionError) -> dict:
    """The report's entry; an undefined relative error (all-zero reference) is null, not 0."""
    return {"max_abs": _finite_or_none(e.max_abs), "max_rel": _finite_or_none(e.max_rel),
            "rel_l2": _finite_or_none(e.rel_l2)}


def _badness(e: dict) -> float:
    """Sort key of a report entry: an undefined error ranks worst."""
    v = e.get("max_rel")
    return math.inf if v is None else v
