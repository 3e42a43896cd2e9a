"""``dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4|bf16``: streaming, resumable conversion.

Directions:

* C → B (``--to nvidia-nvfp4``): routed experts byte-identical (gate/up/down →
  w1/w3/w2); dense linears requantized to FP8 128×128 with UE8M0 scales
  (``--dense fp8``) or dequantized to BF16 and listed in ``ignored_layers``
  (``--dense bf16``) — from NVFP4, or from BF16 where the export excluded
  them (``quantize --recipe experts``); ``o_a_proj`` (BF16 in C) → FP8 ``wo_a``;
  compressor and indexer projections → BF16; everything else renamed. ``--mtp-from NATIVE``
  grafts ``mtp.*`` byte-identical from a layout-A (or B) checkpoint; without it
  ``num_nextn_predict_layers`` is set to 0, loudly.
* A → B: the lossless MXFP4 → NVFP4 cast of the routed experts (w1 and w3 of
  an expert share ``weight_scale_2``), everything else byte-identical;
  ``input_scale`` taken from ``--input-scales-from`` a layout-B checkpoint.
* any → ``bf16``: every quantized tensor dequantized, DeepSeek names.

How it runs (DESIGN.md "A long job ..."): plan every output tensor from the
input headers; validate every input before writing anything — all shards
readable, the layout's structure, and every scale the conversion consumes
(each ``weight_scale_2`` / ``input_scale`` F32, finite and > 0; each block
scale it dequantizes: E4M3 non-zero, non-NaN, sign clear, UE8M0 without
0xFF); then take the destination's lock (``.dsv4-convert.lock``, flock: one
conversion per destination) and per output shard stream module by module —
read its tensors, convert, append — into ``.NAME.partial``, fsync, rename, and
record the shard as done with the sha256 of the source bytes it read.
A rerun after a kill re-hashes the sources of the finished shards, keeps those
whose sources are unchanged and redoes the rest, producing byte-identical
files; a rerun over a complete conversion does the same check before it says
"already complete". ``manifest.json`` (sha256 of every file, the source hash of
every shard) is written last; its presence means complete. SRC is never
written to; its code and pickles (``*.py``, ``*.bin``, ``*.pkl``, ...) and any
``auto_map`` are not carried over.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4_nvfp4 import __version__
from dsv4_nvfp4.formats import ConversionError, FormatError

from . import checks
from .config import dims_from_config, to_deepseek_config
from .errors import CheckpointError, fail
from .layouts import Layout, LayoutContext, storage_for, stored_name
from .names import is_mtp
from .quant_config import a_quantization_config
from .reader import (
    INDEX_NAME,
    Checkpoint,
    TensorInfo,
    TensorReader,
    expected_nbytes,
    open_checkpoint,
)
from .schema import Module, Storage, expand, expert_parts, modules
from .transforms import (
    DenseMode,
    b_context,
    c_to_b_config,
    check_w13_global_scales,
    convert_parts,
    layout_b_quantization,
    mxfp4_experts_to_nvfp4,
)
from .verify import structure
from .writer import ShardWriter, sha256_file, write_text_atomic

STATE_DIR = ".dsv4-convert"
LOCK_NAME = ".dsv4-convert.lock"
MANIFEST = "manifest.json"
REPORT = "conversion_report.json"
# Files of SRC that are rewritten (or meaningless) in DST; every other top-level file is copied.
NOT_COPIED = {INDEX_NAME, "config.json", "hf_quant_config.json", MANIFEST, REPORT}
# ... except code and pickles, which a converted checkpoint never carries (a loader with
# trust_remote_code or torch.load would run them): dropped, and the output says so.
CODE_AND_PICKLES = (".py", ".pyc", ".pyo", ".so", ".pkl", ".pickle", ".bin", ".pt", ".pth",
                    ".ckpt", ".joblib")


class Target(enum.Enum):
    NVFP4 = "nvidia-nvfp4"
    BF16 = "bf16"


Outputs = dict[str, torch.Tensor]
Errors = list[tuple[str, ConversionError]]


@dataclass
class Unit:
    """One step: read ``inputs``, run ``fn``, append ``outputs`` (name, dtype, shape) in order."""

    inputs: list[TensorInfo]
    outputs: list[tuple[str, str, tuple[int, ...]]]
    kind: str
    fn: Callable[[dict[str, torch.Tensor]], tuple[Outputs, Errors, int]]
    shard: int = 0
    stream: bool = False  # a pure copy: the writer streams its input bytes, fn is not called

    @property
    def in_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)


@dataclass
class Plan:
    src: Checkpoint
    src_layout: Layout
    target: Target
    dense: DenseMode
    units: list[Unit]
    files: list[str] = field(default_factory=list)
    shards: list[list[Unit]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    side: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""
    side_files: dict[str, str] = field(default_factory=dict)  # SRC file to copy -> its sha256
    dropped: list[str] = field(default_factory=list)  # what SRC had that DST does not carry


# --- planning ------------------------------------------------------------------------------


def _src_parts(src_layout: Layout, m: Module, st: Storage, ck: Checkpoint
               ) -> list[TensorInfo]:
    base = stored_name(src_layout, m.name)
    assert base is not None
    return [ck.tensors[s.name] for s in expand(st, m, base)]


def _copy_unit(m: Module, infos: list[TensorInfo], out_names: list[str]) -> Unit:
    outs = [(n, t.dtype, t.shape) for n, t in zip(out_names, infos, strict=True)]

    def fn(x: dict[str, torch.Tensor]) -> tuple[Outputs, Errors, int]:
        return {n: x[t.name] for n, t in zip(out_names, infos, strict=True)}, [], 0

    return Unit(infos, outs, "copy", fn, stream=True)


def _convert_unit(m: Module, src_st: Storage, dst_st: Storage, infos: list[TensorInfo],
                  src_base: str) -> Unit:
    specs = expand(dst_st, m)
    outs = [(s.name, s.dtypes[0], s.shape) for s in specs]

    def fn(x: dict[str, torch.Tensor]) -> tuple[Outputs, Errors, int]:
        parts = {t.name.removeprefix(src_base).lstrip("."): x[t.name] for t in infos}
        out, err = convert_parts(src_st, dst_st, parts)
        res = {s.name: out[s.part] for s in specs}
        return res, ([(specs[0].name, err)] if err is not None else []), 0

    return Unit(infos, outs, f"{src_st.name.lower()}->{dst_st.name.lower()}", fn)


def _cast_unit(mods: list[Module], ck: Checkpoint, scales: Checkpoint) -> Unit:
    """MXFP4 → NVFP4 for [w1, w3] of one expert (shared weight_scale_2) or [w2]."""
    infos: list[TensorInfo] = []
    specs_all = []
    for m in mods:
        infos += [ck.tensors[f"{m.name}.weight"], ck.tensors[f"{m.name}.scale"],
                  scales.tensors[f"{m.name}.input_scale"]]
        specs_all.append(expand(Storage.NVFP4, m))
    outs = [(s.name, s.dtypes[0], s.shape) for specs in specs_all for s in specs]

    def fn(x: dict[str, torch.Tensor]) -> tuple[Outputs, Errors, int]:
        parts = [{"weight": x[f"{m.name}.weight"], "scale": x[f"{m.name}.scale"]} for m in mods]
        ins = [x[f"{m.name}.input_scale"] for m in mods]
        conv, lossy = mxfp4_experts_to_nvfp4(parts, ins)
        res = {s.name: c[s.part] for specs, c in zip(specs_all, conv, strict=True) for s in specs}
        return res, [], lossy

    return Unit(infos, outs, "mxfp4->nvfp4 (lossless)", fn)


def _validate(ck: Checkpoint, layout: Layout, what: str) -> None:
    """Refuse input with any structural finding (shards, index, config ↔ tensors)."""
    findings, _, _ = structure(ck, layout)
    if findings:
        more = f" (and {len(findings) - 1} more: run verify)" if len(findings) > 1 else ""
        raise CheckpointError(f"{what} is not a valid layout {layout.name} checkpoint: "
                              f"{findings[0].line()}{more}")


def _scalar(r: TensorReader, info: TensorInfo, what: str) -> float:
    if info.dtype != "F32" or info.shape not in ((), (1,)):
        raise CheckpointError(f"{info.file.name}: {info.name}: expected {what} F32 [], found "
                              f"{info.describe()}")
    v = float(r.read(info).reshape(-1)[0])
    if not (0 < v < float("inf")):
        raise CheckpointError(f"{info.file.name}: {info.name}: expected {what} finite > 0, "
                              f"found {v!r}")
    return v


def _block_scales(r: TensorReader, info: TensorInfo, st: Storage) -> None:
    """A block-scale tensor a conversion dequantizes: E4M3 > 0 and not NaN, UE8M0 not NaN."""
    t = r.read(info)
    if st is Storage.NVFP4:
        problems, _ = checks.e4m3_block_scale(t)
        problems = [q for q in problems if q[0] != "scale.constant"]  # a heuristic, not an error
    else:
        problems = checks.ue8m0_scale(t)
    if problems:
        _, expected, found = problems[0]
        raise CheckpointError(f"{info.file.name}: {info.name}: expected {expected}, "
                              f"found {found}")


def _check_scales(r: TensorReader, st: Storage, infos: list[TensorInfo], consumed: bool
                  ) -> None:
    """Every scale of one module that the conversion reads, before anything is written.

    Global scales (``weight_scale_2``, ``input_scale``) are checked for every NVFP4 module,
    copied or not (a copy carries them into the output, where they would be the loader's
    problem); block scales where the module is dequantized (``consumed``).
    """
    for t in infos:
        part = t.name.rpartition(".")[2]
        if st is Storage.NVFP4 and part in ("weight_scale_2", "input_scale"):
            _scalar(r, t, part)
        elif consumed and ((st is Storage.NVFP4 and part == "weight_scale") or (
                st in (Storage.FP8_BLOCK, Storage.MXFP4) and part == "scale")):
            _block_scales(r, t, st)


def _open_mtp_source(path: Path, src_dims) -> tuple[Checkpoint, Layout, list[Module],
                                                    LayoutContext]:
    nat = open_checkpoint(path)
    lay = _detect(nat, "--mtp-from")
    if lay not in (Layout.A, Layout.B):
        raise CheckpointError(f"--mtp-from {path}: expected a native layout A (or B) checkpoint, "
                              f"found layout {lay.name}")
    _validate(nat, lay, f"--mtp-from {path}")
    nd = dims_from_config(nat.config)
    if nd.n_mtp == 0:
        raise CheckpointError(f"--mtp-from {path}: expected num_nextn_predict_layers > 0, found 0")
    for f in ("vocab", "hidden", "n_heads", "head_dim", "q_lora", "o_groups", "o_lora",
              "n_experts", "moe_inter", "hc_mult", "index_heads", "index_head_dim", "topk"):
        if getattr(nd, f) != getattr(src_dims, f):
            raise CheckpointError(f"--mtp-from {path}: config.json: expected {f} = "
                                  f"{getattr(src_dims, f)} as in SRC, found {getattr(nd, f)}")
    ctx = LayoutContext.from_config(nat.config, nat.json_file("hf_quant_config.json"))
    mods = [m for m in modules(nd) if is_mtp(m.name)]
    return nat, lay, mods, ctx


def _detect(ck: Checkpoint, what: str) -> Layout:
    from .layouts import detect

    if ck.problems:
        raise CheckpointError(f"{what}: {ck.problems[0].line()}")
    return detect(set(ck.tensors), ck.config)


def plan(src_path: Path, target: Target, dense: DenseMode = DenseMode.FP8,
         mtp_from: Path | None = None, input_scales_from: Path | None = None) -> Plan:
    """Validate every input and plan every output tensor. Writes nothing."""
    ck = open_checkpoint(src_path)
    layout = _detect(ck, str(src_path))
    if target is Target.NVFP4 and layout is Layout.B:
        raise CheckpointError(f"{src_path}: expected layout A or C to convert to nvidia-nvfp4, "
                              "found layout B (already the target)")
    if target is Target.NVFP4 and layout is Layout.BF16:
        raise CheckpointError(f"{src_path}: expected layout A or C, found BF16: making NVFP4 "
                              "experts from BF16 needs calibration (use ModelOpt)")
    if target is Target.BF16 and layout is Layout.BF16:
        raise CheckpointError(f"{src_path}: expected a quantized layout, found BF16 already")
    if dense is DenseMode.BF16 and not (target is Target.NVFP4 and layout is Layout.C):
        raise CheckpointError("--dense bf16: expected a C -> nvidia-nvfp4 conversion, found "
                              f"{layout.name} -> {target.value}")
    if mtp_from is not None and layout is not Layout.C:
        raise CheckpointError(f"--mtp-from: expected a layout C SRC (A and B carry mtp.*), "
                              f"found layout {layout.name}")
    if layout is Layout.A and target is Target.NVFP4 and input_scales_from is None:
        raise CheckpointError("--input-scales-from: expected a layout B checkpoint to take "
                              "the experts' input_scale from (W4A4 needs calibrated activation "
                              "scales), found none")
    _validate(ck, layout, str(src_path))
    d = dims_from_config(ck.config)
    src_ctx = LayoutContext.from_config(ck.config, ck.json_file("hf_quant_config.json"),
                                        ck.tensors)
    warnings: list[str] = []
    has_mtp = layout is not Layout.C and d.n_mtp > 0
    mods = modules(d, mtp=has_mtp) if layout is not Layout.C else [
        m for m in modules(d, mtp=False)]
    dst_layout = Layout.B if target is Target.NVFP4 else Layout.BF16
    dst_ctx = b_context(dense) if dst_layout is Layout.B else LayoutContext()
    scales = None
    if input_scales_from is not None:
        if not (layout is Layout.A and target is Target.NVFP4):
            raise CheckpointError("--input-scales-from: expected an A -> nvidia-nvfp4 "
                                  f"conversion, found {layout.name} -> {target.value}")
        scales = open_checkpoint(input_scales_from)
        slay = _detect(scales, f"--input-scales-from {input_scales_from}")
        if slay is not Layout.B:
            raise CheckpointError(f"--input-scales-from {input_scales_from}: expected layout B, "
                                  f"found layout {slay.name}")
    units: list[Unit] = []
    with TensorReader() as r:
        pairs: dict[tuple[str, int], dict[int, Module]] = {}
        for m in mods:
            ep = expert_parts(m.name)
            if ep and ep[2] in (1, 3):
                pairs.setdefault((ep[0], ep[1]), {})[ep[2]] = m
        for m in mods:
            s_st = storage_for(layout, m, src_ctx)
            d_st = storage_for(dst_layout, m, dst_ctx)
            infos = _src_parts(layout, m, s_st, ck)
            base = stored_name(layout, m.name) or m.name
            if s_st is Storage.MXFP4 and d_st is Storage.NVFP4:
                assert scales is not None
                ep = expert_parts(m.name)
                assert ep is not None
                if ep[2] == 3:
                    continue  # converted with its w1
                group = [pairs[(ep[0], ep[1])][1], pairs[(ep[0], ep[1])][3]] if ep[2] == 1 \
                    else [m]
                for g in group:
                    info = scales.tensors.get(f"{g.name}.input_scale")
                    if info is None:
                        raise CheckpointError(f"--input-scales-from {input_scales_from}: "
                                              f"expected {g.name}.input_scale, found none")
                    _scalar(r, info, "input_scale")
                    g_st = storage_for(layout, g, src_ctx)
                    _check_scales(r, g_st, _src_parts(layout, g, g_st, ck), consumed=True)
                units.append(_cast_unit(group, ck, scales))
            elif s_st is d_st:
                names = [s.name for s in expand(d_st, m)] if not m.bare else [m.name]
                _check_scales(r, s_st, infos, consumed=False)
                if s_st is Storage.NVFP4 and layout is Layout.C:
                    _check_c_w13(r, m, ck, pairs)
                units.append(_copy_unit(m, infos, names))
            else:
                _check_scales(r, s_st, infos, consumed=True)
                units.append(_convert_unit(m, s_st, d_st, infos, base))
    for i, u in enumerate(units):
        u.shard = sorted(ck.shards).index(u.inputs[0].file.name)
        del i
    config = _out_config(ck, layout, target, dense, mods)
    if layout is Layout.C:
        mtp_units, config, w = _plan_mtp(mtp_from, d, target, config)
        warnings += w
        n_main = len(ck.shards)
        for u in mtp_units:
            u.shard = n_main
        units += mtp_units
    p = Plan(ck, layout, target, dense, units, config=config, warnings=warnings)
    _assign_shards(p)
    _finish_config(p)
    _plan_side_files(p)
    p.fingerprint = _fingerprint(p, mtp_from, input_scales_from)
    return p


def _check_c_w13(r: TensorReader, m: Module, ck: Checkpoint,
                 pairs: dict[tuple[str, int], dict[int, Module]]) -> None:
    """C experts are copied bit-identical, so gate/up must already share weight_scale_2."""
    ep = expert_parts(m.name)
    if not ep or ep[2] != 1:
        return
    w3 = pairs[(ep[0], ep[1])][3]
    a = ck.tensors[f"{stored_name(Layout.C, m.name)}.weight_scale_2"]
    b = ck.tensors[f"{stored_name(Layout.C, w3.name)}.weight_scale_2"]
    check_w13_global_scales(a.name, r.read(a), b.name, r.read(b), b.file.name)


def _plan_mtp(mtp_from: Path | None, d, target: Target, config: dict
              ) -> tuple[list[Unit], dict, list[str]]:
    if mtp_from is None:
        msg = ("WARNING: layout C has no mtp.* (transformers drops the MTP layer): the output "
               "sets num_nextn_predict_layers = 0, so vLLM loads it but MTP speculative decoding "
               "is off. Pass --mtp-from NATIVE to graft mtp.* from the original checkpoint.")
        config = to_deepseek_config(config, ())
        return [], config, [msg]
    nat, lay, mods, ctx = _open_mtp_source(mtp_from, d)
    nd = dims_from_config(nat.config)
    config = to_deepseek_config(config, nd.mtp_ratios)
    units = []
    with TensorReader() as r:
        for m in mods:
            s_st = storage_for(lay, m, ctx)
            infos = _src_parts(lay, m, s_st, nat)
            if target is Target.BF16 and s_st is not Storage.PLAIN:
                _check_scales(r, s_st, infos, consumed=True)
                units.append(_convert_unit(m, s_st, Storage.BF16, infos, m.name))
            else:
                _check_scales(r, s_st, infos, consumed=False)
                names = [m.name] if m.bare else [s.name for s in expand(s_st, m)]
                units.append(_copy_unit(m, infos, names))
    return units, config, []


def _out_config(ck: Checkpoint, layout: Layout, target: Target, dense: DenseMode,
                mods: list[Module]) -> dict:
    if layout is Layout.C and target is Target.NVFP4:
        cfg, hf_quant = c_to_b_config(ck.config, dense)
        cfg["_hf_quant"] = hf_quant
        return cfg
    cfg = dict(ck.config)
    cfg.pop("quantization_config", None)
    if layout is not Layout.C:
        cfg = to_deepseek_config(cfg, dims_from_config(ck.config).mtp_ratios)
    if target is Target.BF16:
        cfg.pop("expert_dtype", None)
        cfg["torch_dtype"] = "bfloat16"
        return cfg
    cfg["expert_dtype"] = "fp4"
    base = ck.config.get("quantization_config") if layout is Layout.A else None
    cfg["quantization_config"], cfg["_hf_quant"] = layout_b_quantization(
        base or a_quantization_config(), mods, dense)
    return cfg


def _finish_config(p: Plan) -> None:
    hq = p.config.pop("_hf_quant", None)
    if hq is not None:
        p.side["hf_quant_config.json"] = hq
    if p.config.pop("auto_map", None) is not None:
        p.dropped.append("auto_map of config.json")


def _json_with_auto_map(path: Path) -> dict | None:
    """A JSON side file's content when it is an object with ``auto_map`` (else None)."""
    if path.suffix != ".json":
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return content if isinstance(content, dict) and "auto_map" in content else None


