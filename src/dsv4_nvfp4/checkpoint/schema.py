"""What a DeepSeek V4 checkpoint must contain: every module, its role, its shape, its storage.

The model is described once, in DeepSeek names and logical (unquantized)
shapes, from the config (:func:`modules`). A layout then decides how each
module is stored (:class:`Storage`) and :func:`expand` turns that into the
exact tensors (name, dtype, shape) a file must hold. ``verify`` compares
files against this, ``convert`` plans its outputs with it and ``tiny``
writes it — one description, three users.

Module list and shapes: the DeepSeek-native names of the official checkpoint's
``model.safetensors.index.json`` and vLLM's DeepSeek V4 model, mirrored by
``tiny_bf16.tiny_state_dict``; a test checks the two agree. Storage per
layout: :mod:`.layouts`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from dsv4_nvfp4.formats import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP

from .config import Dims
from .names import index_shape


class Role(enum.Enum):
    """What a module is, independent of how a layout stores it."""

    DENSE = "dense linear"  # FP8 128x128 in the native checkpoint
    EXPERT = "routed expert"  # MXFP4 in native, NVFP4 in layout B
    BF16_LINEAR = "bf16 linear"  # BF16 in every native layout (router, compressor, ...)
    NORM = "norm"  # BF16 vector, ``.weight``
    FP32 = "fp32 tensor"  # hyper-connections, sinks, ape, router bias
    INDEX = "index"  # gate.tid2eid


class Storage(enum.Enum):
    """How a module's tensors are stored on disk."""

    FP8_BLOCK = "FP8 e4m3, UE8M0 128x128 scales"
    MXFP4 = "MXFP4 (E2M1 + UE8M0 per 32)"
    NVFP4 = "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)"
    BF16 = "BF16"
    PLAIN = "as is"


