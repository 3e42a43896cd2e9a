"""Read a safetensors checkpoint directory: index, shard headers, one tensor at a time.

Why our own reader rather than ``safe_open``: the linter must keep going past a
truncated or garbled shard and say exactly what is wrong with it (header length,
offsets, file size), and the converter must read tensor by tensor with
``pread`` into a fresh buffer so that neither an mmap's resident pages nor a
whole shard ever count against its memory. Headers are parsed without torch
touching the data, so ``inspect`` of a 900 GB checkpoint reads kilobytes.

File format (huggingface/safetensors): 8-byte little-endian header length
``n``, ``n`` bytes of JSON ``{name: {dtype, shape, data_offsets: [b, e]}, ...,
"__metadata__": {...}}``, then the data; offsets are relative to the data start.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .findings import Finding

# safetensors dtype string -> (torch dtype, bits per stored element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F32": (torch.float32, 32),
    "F64": (torch.float64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    # F4: the header shape counts FP4 values, two per byte (safetensors#839).
    "F4": (getattr(torch, "float4_e2m1fn_x2", None), 4),
}
TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items() if v[0] is not None and k != "F4"}

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def st_dtype(t: torch.Tensor) -> str:
    """The safetensors dtype string of a torch tensor."""
    try:
        return TORCH_TO_ST[t.dtype]
    except KeyError:
        raise CheckpointError(f"tensor dtype {t.dtype} has no safetensors name") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range ``[begin, end)`` in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


@dataclass
class ShardHeader:
    """The parsed header of one shard (tensors in file order)."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict
    data_start: int
    file_size: int


def _is_count(v: object) -> bool:
    """A JSON integer >= 0 (not a bool, not a float)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _short(v: object, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def shard_name_problem(name: object) -> str | None:
    """Why an index entry is not a shard file name inside the checkpoint (None: it is).

    Only a plain file name is accepted: no directory part, no ``..``, not absolute — so an
    index can never make a tool read (or a converter copy) a file outside the checkpoint.
    A shard that is a symlink (the Hugging Face cache's layout) is fine: the name is checked,
    not where it resolves.
    """
    if not isinstance(name, str):
        return f"a {type(name).__name__} ({_short(name)})"
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"{name!r}, a path outside the checkpoint directory or no name" if name else \
            "an empty name"
    return None


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = DTYPES[dtype][1]
    return (math.prod(shape) * bits + 7) // 8


def read_header(path: Path) -> ShardHeader:
    """Parse and validate one shard's header; :class:`CheckpointError` says what is wrong."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: expected an 8-byte header length, found a "
                                      f"{size}-byte file (truncated or not safetensors)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{name}: expected a header of at most "
                                      f"{min(size - 8, MAX_HEADER_BYTES)} bytes, found a header "
                                      f"length of {n} (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: expected a readable file, found {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: expected a JSON header, found invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: expected a JSON object header, found "
                              f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{name}: __metadata__: expected an object of strings, found "
                              f"{_short(metadata)}")
    data_start = 8 + n
    data_size = size - data_start
    entries: list[TensorInfo] = []
    for tname, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{name}: {tname}: expected dtype, shape and data_offsets, "
                                  f"found {_short(e)}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{name}: {tname}: expected a safetensors dtype, found "
                                  f"{_short(dtype)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{name}: {tname}: shape: expected a list of non-negative "
                                  f"integers, found {_short(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{name}: {tname}: data_offsets: expected two non-negative "
                                  f"integers [begin, end], found {_short(offsets)}")
        shape = tuple(shape)
        b, end = offsets
        want = expected_nbytes(dtype, shape)
        if end - b != want or b < 0:
            raise CheckpointError(f"{name}: {tname}: expected {want} bytes for {dtype} "
                                  f"{list(shape)}, found offsets [{b}, {end}]")
        entries.append(TensorInfo(tname, dtype, shape, path, data_start + b, data_start + end))
    entries.sort(key=lambda t: t.begin)
    pos = data_start
    for t in entries:
        if t.begin != pos:
            raise CheckpointError(f"{name}: {t.name}: expected data at byte {pos - data_start}, "
                                  f"found {t.begin - data_start} (overlapping or gapped offsets)")
        pos = t.end
    if pos - data_start != data_size:
        what = "truncated" if pos - data_start > data_size else "trailing bytes"
        raise CheckpointError(f"{name}: expected {pos - data_start} bytes of tensor data, "
                              f"found {data_size} ({what})")
    return ShardHeader(path, {t.name: t for t in entries}, metadata, data_start, size)


@dataclass
class Checkpoint:
    """A checkpoint directory: config, shard headers, and where every tensor lives.

    ``problems`` holds what is wrong with the files themselves (unreadable or
    truncated shards, index entries that disagree with the shards); the tensors
    of unreadable shards are absent from ``tensors``.
    """

    root: Path
    config: dict
    shards: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]
    index: dict | None
    problems: list[Finding] = field(default_factory=list)
    extra_json: dict[str, dict] = field(default_factory=dict)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def json_file(self, name: str) -> dict | None:
        """A JSON side file such as ``hf_quant_config.json`` (None when absent)."""
        if name not in self.extra_json:
            p = self.root / name
            if not p.is_file():
                return None
            try:
                content = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{name}: expected valid JSON, found {e}") from None
            if not isinstance(content, dict):
                raise CheckpointError(f"{name}: expected a JSON object, found "
                                      f"{type(content).__name__}")
            check_quant_section(content.get("quantization"), name, "quantization")
            self.extra_json[name] = content
        return self.extra_json[name]


# Lists of module names (fnmatch patterns) in a quantization config; each must be strings.
_NAME_LISTS = ("ignore", "exclude_modules", "ignored_layers", "modules_to_not_convert")


