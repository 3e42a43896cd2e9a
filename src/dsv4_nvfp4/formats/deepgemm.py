"""Scale-factor and weight layouts read by DeepGEMM's SM100 kernels (NVFP4 mega-MoE).

Reference: vLLM 0.34.0, ``vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py``:
the layouts ``DeepGemmMegaMoEExperts`` (``weight_format=MEGA_MOE_NVFP4``) writes
at load time for the vendored DeepGEMM 2.8.1 ``nvfp4_mega_moe`` —
``_register_weight`` (int32 SF parameters, MN-major), ``_pack_scale`` (four E4M3
bytes per int32 along K) and ``_kernel_layout_shard`` (gate/up interleave by 8
rows, UTCCP transpose of SF rows). vLLM writes them checkpoint shard by shard;
:func:`transform_nvfp4_for_mega_moe` gives the same bytes (and strides, where
``MN % 4 == 0``) from stacked experts. They are also the layouts of upstream
DeepGEMM 2.8.0 (commit 0274ad7b: ``deep_gemm/mega/__init__.py``
``_interleave_weights``, ``_transpose_sf_for_utccp``), from which they were first
derived. Re-derived, not copied; each transform has a named inverse and a
round-trip test.

Layouts:

* **SF word** — four one-byte scales (UE4M3 for NVFP4, UE8M0 for MX) in one
  int32 along K: byte ``i`` of word ``j`` is group ``4j+i`` (little-endian).
  Packing is a byte view, so no shift by ≥ 32 can exist (shifting an int32 by
  32 to place bytes 4..7 is undefined behaviour, a known way to corrupt scales).
* **MN-major, TMA-aligned** — SF ``[..., MN, W]`` with ``stride(-2) == 1`` and
  ``stride(-1) == align(MN, 4)`` (16-byte TMA rows of int32; vLLM allocates
  ``stride(-1) == MN``, the same wherever ``MN % 4 == 0``, as at DeepSeek V4 shapes).
* **Gate/up interleave** — L1 ``[E, 2I, ...]`` rows become
  ``[gate 0..7, up 0..7, gate 8..15, up 8..15, ...]`` (granularity 8) so one
  UMMA tile holds matching gate and up rows for the fused SwiGLU (vLLM: row ``r``
  of w1 (``half = 0``) or w3 (``half = 1``) → ``(r // 8) * 16 + 8 * half + r % 8``).
  SGLang's fork uses a different even/odd pattern for its ``nvfp4xnvfp4`` kind.
* **UTCCP transpose** — within each 128-row group of SF words, new row
  ``4i + j`` = old row ``32j + i`` (the 4×32 → 32×4 order the tensor-memory
  copy ``SM100_UTCCP_4x32dp128bit`` reads); L1 SFs are interleaved first, which
  vLLM writes in one step: w1/w3 SF row ``64b + 16j + 8q + m`` →
  ``128b + 64q + 32·half + 4m + j``.
"""

from __future__ import annotations

import sys

import torch

from .constants import NVFP4_GROUP
from .errors import expect
from .scales import as_e4m3

MEGA_MOE_INTERLEAVE = 8  # rows of gate, then of up, per interleave step
UTCCP_ROWS = 128  # SF rows per UTCCP group
TMA_ALIGN_INT32 = 4  # 16 bytes / sizeof(int32)
SF_PER_WORD = 4


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _sf_bytes(sf: torch.Tensor) -> torch.Tensor:
    if sf.dtype == torch.uint8:
        return sf
    expect(sf.element_size() == 1, "sf", "one-byte scales (uint8, e4m3, e8m0)", sf.dtype)
    return sf.view(torch.uint8)


def pack_sf_bytes_to_int32(sf: torch.Tensor) -> torch.Tensor:
    """One-byte scales ``[..., MN, G]`` → int32 words ``[..., MN, ceil(G/4)]`` (zero-padded)."""
    assert sys.byteorder == "little", "SF packing assumes a little-endian host"
    b = _sf_bytes(sf)
    g = b.shape[-1]
    pad = (-g) % SF_PER_WORD
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return b.contiguous().view(torch.int32)