def _plan_side_files(p: Plan) -> None:
    """Which other files of SRC are copied (with their sha256), and which are dropped."""
    code = []
    for f in sorted(p.src.root.iterdir()):
        if not f.is_file() or f.suffix == ".safetensors" or f.name in NOT_COPIED \
                or f.name.startswith("."):
            continue
        if f.suffix.lower() in CODE_AND_PICKLES:
            code.append(f.name)
            continue
        try:
            p.side_files[f.name] = sha256_file(f)
        except OSError as e:
            raise CheckpointError(f"{f.name}: expected a readable file, found {e.strerror}"
                                  ) from None
        if _json_with_auto_map(f) is not None:
            p.dropped.append(f"auto_map of {f.name}")
    if code:
        p.dropped.insert(0, ", ".join(code) + " (code and pickles are never copied)")


def _assign_shards(p: Plan) -> None:
    by: dict[int, list[Unit]] = {}
    for u in p.units:
        by.setdefault(u.shard, []).append(u)
    # Copies first, conversions last: the helper thread converts while the copies stream,
    # so the dense requantization overlaps the I/O instead of stalling it.
    groups = [sorted(by[k], key=lambda u: (u.kind != "copy", u.inputs[0].file.name,
                                           u.inputs[0].begin))
              for k in sorted(by)]
    n = len(groups)
    p.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    p.shards = groups
    for i, g in enumerate(groups):
        for u in g:
            u.shard = i


