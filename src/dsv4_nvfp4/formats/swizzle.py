"""Scale-factor layouts as an enum, and the CUTLASS SM100 128×4 swizzle.

Checkpoints store scales *linear* (row-major ``[M, K/16]``); FlashInfer /
CUTLASS / cuBLASLt block-scaled GEMMs read the 128×4 "SfAtom" swizzle
(CUTLASS ``sm100_blockscaled_layout.hpp`` ``SfKMajorAtom``); DeepGEMM reads
int32 words MN-major (:mod:`.deepgemm`). Byte offset of scale (m, k) in the
128×4 layout with ``nKT = ceil(K_groups/4)``::

    (m // 128)·nKT·512 + (k // 4)·512 + (m % 32)·16 + ((m % 128) // 32)·4 + k % 4

M is padded to a multiple of 128 and the group count to a multiple of 4, with zeros.
"""

from __future__ import annotations

import enum

import torch

from .errors import expect


class SfLayout(enum.Enum):
    """Where the bytes of a block-scale tensor sit."""

    LINEAR = "linear"  # row-major [M, G]: checkpoints
    SWIZZLED_128X4 = "128x4"  # CUTLASS SM100 SfAtom: FlashInfer / cuBLASLt
    DEEPGEMM_MN_MAJOR = "deepgemm"  # int32 words of 4, MN-major, TMA-aligned


def swizzle_128x4_offset(m: int, k: int, num_k_groups: int) -> int:
    """Byte offset of scale (row ``m``, group ``k``) in the 128×4 layout."""
    n_kt = -(-num_k_groups // 4)
    return ((m // 128) * n_kt * 512 + (k // 4) * 512 + (m % 32) * 16
            + ((m % 128) // 32) * 4 + (k % 4))


def swizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """Linear ``[M, G]`` one-byte scales → flat swizzled bytes (padded, zeros in the pad)."""
    expect(sf.dim() == 2, "sf", "[M, G]", tuple(sf.shape))
    b = sf.view(torch.uint8) if sf.dtype != torch.uint8 else sf
    m, g = b.shape
    pm, pg = (-m) % 128, (-g) % 4
    p = torch.nn.functional.pad(b, (0, pg, 0, pm))
    mt, kt = p.shape[0] // 128, p.shape[1] // 4
    return p.reshape(mt, 4, 32, kt, 4).permute(0, 3, 2, 1, 4).reshape(-1).contiguous()


def unswizzle_128x4(flat: torch.Tensor, m: int, g: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_128x4`: flat bytes → linear uint8 ``[m, g]``."""
    mt, kt = -(-m // 128), -(-g // 4)
    expect(flat.numel() == mt * kt * 512, "flat", f"{mt * kt * 512} bytes", flat.numel())
    b = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    p = b.reshape(mt, kt, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)
    return p[:m, :g].contiguous()