def unpack_sf_int32_to_bytes(sf: torch.Tensor, num_groups: int | None = None) -> torch.Tensor:
    """int32 words ``[..., MN, W]`` → bytes ``[..., MN, num_groups]`` (default ``4W``)."""
    expect(sf.dtype == torch.int32, "sf", "int32", sf.dtype)
    # A fresh row-major copy: ``contiguous()`` keeps an MN-major ``[..., MN, 1]`` as is
    # (a size-1 dim counts as contiguous), and the byte view needs stride(-1) == 1.
    b = sf.new_empty(sf.shape).copy_(sf).view(torch.uint8)
    n = b.shape[-1] if num_groups is None else num_groups
    expect(n <= b.shape[-1], "num_groups", f"<= {b.shape[-1]}", n)
    return b[..., :n].contiguous()


def to_mn_major_tma_aligned(sf: torch.Tensor) -> torch.Tensor:
    """Same values, MN-major: ``stride(-2) == 1``, ``stride(-1) == align(MN, 4)``."""
    expect(sf.dim() in (2, 3), "sf", "2-D or 3-D", tuple(sf.shape))
    mn, w = sf.shape[-2], sf.shape[-1]
    amn = _align(mn, TMA_ALIGN_INT32)
    storage = torch.zeros((*sf.shape[:-2], w, amn), dtype=sf.dtype, device=sf.device)
    out = storage.transpose(-1, -2)[..., :mn, :]
    out.copy_(sf)
    return out


