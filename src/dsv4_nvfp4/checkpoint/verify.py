"""``dsv4-nvfp4 verify PATH [--against ORIGINAL] [--json]``: the checkpoint linter.

Exit 0: clean. Exit 1: findings. Exit 2: unusable input (no config, no
shards, an unrecognised layout). Every finding names the file, the tensor,
what was expected and what was found.

What it checks, in order:

1. Files: every shard readable and complete (header length, offsets, file
   size), the index and the shards agree (reader.py).
2. Config ↔ tensors: the model the config describes (schema.py) stored the way
   the layout stores it (layouts.py): every tensor present with its dtype and
   shape, nothing unexpected. A module stored in another format is reported
   once (e.g. "expected NVFP4, found MXFP4"); unpacked FP4 and UE8M0 bytes in
   an E4M3 scale are named as such. Scale formats come from dtype + name +
   shape, never from byte values.
3. The layout's quantization config (and ``hf_quant_config.json``) agrees with
   the tensors; ``mtp.*`` is present when ``num_nextn_predict_layers`` > 0.
4. Values (unless ``--no-values``): NaN/inf anywhere; NVFP4 block scales
   non-negative, non-NaN, non-zero, not constant, consistent with the packed
   values and with ``weight_scale_2`` (checks.py); ``weight_scale_2`` and
   ``input_scale`` finite and positive; w1/w3 ``weight_scale_2`` equal (vLLM
   uses w1's for both); UE8M0 without 0xFF.
5. ``--against ORIGINAL``: ``mtp.*`` byte-identical to the original.
6. Files a conversion leaves: no temporary ``.*.partial`` file anywhere in the
   directory; in a directory ``convert`` wrote (it has ``manifest.json``,
   ``conversion_report.json`` or the ``.dsv4-convert`` state), a manifest that
   exists, is complete (it lists every file and every file it lists exists) and
   whose sha256 matches each file (``--no-hash`` skips the hashing).

Layout C's known gaps (no ``mtp.*``, ``o_a_proj`` BF16 but not in ``ignore``)
are reported as notes: they are what the layout is, and why ``convert`` exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from .config import dims_from_config
from .errors import CheckpointError, fail
from .findings import Finding
from .layouts import (
    B_EXCLUDE_MODULES,
    Layout,
    LayoutContext,
    c_exclude_patterns,
    detect,
    matches_any,
    storage_for,
    stored_name,
)
from .names import is_mtp, layer_of, vllm_module
from .reader import INDEX_NAME, Checkpoint, TensorInfo, TensorReader, open_checkpoint
from .schema import ALL_PARTS, Module, Role, Storage, TensorSpec, expand, expert_key, modules
from .transforms import w13_global_scales_agree

MAX_LINES_PER_CHECK = 20


@dataclass
class Report:
    path: Path
    layout: Layout
    n_tensors: int
    n_shards: int
    total_bytes: int
    values_checked: bool
    findings: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0

    def checks(self) -> set[str]:
        return {f.check for f in self.findings}

    def as_dict(self) -> dict:
        return {"path": str(self.path), "layout": self.layout.value, "tensors": self.n_tensors,
                "shards": self.n_shards, "bytes": self.total_bytes,
                "values_checked": self.values_checked, "exit_code": self.exit_code,
                "findings": [f.as_dict() for f in self.findings],
                "notes": [f.as_dict() for f in self.notes]}


@dataclass
class ModuleState:
    module: Module
    base: str
    storage: Storage
    tensors: dict[str, TensorInfo]  # part -> info, only when the module is exactly as expected


# --- structure -----------------------------------------------------------------------------


def _where(ck: Checkpoint) -> str:
    return INDEX_NAME if ck.index is not None else next(iter(ck.shards), "checkpoint")


def _mismatch(spec: TensorSpec, st: Storage, m: Module, t: TensorInfo) -> Finding | None:
    f = t.file.name
    if t.dtype not in spec.dtypes:
        if spec.part == "weight_scale" and t.dtype in ("F8_E8M0", "U8"):
            return Finding("scale.dtype", f, t.name, f"F8_E4M3 {list(spec.shape)} (NVFP4 "
                           "block scales)", f"{t.describe()}: UE8M0 bytes where E4M3 belong")
        return Finding("tensor.dtype", f, t.name, spec.describe(), t.describe())
    if t.shape != spec.shape:
        if spec.part == "weight" and st in (Storage.NVFP4, Storage.MXFP4) and t.shape == m.shape:
            return Finding("fp4.unpacked", f, t.name, f"{spec.describe()} (two E2M1 codes per "
                           "byte)", f"{t.describe()}: unpacked FP4, one code per byte")
        if spec.part == "weight_scale" and len(t.shape) == 2 and len(m.shape) == 2 and \
                t.shape[1] * 32 == m.shape[1]:
            return Finding("scale.shape", f, t.name, f"{spec.describe()} (one scale per 16)",
                           f"{t.describe()}: one scale per 32 (MXFP4 scales?)")
        return Finding("tensor.shape", f, t.name, spec.describe(), t.describe())
    return None


def _module_findings(ck: Checkpoint, m: Module, base: str, st: Storage,
                     claimed: set[str]) -> tuple[list[Finding], ModuleState | None]:
    specs = expand(st, m, base)
    if m.bare:
        found = {base} if base in ck.tensors else set()
    else:
        found = {f"{base}.{s}" for s in ALL_PARTS if f"{base}.{s}" in ck.tensors}
    claimed |= found
    want = {s.name for s in specs}
    if found == want:
        out = [f for s in specs if (f := _mismatch(s, st, m, ck.tensors[s.name])) is not None]
        state = ModuleState(m, base, st, {s.part: ck.tensors[s.name] for s in specs})
        return out, (None if out else state)
    if not found:
        return [Finding("tensor.missing", _where(ck), base, f"{st.value}: " + ", ".join(
            s.name.removeprefix(base) or base for s in specs), "absent")], None
    for other in Storage:
        if other is st or other is Storage.PLAIN:
            continue
        ospecs = expand(other, m, base)
        if {s.name for s in ospecs} == found and all(
                _mismatch(s, other, m, ck.tensors[s.name]) is None for s in ospecs):
            f0 = ck.tensors[ospecs[0].name].file.name
            return [Finding("module.storage", f0, base, st.value, other.value)], None
    out = []
    for s in specs:
        t = ck.tensors.get(s.name)
        if t is None:
            out.append(Finding("tensor.missing", _where(ck), s.name, s.describe(), "absent"))
        elif (f := _mismatch(s, st, m, t)) is not None:
            out.append(f)
    for n in sorted(found - want):
        t = ck.tensors[n]
        out.append(Finding("tensor.unexpected", t.file.name, n, f"no such tensor in {st.value}",
                           t.describe()))
    return out, None


def _c_storage_hint(f: Finding, m: Module) -> Finding:
    """Say why layout C wants NVFP4 where it found BF16: the export's config did not exclude it."""
    if f.check != "module.storage" or f.found != Storage.BF16.value or \
            f.expected != Storage.NVFP4.value:
        return f
    why = ("routed experts must be NVFP4: layout B's come from calibration, not from BF16"
           if m.role is Role.EXPERT else
           "BF16 only where quantization_config.ignore / exclude_modules matches the module")
    return Finding(f.check, f.file, f.tensor, f"{f.expected}; {why}", f.found, f.severity)