def check_quant_section(q: object, file: str, key: str) -> None:
    """The quantization section of config.json or hf_quant_config.json, typed as the tools
    read it: an object whose name lists are lists of strings (``ignore`` may be one string)
    and whose ``quantized_layers`` is an object or a list of strings."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise CheckpointError(f"{file}: {key}: expected an object, found {_short(q)}")
    for k in _NAME_LISTS:
        v = q.get(k)
        if v is None or isinstance(v, str):
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise CheckpointError(f"{file}: {key}.{k}: expected a list of module names "
                                  f"(strings), found {_short(v)}")
    ql = q.get("quantized_layers")
    if ql is not None and not isinstance(ql, dict) and not (
            isinstance(ql, list) and all(isinstance(x, str) for x in ql)):
        raise CheckpointError(f"{file}: {key}.quantized_layers: expected an object or a list "
                              f"of module names, found {_short(ql)}")


def load_config(root: Path) -> dict:
    p = root / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{root}: expected a checkpoint directory with config.json, "
                              f"found {'no such directory' if not root.is_dir() else 'none'}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config.json: expected valid JSON, found {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json: expected a JSON object, found "
                              f"{type(cfg).__name__}")
    check_quant_section(cfg.get("quantization_config"), "config.json", "quantization_config")
    return cfg


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read config, index and every shard header. Raises only when nothing is usable."""
    root = Path(path)
    config = load_config(root)
    problems: list[Finding] = []
    index = None
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise ValueError("no weight_map object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{INDEX_NAME}: expected JSON with a weight_map, found {e}"
                                  ) from None
        for tname, fname in index["weight_map"].items():
            why = shard_name_problem(fname)
            if why is not None:
                raise CheckpointError(f"{INDEX_NAME}: weight_map[{tname!r}]: expected the file "
                                      f"name of a shard in the checkpoint directory, found {why}")
        files = sorted(set(index["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: expected *.safetensors files, found none")
    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        p = root / fname
        if not p.is_file():
            problems.append(Finding("index.missing_file", fname, "", "a shard file named by "
                                    f"{INDEX_NAME}", "no such file"))
            continue
        try:
            sh = read_header(p)
        except CheckpointError as e:
            msg = str(e).removeprefix(f"{fname}: ")
            problems.append(Finding("shard.unreadable", fname, "", "a readable safetensors shard",
                                    msg))
            continue
        shards[fname] = sh
        for t in sh.tensors.values():
            if t.name in tensors:
                problems.append(Finding("index.duplicate", fname, t.name, "each tensor in one "
                                        "shard", f"also in {tensors[t.name].file.name}"))
                continue
            tensors[t.name] = t
    if index is not None:
        wm = index["weight_map"]
        for tname, fname in wm.items():
            t = tensors.get(tname)
            if t is None and fname in shards:
                problems.append(Finding("index.tensor_missing", fname, tname,
                                        f"the tensor {INDEX_NAME} places here", "absent"))
            elif t is not None and t.file.name != fname:
                problems.append(Finding("index.wrong_file", t.file.name, tname,
                                        f"in {fname} (per {INDEX_NAME})",
                                        f"in {t.file.name}"))
        for tname, t in tensors.items():
            if tname not in wm:
                problems.append(Finding("index.unlisted", t.file.name, tname,
                                        f"listed in {INDEX_NAME}", "not listed"))
        on_disk = {p.name for p in root.glob("*.safetensors")}
        for fname in sorted(on_disk - set(files)):
            problems.append(Finding("index.stray_file", fname, "", f"every shard named by "
                                    f"{INDEX_NAME}", "a shard the index does not name"))
    return Checkpoint(root, config, shards, tensors, index, problems)


class TensorReader:
    """Reads tensors with ``pread``; keeps one fd per shard open.

    :meth:`read` returns a tensor in a fresh buffer. :meth:`read_range` fills a
    caller's buffer with part of a tensor: first-touch page faults on fresh
    memory cost more than the read itself (1.3 vs 8 GB/s measured on the CI
    machine), so the converter's copy path streams through a few reused,
    cache-sized buffers.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def raw(self, info: TensorInfo, buf: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor (exactly ``info.nbytes`` long), in ``buf``
        if given."""
        if buf is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_range(info, 0, memoryview(buf.numpy()))
        return buf

    def read_range(self, info: TensorInfo, start: int, view: memoryview) -> None:
        """Fill ``view`` with the tensor's bytes from ``start`` (the converter's copy pieces)."""
        fd = self._fd(info.file)
        want = len(view)
        if start + want > info.nbytes:
            raise ValueError(f"{info.name}: bytes {start}..{start + want} beyond {info.nbytes}")
        done = 0
        while done < want:
            n = os.preadv(fd, [view[done:]], info.begin + start + done)
            if n <= 0:
                raise CheckpointError(f"{info.file.name}: {info.name}: expected {info.nbytes} "
                                      f"bytes, found end of file after {start + done} "
                                      "(truncated)")
            done += n

    def read(self, info: TensorInfo, also=None) -> torch.Tensor:
        """The tensor in its stored dtype and shape (F8_E8M0 as ``float8_e8m0fnu``);
        ``also``: a hash object (``hashlib``) to feed its bytes."""
        dt = DTYPES[info.dtype][0]
        if dt is None or info.dtype == "F4":
            raise CheckpointError(f"{info.file.name}: {info.name}: expected a dtype torch can "
                                  f"hold, found {info.dtype}")
        raw = self.raw(info)
        if also is not None:
            also.update(memoryview(raw.numpy()))
        return raw.view(dt).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