def _fingerprint(p: Plan, *extra: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"tool": __version__, "target": p.target.value, "dense": p.dense.value,
                         "src_layout": p.src_layout.value, "config": p.config,
                         "side": p.side, "files": p.files}, sort_keys=True).encode())
    # The plan's shape: which bytes of which file each output comes from. Whether those bytes
    # are still the same is the per-shard source hash (execute), not this.
    for u in p.units:
        for t in u.inputs:
            h.update(f"{t.file.name}:{t.name}:{t.dtype}:{t.shape}:{t.begin}:{t.end};".encode())
        h.update(repr(u.outputs).encode())
    for e in extra:
        h.update(str(e is not None).encode())
    return h.hexdigest()


# --- execution -----------------------------------------------------------------------------


def _check_dst(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise CheckpointError(f"{dst}: expected a directory outside SRC ({src}) and not "
                              "containing it, found an overlap")


def _load_json(p: Path) -> dict | None:
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


def _prepare_dst(p: Plan, dst: Path) -> tuple[str, dict[int, dict], dict]:
    """('complete', shard records, manifest) if DST holds this conversion's plan;
    ('resume', records, {}) for an interrupted run of it; ('fresh', {}, {}) otherwise."""
    state = dst / STATE_DIR
    if any(f.name != LOCK_NAME for f in dst.iterdir()):
        man = _load_json(dst / MANIFEST)
        if isinstance(man, dict) and man.get("fingerprint") == p.fingerprint:
            shutil.rmtree(state, ignore_errors=True)  # killed after the manifest, before cleanup
            shards = man.get("shards")
            recs = dict(enumerate(shards)) if isinstance(shards, list) and \
                len(shards) == len(p.files) else {}
            return "complete", recs, man
        st = _load_json(state / "plan.json")
        if isinstance(st, dict) and st.get("fingerprint") == p.fingerprint:
            recs = {}
            for i in range(len(p.files)):
                rec = _load_json(state / f"done-{i:05d}.json")
                if isinstance(rec, dict):
                    recs[i] = rec
            return "resume", recs, {}
        raise CheckpointError(f"{dst}: expected an empty directory or an interrupted run of this "
                              "same conversion, found other files")
    state.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state / "plan.json", json.dumps({"fingerprint": p.fingerprint}) + "\n")
    return "fresh", {}, {}


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