def _mtp_status(ck: Checkpoint, layout: Layout, n_mtp: int) -> tuple[bool, list[Finding],
                                                                      list[Finding]]:
    """(expect mtp.* tensors, findings, notes)."""
    have = any(is_mtp(n) for n in ck.tensors)
    if n_mtp == 0:
        return False, [], []
    if layout is Layout.C:
        return False, [], [Finding("mtp.missing", "config.json", "mtp.*", "mtp.* (layout C never "
                                   "has it: transformers drops the MTP layer)",
                                   f"num_nextn_predict_layers = {n_mtp} and no mtp.* tensors",
                                   "note")]
    if not have:
        layers = "layers" if n_mtp > 1 else "layer"
        return False, [Finding("mtp.missing", _where(ck), "mtp.*", f"the MTP {layers} "
                               f"(config.json num_nextn_predict_layers = {n_mtp})",
                               "no mtp.* tensors")], []
    return True, [], []


def structure(ck: Checkpoint, layout: Layout) -> tuple[list[Finding], list[Finding],
                                                       list[ModuleState]]:
    """Config ↔ tensors. Returns (findings, notes, modules whose tensors are exactly right)."""
    d = dims_from_config(ck.config)
    findings = list(ck.problems)
    want_mtp, f_mtp, notes = _mtp_status(ck, layout, d.n_mtp)
    findings += f_mtp
    ctx = LayoutContext.from_config(ck.config, ck.json_file("hf_quant_config.json"),
                                    ck.tensors)
    claimed: set[str] = set()
    states: list[ModuleState] = []
    for m in modules(d, mtp=want_mtp):
        base = stored_name(layout, m.name)
        if base is None:
            continue
        st = storage_for(layout, m, ctx)
        fs, state = _module_findings(ck, m, base, st, claimed)
        if layout is Layout.C:
            fs = [_c_storage_hint(f, m) for f in fs]
        findings += fs
        if state is not None:
            states.append(state)
    unexpected = sorted(set(ck.tensors) - claimed)
    mtp_extra = [n for n in unexpected if is_mtp(n)]
    if mtp_extra and not want_mtp and d.n_mtp == 0:
        findings.append(Finding("mtp.unexpected", ck.tensors[mtp_extra[0]].file.name, "mtp.*",
                                "no mtp.* (config.json num_nextn_predict_layers = 0)",
                                f"{len(mtp_extra)} mtp.* tensors"))
        unexpected = [n for n in unexpected if not is_mtp(n)]
    for n in unexpected:
        t = ck.tensors[n]
        findings.append(Finding("tensor.unexpected", t.file.name, n,
                                "only the tensors config.json describes", t.describe()))
    findings += config_findings(ck, layout, states)
    notes += layout_notes(ck, layout)
    return findings, notes, states


