"""What ``convert`` writes, decided before anything is written: the plan.

Why a module of its own: planning is the part of a conversion that must be
complete and correct before the first byte lands in DST, and it needs no DST
at all. From the input headers it validates every input — all shards readable,
the layout's structure, and every scale the conversion consumes (each
``weight_scale_2`` / ``input_scale`` F32, finite and > 0; each block scale it
dequantizes: E4M3 non-zero, non-NaN, sign clear, UE8M0 without 0xFF) — and
plans every output tensor as a :class:`Unit` (read these inputs, run this
per-module conversion, append these outputs), every output shard, the output
config and side files, and a fingerprint of the whole plan. :mod:`.convert_exec`
runs a plan; :mod:`.convert_state` compares it with what DST already holds.
Writes nothing.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4_nvfp4 import __version__
from dsv4_nvfp4.formats import ConversionError

from . import checks
from .config import dims_from_config, to_deepseek_config
from .errors import CheckpointError
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
from .schema import Module, Storage, expand, expert_key, modules
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
from .writer import sha256_file

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

    @property
    def out_bytes(self) -> int:
        return sum(expected_nbytes(dt, shape) for _, dt, shape in self.outputs)


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
            expert = expert_key(m.name)
            if expert and expert.gate_or_up:
                pairs.setdefault(expert.expert_id, {})[expert.proj] = m
        for m in mods:
            s_st = storage_for(layout, m, src_ctx)
            d_st = storage_for(dst_layout, m, dst_ctx)
            infos = _src_parts(layout, m, s_st, ck)
            base = stored_name(layout, m.name) or m.name
            if s_st is Storage.MXFP4 and d_st is Storage.NVFP4:
                assert scales is not None
                expert = expert_key(m.name)
                assert expert is not None
                if expert.proj == 3:
                    continue  # converted with its w1
                w13 = pairs[expert.expert_id]
                group = [w13[1], w13[3]] if expert.proj == 1 else [m]
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
    expert = expert_key(m.name)
    if not expert or expert.proj != 1:
        return
    w3 = pairs[expert.expert_id][3]
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


def json_with_auto_map(path: Path) -> dict | None:
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
        if json_with_auto_map(f) is not None:
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


def describe(p: Plan) -> str:
    """The plan in a few lines: what `--dry-run` prints."""
    kinds: dict[str, list[int]] = {}
    for u in p.units:
        k = kinds.setdefault(u.kind, [0, 0])
        k[0] += 1
        k[1] += u.in_bytes
    out_bytes = sum(u.out_bytes for u in p.units)
    lines = [f"convert {p.src.root} ({p.src_layout.title}) -> {p.target.value}"
             + (f", dense {p.dense.value}" if p.target is Target.NVFP4 else ""),
             f"  read {sum(u.in_bytes for u in p.units) / 1e9:.3f} GB, write "
             f"{out_bytes / 1e9:.3f} GB in {len(p.files)} shard(s)"]
    for k, (n, b) in sorted(kinds.items()):
        lines.append(f"  {k:28s} {n:8d} modules {b / 1e9:10.3f} GB")
    lines += [f"  {w}" for w in p.warnings]
    return "\n".join(lines)