# The source fingerprint of an output shard: sha256 over the sha256 of each unit's input
# bytes (in plan order). Computed while streaming; recomputed from SRC on a rerun.
CHECK_PIECE_BYTES = 1 << 24


def _combine(unit_digests: list[str]) -> str:
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
    return _combine(out)


def _unchanged(p: Plan, dst: Path, claimed: dict[int, dict], progress: bool) -> dict[int, dict]:
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


def _out_bytes(u: Unit) -> int:
    return sum(expected_nbytes(dt, shape) for _, dt, shape in u.outputs)


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
            while ahead and (not futures or held + _out_bytes(units[ahead[0]]) <=
                             LOOKAHEAD_BYTES):
                j = ahead.pop(0)
                held += _out_bytes(units[j])
                futures[j] = pool.submit(_compute, units[j], local)
            if u.stream:
                h = hashlib.sha256()
                _stream_copy(u, reader, w, ring, h)
                digests.append(h)
            else:
                out, errs, lz, dig = futures.pop(k).result()
                digests.append(dig)
                held -= _out_bytes(u)
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
    src = _combine([d if isinstance(d, str) else d.hexdigest() for d in digests])
    return w, {"file": p.files[i], "size": size, "sha256": sha, "source_sha256": src,
               "errors": errors, "lossy": lossy}