# --- config --------------------------------------------------------------------------------


def _cfg(check: str, key: str, expected: str, found: object, file: str = "config.json"
         ) -> Finding:
    return Finding(check, file, key, expected, json.dumps(found) if found is not None
                   else "absent")


def config_findings(ck: Checkpoint, layout: Layout, states: list[ModuleState]) -> list[Finding]:
    qc = ck.config.get("quantization_config")
    out: list[Finding] = []
    if layout is Layout.BF16:
        if qc:
            out.append(_cfg("config.quantization", "quantization_config", "absent (BF16 "
                            "tensors)", qc.get("quant_method")))
        return out
    if not isinstance(qc, dict):
        return [_cfg("config.quantization", "quantization_config", "an object", qc)]
    if layout is Layout.C:
        if qc.get("quant_method") != "modelopt":
            out.append(_cfg("config.quantization", "quantization_config.quant_method",
                            '"modelopt"', qc.get("quant_method")))
        return out
    if qc.get("quant_method") not in ("fp8", "deepseek_v4_fp8"):
        out.append(_cfg("config.quantization", "quantization_config.quant_method", '"fp8"',
                        qc.get("quant_method")))
    if qc.get("weight_block_size") != [128, 128]:
        out.append(_cfg("config.quantization", "quantization_config.weight_block_size",
                        "[128, 128]", qc.get("weight_block_size")))
    if ck.config.get("expert_dtype", "fp4") != "fp4":
        out.append(_cfg("config.quantization", "expert_dtype", '"fp4" (MXFP4/NVFP4 experts)',
                        ck.config.get("expert_dtype")))
    if layout is Layout.A:
        if qc.get("moe_quant_algo"):
            out.append(_cfg("config.quantization", "quantization_config.moe_quant_algo",
                            "absent (MXFP4 experts)", qc.get("moe_quant_algo")))
        return out
    # layout B
    for key, want in (("moe_quant_algo", "NVFP4"), ("quant_algo", "MIXED_PRECISION"),
                      ("group_size", 16)):
        if qc.get(key) != want:
            out.append(_cfg("config.quantization", f"quantization_config.{key}",
                            json.dumps(want), qc.get(key)))
    nv = sorted(s.module.name for s in states if s.storage is Storage.NVFP4)
    nv_all = {m for m in nv} | {
        s.module.name for s in states if s.module.role is Role.EXPERT and not is_mtp(s.module.name)}
    hq = ck.json_file("hf_quant_config.json")
    if hq is None:
        out.append(Finding("config.hf_quant", "hf_quant_config.json", "", "the ModelOpt "
                           "manifest (quantization.quant_algo, group_size, exclude_modules)",
                           "absent"))
    else:
        q = hq.get("quantization") or {}
        for key in ("quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules"):
            if key not in q:
                out.append(_cfg("config.hf_quant", f"quantization.{key}", "present", None,
                                "hf_quant_config.json"))
    excl = qc.get("exclude_modules") or qc.get("ignore")
    if not isinstance(excl, list):
        out.append(_cfg("config.exclude", "quantization_config.ignore", json.dumps(
            B_EXCLUDE_MODULES), excl))
        excl = []
    for name in nv:
        if matches_any(name, excl):
            out.append(Finding("config.exclude", "config.json", name, "NVFP4 modules not "
                               "matched by ignore/exclude_modules", f"excluded by {excl}"))
    ql = qc.get("quantized_layers")
    if ql is None and hq:
        ql = (hq.get("quantization") or {}).get("quantized_layers")
    if isinstance(ql, dict | list):
        listed = set(ql)
        for name in sorted(nv_all - listed)[:1]:
            out.append(Finding("config.quantized_layers", "config.json", name,
                               "every NVFP4 expert listed in quantized_layers",
                               f"{len(nv_all - listed)} not listed, e.g. this one"))
        extra = sorted(listed - set(nv))
        if extra:
            out.append(Finding("config.quantized_layers", "config.json", extra[0],
                               "quantized_layers naming only NVFP4 modules present",
                               f"{len(extra)} entries that are not, e.g. this one"))
    ign = qc.get("ignored_layers") or []
    dense = {vllm_module(s.module.name) for s in states if s.storage is Storage.BF16
             and s.module.role is Role.DENSE}
    known = {vllm_module(s.module.name) for s in states} - {None}
    for name in ign:
        if name not in known and name not in dense:
            out.append(Finding("config.ignored_layers", "config.json", name,
                               "ignored_layers naming vLLM modules of BF16 dense linears",
                               "names no such module"))
    return out