def from_mn_major(sf: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_mn_major_tma_aligned`: a contiguous (K-major) copy."""
    return sf.contiguous()


def interleave_gate_up(t: torch.Tensor, gran: int = MEGA_MOE_INTERLEAVE) -> torch.Tensor:
    """``[E, 2I, ...]`` rows ``[gate | up]`` → ``[g0..7, u0..7, g8..15, u8..15, ...]``.

    The result keeps ``t``'s memory format (an MN-major SF stays MN-major).
    """
    expect(t.dim() >= 2, "t", "[E, 2I, ...]", tuple(t.shape))
    e, n = t.shape[0], t.shape[1]
    expect(n % (2 * gran) == 0, "t", f"dim 1 a multiple of {2 * gran}", tuple(t.shape))
    half = n // 2
    rest = t.shape[2:]
    gate = t[:, :half].reshape(e, half // gran, gran, *rest)
    up = t[:, half:].reshape(e, half // gran, gran, *rest)
    out = torch.empty_like(t)
    out.copy_(torch.stack([gate, up], dim=2).reshape(e, n, *rest))
    return out


def deinterleave_gate_up(t: torch.Tensor, gran: int = MEGA_MOE_INTERLEAVE) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up`."""
    expect(t.dim() >= 2, "t", "[E, 2I, ...]", tuple(t.shape))
    e, n = t.shape[0], t.shape[1]
    expect(n % (2 * gran) == 0, "t", f"dim 1 a multiple of {2 * gran}", tuple(t.shape))
    rest = t.shape[2:]
    pairs = t.reshape(e, n // (2 * gran), 2, gran, *rest)
    out = torch.empty_like(t)
    out.copy_(torch.cat([pairs[:, :, 0].reshape(e, n // 2, *rest),
                         pairs[:, :, 1].reshape(e, n // 2, *rest)], dim=1))
    return out


def _utccp_swap(sf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """SF words ``[E, MN, W]``: each 128-row group read as ``[rows, cols]``, transposed."""
    expect(sf.dim() == 3, "sf", "[E, MN, W]", tuple(sf.shape))
    e, mn, w = sf.shape
    expect(mn % UTCCP_ROWS == 0, "sf", f"MN a multiple of {UTCCP_ROWS}", mn)
    out = torch.empty_like(sf)
    out.copy_(sf.reshape(e, mn // UTCCP_ROWS, rows, cols, w).transpose(2, 3).reshape(e, mn, w))
    return out


def utccp_transpose_sf(sf: torch.Tensor) -> torch.Tensor:
    """SF words ``[E, MN, W]``: in each 128-row group, new row ``4i+j`` = old row ``32j+i``."""
    return _utccp_swap(sf, 4, 32)


def utccp_untranspose_sf(sf: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`utccp_transpose_sf`."""
    return _utccp_swap(sf, 32, 4)


def nvfp4_sf_to_deepgemm(sf: torch.Tensor) -> torch.Tensor:
    """UE4M3 block scales ``[E, MN, K/16]`` → int32 ``[E, MN, K/64]``, MN-major, TMA-aligned."""
    return to_mn_major_tma_aligned(pack_sf_bytes_to_int32(as_e4m3(sf, "sf")))


def transform_nvfp4_for_mega_moe(
    w13: torch.Tensor, w13_sf: torch.Tensor, w2: torch.Tensor, w2_sf: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Stacked ModelOpt NVFP4 experts → the weight operands of DeepGEMM ``nvfp4_mega_moe``.

    The same bytes (and strides, where ``2I % 4 == 0`` and ``H % 4 == 0``) as the
    ``w13_weight``, ``w13_weight_scale``, ``w2_weight`` and ``w2_weight_scale``
    parameters that vLLM 0.34.0's ``DeepGemmMegaMoEExperts`` (``MEGA_MOE_NVFP4``)
    loads from the same checkpoint tensors.

    Inputs (checkpoint layout, w13 = [w1 (gate); w3 (up)] stacked per expert):
      w13 uint8 ``[E, 2I, H/2]``, w13_sf e4m3 ``[E, 2I, H/16]``,
      w2 uint8 ``[E, H, I/2]``,   w2_sf e4m3 ``[E, H, I/16]``.
    Outputs: ``((l1 int8 [E, 2I, H/2], l1_sf int32 [E, 2I, H/64]),
    (l2 int8 [E, H, I/2], l2_sf int32 [E, H, I/64]))``; SFs MN-major. L1 rows
    (weights and SF) gate/up-interleaved, both SFs UTCCP-transposed; L2
    weights unchanged. Global scales are not touched: they go to the kernel's
    per-expert alphas (``l1_alpha``, ``l2_alpha``), never into these bytes.
    """
    for name, w, sf in (("w13", w13, w13_sf), ("w2", w2, w2_sf)):
        expect(w.dim() == 3, name, "[E, N, K/2]", tuple(w.shape))
        expect(w.dtype in (torch.uint8, torch.int8), name, "uint8 packed E2M1", w.dtype)
        want = (w.shape[0], w.shape[1], w.shape[2] * 2 // NVFP4_GROUP)
        expect(tuple(sf.shape) == want, f"{name}_sf", f"shape {want}", tuple(sf.shape))
    l1 = interleave_gate_up(w13.view(torch.int8))
    l1_sf = utccp_transpose_sf(interleave_gate_up(nvfp4_sf_to_deepgemm(w13_sf)))
    l2 = w2.view(torch.int8)
    l2_sf = utccp_transpose_sf(nvfp4_sf_to_deepgemm(w2_sf))
    return (l1, l1_sf), (l2, l2_sf)


def untransform_nvfp4_from_mega_moe(
    l1: tuple[torch.Tensor, torch.Tensor], l2: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`transform_nvfp4_for_mega_moe` → (w13, w13_sf, w2, w2_sf)."""
    (l1_w, l1_sf), (l2_w, l2_sf) = l1, l2
    w13 = deinterleave_gate_up(l1_w).view(torch.uint8).contiguous()
    g13 = l1_w.shape[2] * 2 // NVFP4_GROUP
    sf13 = unpack_sf_int32_to_bytes(from_mn_major(deinterleave_gate_up(
        utccp_untranspose_sf(l1_sf))), g13).view(torch.float8_e4m3fn)
    w2 = l2_w.view(torch.uint8).contiguous()
    g2 = l2_w.shape[2] * 2 // NVFP4_GROUP
    sf2 = unpack_sf_int32_to_bytes(from_mn_major(utccp_untranspose_sf(l2_sf)), g2).view(
        torch.float8_e4m3fn)
    return w13, sf13, w2, sf2