def _commit(w: ShardWriter, state: Path, i: int, rec: dict) -> None:
    """fsync + rename the shard, then record it as done (in the background)."""
    w.commit()
    write_text_atomic(state / f"done-{i:05d}.json", json.dumps(rec) + "\n")


def _copy_side_files(p: Plan, dst: Path) -> None:
    """SRC's other files (tokenizer, generation config, ...), ``auto_map`` removed from JSON."""
    for name in p.side_files:
        f = p.src.root / name
        stripped = _json_with_auto_map(f)
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
    _check_dst(p.src.root, dst)
    with DestinationLock(dst):
        return _execute_locked(p, dst, progress, fsync)


def _execute_locked(p: Plan, dst: Path, progress: bool, fsync: bool) -> str:
    mode, claimed, manifest = _prepare_dst(p, dst)
    state = dst / STATE_DIR
    records = _unchanged(p, dst, claimed, progress)
    if mode == "complete":
        if len(records) == len(p.files) and manifest.get("side_sha256") == p.side_files:
            return "done"
        # SRC changed since: make the finished conversion an interrupted one that keeps the
        # shards whose sources are unchanged (state first: a kill in between stays "complete")
        state.mkdir(exist_ok=True)
        write_text_atomic(state / "plan.json", json.dumps({"fingerprint": p.fingerprint}) + "\n")
        for i, rec in records.items():
            write_text_atomic(state / f"done-{i:05d}.json", json.dumps(rec) + "\n")
        (dst / MANIFEST).unlink()
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
                commits.append(committer.submit(_commit, w, state, i, rec))
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