def layout_notes(ck: Checkpoint, layout: Layout) -> list[Finding]:
    if layout is not Layout.C:
        return []
    out = []
    qc = ck.config.get("quantization_config") or {}
    ign = qc.get("ignore") or []
    oa = sorted(n for n in ck.tensors if n.endswith(".self_attn.o_a_proj.weight"))
    if oa and not any(matches_any(n.removesuffix(".weight"), ign) for n in oa[:1]):
        out.append(Finding("c.o_a_proj", ck.tensors[oa[0]].file.name, oa[0], "listed in "
                           "quantization_config.ignore (it is BF16)", "BF16 and not listed: a "
                           "loader trusting ignore would read it as NVFP4", "note"))
    excl = c_exclude_patterns(ck.config, ck.json_file("hf_quant_config.json"))
    nv_excl = sorted(n for n in ck.tensors if n.endswith(".weight_scale")
                     and matches_any(n.removesuffix(".weight_scale"), excl))
    if nv_excl:
        out.append(Finding("c.excluded_nvfp4", ck.tensors[nv_excl[0]].file.name, nv_excl[0],
                           "modules matched by ignore / exclude_modules stored BF16",
                           f"NVFP4 ({len(nv_excl)} such module(s)): read as NVFP4 from the "
                           "tensors; a loader trusting the config would not", "note"))
    return out


# --- values --------------------------------------------------------------------------------


def _finding(info: TensorInfo, p: checks.Problem) -> Finding:
    return Finding(p[0], info.file.name, info.name, p[1], p[2])


def _read_module(r: TensorReader, s: ModuleState) -> dict[str, torch.Tensor]:
    return {part: r.read(info) for part, info in s.tensors.items()}