@dataclass(frozen=True)
class Module:
    """One module (or one bare tensor, for FP32/INDEX roles) in DeepSeek names."""

    name: str
    role: Role
    shape: tuple[int, ...]
    dtypes: tuple[str, ...] = ("BF16",)  # stored dtypes accepted for PLAIN storage

    @property
    def bare(self) -> bool:
        """Bare tensors are stored under ``name`` itself; modules under ``name.weight``."""
        return self.role in (Role.FP32, Role.INDEX)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a file must hold."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    part: str  # "weight", "scale", "weight_scale", "weight_scale_2", "input_scale", "" (bare)

    def describe(self) -> str:
        return f"{'|'.join(self.dtypes)} {list(self.shape)}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(p: str, layer: int, ratio: int, d: Dims, hash_layer: bool, out: list[Module]) -> None:
    h, hc = d.hidden, d.hc_mult
    mix = (2 + hc) * hc
    out += [Module(f"{p}attn_norm", Role.NORM, (h,)), Module(f"{p}ffn_norm", Role.NORM, (h,))]
    for part in ("attn", "ffn"):
        out += [Module(f"{p}hc_{part}_fn", Role.FP32, (mix, hc * h), ("F32",)),
                Module(f"{p}hc_{part}_base", Role.FP32, (mix,), ("F32",)),
                Module(f"{p}hc_{part}_scale", Role.FP32, (3,), ("F32",))]
    a, hd = f"{p}attn.", d.head_dim
    out += [
        Module(f"{a}wq_a", Role.DENSE, (d.q_lora, h)),
        Module(f"{a}q_norm", Role.NORM, (d.q_lora,)),
        Module(f"{a}wq_b", Role.DENSE, (d.n_heads * hd, d.q_lora)),
        Module(f"{a}wkv", Role.DENSE, (hd, h)),
        Module(f"{a}kv_norm", Role.NORM, (hd,)),
        Module(f"{a}wo_a", Role.DENSE, (d.o_groups * d.o_lora, d.n_heads * hd // d.o_groups)),
        Module(f"{a}wo_b", Role.DENSE, (h, d.o_groups * d.o_lora)),
        Module(f"{a}attn_sink", Role.FP32, (d.n_heads,), ("F32",)),
    ]

    def compressor(c: str, dim: int) -> None:
        coff = 2 if ratio == 4 else 1
        out.extend([Module(f"{c}wkv", Role.BF16_LINEAR, (coff * dim, h)),
                    Module(f"{c}wgate", Role.BF16_LINEAR, (coff * dim, h)),
                    Module(f"{c}ape", Role.FP32, (ratio, coff * dim), ("F32",)),
                    Module(f"{c}norm", Role.NORM, (dim,))])

    if ratio > 1:
        compressor(f"{a}compressor.", hd)
    if ratio == 4:
        ih, idim = d.index_heads, d.index_head_dim
        out += [Module(f"{a}indexer.wq_b", Role.DENSE, (ih * idim, d.q_lora)),
                Module(f"{a}indexer.weights_proj", Role.BF16_LINEAR, (ih, h))]
        compressor(f"{a}indexer.compressor.", idim)
    f = f"{p}ffn."
    out.append(Module(f"{f}gate", Role.BF16_LINEAR, (d.n_experts, h)))
    if hash_layer:
        out.append(Module(f"{f}gate.tid2eid", Role.INDEX, (d.vocab, d.topk), ("I64", "I32")))
    else:
        out.append(Module(f"{f}gate.bias", Role.FP32, (d.n_experts,), ("F32",)))
    i = d.moe_inter
    for e in range(d.n_experts):
        out += [Module(f"{f}experts.{e}.w1", Role.EXPERT, (i, h)),
                Module(f"{f}experts.{e}.w2", Role.EXPERT, (h, i)),
                Module(f"{f}experts.{e}.w3", Role.EXPERT, (i, h))]
    s = i * d.n_shared
    out += [Module(f"{f}shared_experts.w1", Role.DENSE, (s, h)),
            Module(f"{f}shared_experts.w2", Role.DENSE, (h, s)),
            Module(f"{f}shared_experts.w3", Role.DENSE, (s, h))]


def _hc_head(p: str, d: Dims, out: list[Module]) -> None:
    out += [Module(f"{p}hc_head_fn", Role.FP32, (d.hc_mult, d.hc_mult * d.hidden), ("F32",)),
            Module(f"{p}hc_head_base", Role.FP32, (d.hc_mult,), ("F32",)),
            Module(f"{p}hc_head_scale", Role.FP32, (1,), ("F32",))]


def modules(d: Dims, mtp: bool = True) -> list[Module]:
    """Every module of the model in DeepSeek names (``mtp.*`` iff ``mtp`` and the config has it)."""
    out: list[Module] = [Module("embed", Role.BF16_LINEAR, (d.vocab, d.hidden))]
    for layer in range(d.n_layers):
        _block(f"layers.{layer}.", layer, d.ratios[layer], d, layer < d.n_hash, out)
    out += [Module("norm", Role.NORM, (d.hidden,)),
            Module("head", Role.BF16_LINEAR, (d.vocab, d.hidden))]
    _hc_head("", d, out)
    if mtp:
        for k, ratio in enumerate(d.mtp_ratios):
            p, h = f"mtp.{k}.", d.hidden
            out += [Module(f"{p}e_proj", Role.DENSE, (h, h)),
                    Module(f"{p}h_proj", Role.DENSE, (h, h)),
                    Module(f"{p}enorm", Role.NORM, (h,)), Module(f"{p}hnorm", Role.NORM, (h,)),
                    Module(f"{p}norm", Role.NORM, (h,))]
            _hc_head(p, d, out)
            _block(p, d.n_layers + k, ratio, d, False, out)
    return out


def expand(storage: Storage, m: Module, name: str | None = None) -> list[TensorSpec]:
    """The tensors of module ``m`` stored as ``storage``, under ``name`` (default ``m.name``)."""
    base = m.name if name is None else name
    if m.bare:
        return [TensorSpec(base, m.dtypes, m.shape, "")]
    if storage is Storage.PLAIN:
        return [TensorSpec(f"{base}.weight", m.dtypes, m.shape, "weight")]
    if storage is Storage.BF16:
        return [TensorSpec(f"{base}.weight", ("BF16",), m.shape, "weight")]
    n, k = m.shape
    if storage is Storage.FP8_BLOCK:
        return [TensorSpec(f"{base}.weight", ("F8_E4M3",), (n, k), "weight"),
                TensorSpec(f"{base}.scale", ("F8_E8M0",),
                           (_cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK)), "scale")]
    if storage is Storage.MXFP4:
        return [TensorSpec(f"{base}.weight", ("I8",), (n, k // 2), "weight"),
                TensorSpec(f"{base}.scale", ("F8_E8M0",), (n, k // MXFP4_GROUP), "scale")]
    if storage is Storage.NVFP4:
        return [TensorSpec(f"{base}.weight", ("U8",), (n, k // 2), "weight"),
                TensorSpec(f"{base}.weight_scale", ("F8_E4M3",), (n, k // NVFP4_GROUP),
                           "weight_scale"),
                TensorSpec(f"{base}.weight_scale_2", ("F32",), (), "weight_scale_2"),
                TensorSpec(f"{base}.input_scale", ("F32",), (), "input_scale")]
    raise ValueError(storage)


# The part names: the last component of a tensor name, after its module's name.
# The only copy; storage_suffixes, verify, inspect and the layout-C stream read them.
PLAIN_PARTS = ("weight",)
BLOCK_PARTS = ("weight", "scale")  # FP8 128x128 blocks and MXFP4: one UE8M0 scale tensor
NVFP4_PARTS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
ALL_PARTS = ("weight", "scale", "weight_scale", "weight_scale_2", "input_scale")


def storage_suffixes(storage: Storage) -> tuple[str, ...]:
    return {Storage.FP8_BLOCK: BLOCK_PARTS, Storage.MXFP4: BLOCK_PARTS,
            Storage.NVFP4: NVFP4_PARTS,
            Storage.BF16: PLAIN_PARTS, Storage.PLAIN: PLAIN_PARTS}[storage]


_EXPERT_RE = re.compile(
    r"^(?P<block>(?:layers|mtp)\.\d+)\.ffn\.experts\.(?P<e>\d+)\.w(?P<w>[123])$")


class ExpertKey(NamedTuple):
    """One routed-expert linear, by its DeepSeek module name's parts.

    ``layers.3.ffn.experts.7.w1`` is ``ExpertKey("layers.3", 7, 1)``.
    """

    block: str  # "layers.N" or "mtp.N"
    expert: int
    proj: int  # DeepSeek's w1 (gate), w2 (down) or w3 (up): 1, 2 or 3

    @property
    def gate_or_up(self) -> bool:
        """w1 or w3: the two halves of the fused w13 GEMM, which share one ``weight_scale_2``."""
        return self.proj in (1, 3)

    @property
    def expert_id(self) -> tuple[str, int]:
        """``(block, expert)``: what an expert's w1, w2 and w3 have in common."""
        return self.block, self.expert


def expert_key(name: str) -> ExpertKey | None:
    """The :class:`ExpertKey` of a routed-expert module name, else None."""
    m = _EXPERT_RE.match(name)
    return ExpertKey(m.group("block"), int(m.group("e")), int(m.group("w"))) if m else None


def is_wo_a(name: str) -> bool:
    return name.endswith(".attn.wo_a")


_ROLE_RULES: tuple[tuple[re.Pattern[str], Role], ...] = tuple(
    (re.compile(p), r) for p, r in (
        (r"^(?:layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]$", Role.EXPERT),
        (r"^(?:layers|mtp)\.\d+\.attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)$", Role.DENSE),
        (r"^(?:layers|mtp)\.\d+\.ffn\.shared_experts\.w[123]$", Role.DENSE),
        (r"^mtp\.\d+\.(?:e_proj|h_proj)$", Role.DENSE),
        (r"^(?:layers|mtp)\.\d+\.attn\.(?:indexer\.)?compressor\.(?:wkv|wgate)$", Role.BF16_LINEAR),
        (r"^(?:layers|mtp)\.\d+\.attn\.indexer\.weights_proj$", Role.BF16_LINEAR),
        (r"^(?:layers|mtp)\.\d+\.ffn\.gate$", Role.BF16_LINEAR),
        (r"^(?:embed|head)$", Role.BF16_LINEAR),
        (r"^(?:.*\.)?(?:attn_norm|ffn_norm|q_norm|kv_norm|norm|enorm|hnorm)$", Role.NORM),
        (r"\.gate\.tid2eid$", Role.INDEX),
        (r"(?:^|\.)(?:hc_(?:attn|ffn|head)_(?:fn|base|scale)|attn_sink|ape|gate\.bias)$",
         Role.FP32),
    ))


def role_of(name: str) -> Role | None:
    """The role of a DeepSeek module (or bare tensor) name, from the name alone; None if unknown.

    Lets a caller with no config (the vLLM plugin converting one module at load
    time) decide what a module is; :func:`modules` assigns the same roles.
    """
    # Layer and expert indices only ever match a rule's ``\d+``, so the role depends on
    # the name's shape with them zeroed: searched once per shape, not once per tensor.
    return _role_of_shape(index_shape(name))


@cache
def _role_of_shape(shape: str) -> Role | None:
    for pat, role in _ROLE_RULES:
        if pat.search(shape):
            return role
    return None