def describe(p: Plan) -> str:
    kinds: dict[str, list[int]] = {}
    for u in p.units:
        k = kinds.setdefault(u.kind, [0, 0])
        k[0] += 1
        k[1] += u.in_bytes
    out_bytes = sum(_out_bytes(u) for u in p.units)
    lines = [f"convert {p.src.root} ({p.src_layout.title}) -> {p.target.value}"
             + (f", dense {p.dense.value}" if p.target is Target.NVFP4 else ""),
             f"  read {sum(u.in_bytes for u in p.units) / 1e9:.3f} GB, write "
             f"{out_bytes / 1e9:.3f} GB in {len(p.files)} shard(s)"]
    for k, (n, b) in sorted(kinds.items()):
        lines.append(f"  {k:28s} {n:8d} modules {b / 1e9:10.3f} GB")
    lines += [f"  {w}" for w in p.warnings]
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert a checkpoint to layout B or BF16",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", required=True, type=Target, choices=list(Target),
                   metavar="{nvidia-nvfp4,bf16}")
    p.add_argument("--dense", type=DenseMode, choices=list(DenseMode), default=DenseMode.FP8,
                   metavar="{fp8,bf16}", help="C -> B: dense linears FP8 (default) or BF16")
    p.add_argument("--mtp-from", type=Path, metavar="NATIVE",
                   help="C: graft mtp.* byte-identical from this layout A checkpoint")
    p.add_argument("--input-scales-from", type=Path, metavar="B_CHECKPOINT",
                   help="A -> B: take each expert's input_scale from this layout B checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--no-fsync", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _os_error_line(e: OSError, dst: Path) -> str:
    """One line for an OSError: the destination file when writing failed (shutil names the
    source of a copy in ``filename`` and the destination in ``filename2``)."""
    what = e.strerror or str(e)
    if e.filename2:
        return f"{e.filename2}: expected a writable destination, found {what}"
    if e.filename:
        f = Path(os.fsdecode(e.filename))
        inside = f.resolve() == dst.resolve() or dst.resolve() in f.resolve().parents
        if not inside and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return f"{f}: expected a readable file, found {what}"
        if inside:
            return f"{f}: expected a writable destination, found {what}"
    return f"{dst}: expected a writable destination, found {what}"


def run(args: argparse.Namespace) -> int:
    try:
        _check_dst(args.src, args.dst)
        pl = plan(args.src, args.to, args.dense, args.mtp_from, args.input_scales_from)
        for w in pl.warnings:
            print(w, file=sys.stderr)
        if args.dry_run:
            print(describe(pl))
            return 0
        status = execute(pl, args.dst, progress=sys.stderr.isatty(), fsync=not args.no_fsync)
    except (CheckpointError, FormatError) as e:
        return fail(str(e))
    except OSError as e:
        return fail(_os_error_line(e, args.dst))
    if status == "done":
        print(f"{args.dst}: already complete (manifest matches this conversion and its "
              "sources)")
        return 0
    rep = _load_json(args.dst / REPORT) or {}
    worst = rep.get("worst_tensor")
    print(f"wrote {args.dst} ({Layout.B.title if args.to is Target.NVFP4 else 'BF16'})")
    if worst:
        e = rep["tensors"][worst]
        if e["max_rel"] is None or e["rel_l2"] is None:
            err = "relative error undefined (its exact dequantization is all zero)"
        else:
            err = f"max_rel {e['max_rel']:.4f}, rel_l2 {e['rel_l2']:.4f}"
        print(f"  {len(rep['tensors'])} tensors requantized; worst {worst}: {err} "
              f"(all in {REPORT})")
    if rep.get("lossy_mxfp4_blocks"):
        print(f"  lossless cast: {rep['lossy_mxfp4_blocks']} MXFP4 blocks were below the "
              "E4M3 range and requantized")
    for d in rep.get("dropped") or []:
        print(f"  dropped from SRC: {d}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli_util import standalone

    return standalone(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