def values(ck: Checkpoint, layout: Layout, states: list[ModuleState], progress: bool = False
           ) -> list[Finding]:
    """Value checks of every module whose tensors have the right dtypes and shapes."""
    out: list[Finding] = []
    group_max: dict[tuple[str, bytes], tuple[float, TensorInfo]] = {}
    w13: dict[tuple[str, int], dict[int, tuple[torch.Tensor, TensorInfo]]] = {}
    order = sorted(states, key=lambda s: min((t.file.name, t.begin) for t in s.tensors.values()))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.nbytes for s in order for t in s.tensors.values()), unit="B",
                   unit_scale=True, desc="verify", file=sys.stderr)
    with TensorReader() as r:
        for s in order:
            ts = _read_module(r, s)
            if bar is not None:
                bar.update(sum(t.nbytes for t in s.tensors.values()))
            for part, t in ts.items():
                if part not in ("weight_scale", "scale"):
                    out += [_finding(s.tensors[part], p) for p in checks.finite(t)]
            if s.storage is Storage.NVFP4:
                info = s.tensors["weight_scale"]
                # a global scale's finding names that tensor, the rest the block scales
                out += [_finding(s.tensors.get(p[0].removeprefix("scale."), info), p)
                        for p in checks.nvfp4_values(ts["weight"], ts["weight_scale"],
                                                     ts["weight_scale_2"], ts["input_scale"])]
                ws2 = ts["weight_scale_2"].float().reshape(()).numpy().tobytes()
                key = (layer_of(s.module.name), ws2)
                wsb = ts["weight_scale"].view(torch.uint8)
                if bool((wsb < 0x7F).all()) and wsb.numel():
                    mx = float(ts["weight_scale"].view(torch.float8_e4m3fn).float().max())
                    if key not in group_max or mx > group_max[key][0]:
                        group_max[key] = (mx, info)
                expert = expert_key(s.module.name)
                if expert and expert.gate_or_up:
                    w13.setdefault(expert.expert_id, {})[expert.proj] = (
                        ts["weight_scale_2"], s.tensors["weight_scale_2"])
            elif s.storage is Storage.MXFP4:
                out += [_finding(s.tensors["scale"], p)
                        for p in checks.mxfp4_values(ts["weight"], ts["scale"])]
            elif s.storage is Storage.FP8_BLOCK:
                out += [_finding(s.tensors["scale"], p) for p in checks.ue8m0_scale(ts["scale"])]
    if bar is not None:
        bar.close()
    for mx, info in group_max.values():
        out += [_finding(info, p) for p in checks.nvfp4_group_max(
            [torch.tensor([mx]).to(torch.float8_e4m3fn)])]
    for pair in w13.values():
        if 1 in pair and 3 in pair and not w13_global_scales_agree(pair[1][0], pair[3][0]):
            a, b = (float(pair[j][0].float().reshape(-1)[0]) for j in (1, 3))
            out.append(Finding("scale.w13_mismatch", pair[3][1].file.name, pair[3][1].name,
                               f"equal to w1's weight_scale_2 {a!r} (vLLM's fused w13 GEMM uses "
                               "w1's for both)", f"{b!r}"))
    return out


# --- against -------------------------------------------------------------------------------


def against(ck: Checkpoint, original: Checkpoint) -> tuple[list[Finding], int]:
    """``mtp.*`` byte-identical to ``original``. Returns (findings, tensors compared)."""
    names = sorted(n for n in original.tensors if is_mtp(n))
    if not names:
        raise CheckpointError(f"{original.root}: expected mtp.* tensors to compare against, "
                              "found none")
    out: list[Finding] = []
    with TensorReader() as r:
        for n in names:
            o = original.tensors[n]
            t = ck.tensors.get(n)
            if t is None:
                continue  # reported by the structure checks
            if (t.dtype, t.shape) != (o.dtype, o.shape):
                out.append(Finding("against.mtp", t.file.name, n, f"{o.describe()} as in the "
                                   "original", t.describe()))
                continue
            a, b = r.raw(t), r.raw(o)
            if not torch.equal(a, b):
                first = int((a != b).nonzero()[0])
                out.append(Finding("against.mtp", t.file.name, n, "bytes identical to the "
                                   f"original ({o.file.name})", f"first difference at byte "
                                   f"{first} of {t.nbytes}"))
    return out, len(names)


# --- files a conversion leaves ---------------------------------------------------------------

MANIFEST = "manifest.json"  # convert.py writes it last; its presence means complete
CONVERT_MARKERS = ("conversion_report.json", ".dsv4-convert")


def files_findings(root: Path, check_hash: bool = True) -> list[Finding]:
    """Leftover temporary files, and the manifest of a directory ``convert`` wrote."""
    from .writer import sha256_file

    out = [Finding("files.partial", f.name, "", "no temporary files (a finished conversion or "
                   "tiny renames every one)", "a leftover temporary file: a stopped run?")
           for f in sorted(root.iterdir()) if f.name.endswith(".partial")]
    mpath = root / MANIFEST
    if not mpath.is_file():
        if any((root / m).exists() for m in CONVERT_MARKERS):
            out.append(Finding("manifest.missing", MANIFEST, "", "the manifest convert writes "
                               "last (a directory convert wrote)", "absent: the conversion "
                               "did not finish (rerun it to resume)"))
        return out
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [*out, Finding("manifest.invalid", MANIFEST, "", "JSON", f"{e}")]
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return [*out, Finding("manifest.invalid", MANIFEST, "files", "an object of file name "
                              "-> sha256", json.dumps(files)[:80] if files is not None
                              else "absent")]
    if (root / ".dsv4-convert").exists():
        out.append(Finding("manifest.incomplete", ".dsv4-convert", "", "no conversion state "
                           "beside a manifest", "the state of a conversion that did not "
                           "finish (rerun it)"))
    present = sorted(f.name for f in root.iterdir() if f.is_file()
                     and not f.name.startswith(".") and f.name != MANIFEST)
    for name in present:
        if name not in files:
            out.append(Finding("manifest.unlisted", name, "", f"every file listed in {MANIFEST}",
                               "a file the manifest does not list"))
    for name, sha in sorted(files.items()):
        f = root / name
        if "/" in name or "\\" in name or name in (".", ".."):
            out.append(Finding("manifest.invalid", MANIFEST, name, "a file name inside the "
                               "checkpoint directory", "a path"))
        elif not f.is_file():
            out.append(Finding("manifest.file_missing", name, "", f"the file {MANIFEST} lists",
                               "absent"))
        elif check_hash:
            try:
                got = sha256_file(f)
            except OSError as e:
                got = f"unreadable ({e.strerror})"
            if got != sha:
                out.append(Finding("manifest.sha256", name, "", f"sha256 {sha} (per "
                                   f"{MANIFEST})", got))
    return out


# --- entry points --------------------------------------------------------------------------


def verify(path: str | Path, against_path: str | Path | None = None, check_values: bool = True,
           progress: bool = False, check_hash: bool = True) -> Report:
    """Lint a checkpoint directory. Raises :class:`CheckpointError` for unusable input."""
    ck = open_checkpoint(path)
    layout = detect(set(ck.tensors), ck.config) if ck.tensors else None
    if layout is None:
        raise CheckpointError(f"{path}: expected readable shards, found none "
                              f"({'; '.join(f.line() for f in ck.problems[:3])})")
    findings, notes, states = structure(ck, layout)
    findings = files_findings(Path(path), check_hash) + findings
    rep = Report(Path(path), layout, len(ck.tensors), len(ck.shards), ck.total_bytes(),
                 check_values, findings, notes)
    if check_values:
        rep.findings += values(ck, layout, states, progress)
    if against_path is not None:
        fs, _ = against(ck, open_checkpoint(against_path))
        rep.findings += fs
    return rep


def format_report(rep: Report) -> str:
    lines = [f"layout: {rep.layout.title}",
             f"checked: {rep.n_tensors} tensors in {rep.n_shards} shard(s), "
             f"{rep.total_bytes / 1e6:.1f} MB; values "
             f"{'checked' if rep.values_checked else 'skipped'}"]
    for title, items in (("findings", rep.findings), ("notes", rep.notes)):
        if not items:
            continue
        lines.append(f"{title} ({len(items)}):")
        per: dict[str, int] = {}
        for f in items:
            per[f.check] = per.get(f.check, 0) + 1
            if per[f.check] <= MAX_LINES_PER_CHECK:
                lines.append(f"  {f.line()}")
        for check, n in per.items():
            if n > MAX_LINES_PER_CHECK:
                lines.append(f"  ... and {n - MAX_LINES_PER_CHECK} more [{check}]")
    lines.append("result: clean" if not rep.findings else f"result: {len(rep.findings)} finding(s)")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="lint a checkpoint (exit 0 clean, 1 findings, "
                              "2 unusable)", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--against", type=Path, metavar="ORIGINAL|LOCK",
                   help="a checkpoint directory: also require mtp.* byte-identical to it; "
                   "a lock file (dsv4-nvfp4 lock): first require every file's SHA-256 to match")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-values", action="store_true",
                   help="headers and config only (with --no-hash: seconds, even for 900 GB)")
    p.add_argument("--no-hash", action="store_true",
                   help="do not re-hash the files a manifest.json lists (it reads every byte)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .lock import check_against_lock, is_lock_path

    if args.against is not None and is_lock_path(args.against):  # --against LOCK (lock.py)
        try:
            code = check_against_lock(args.path, args.against, progress=sys.stderr.isatty(),
                                      out=sys.stderr if args.json else sys.stdout)
        except CheckpointError as e:
            return fail(str(e))
        if code:
            return code
        args.against = None
    try:
        rep = verify(args.path, args.against, not args.no_values,
                     progress=not args.json and sys.stderr.isatty(),
                     check_hash=not args.no_hash)
    except CheckpointError as e:
        if args.json:
            print(json.dumps({"path": str(args.path), "exit_code": 2, "error": str(e)}))
        return fail(str(e))
    print(json.dumps(rep.as_dict(), indent=2) if args.json else format_report(rep))
    return rep.exit_code
