"""A CPU kernel for ModelOpt's NVFP4 fake quantization, for dry runs on tiny models.

Why: ModelOpt registers ``tensorrt::dynamic_block_quantize_op`` for CPU and
CUDA, but its body asserts ``amax.is_cuda`` for E4M3-scaled blocks, so any
forward through an enabled NVFP4 quantizer fails on CPU — the post-calibration
forward and the dummy forward that ``export_hf_checkpoint`` runs to share
scales between linears that read one input. Calibration itself (max of
``|x|``) never calls it. This module registers a CPU kernel for that op that
fake-quantizes with :mod:`dsv4_nvfp4.formats` (ModelOpt-exact NVFP4: global
scale ``amax/2688``, E4M3 scale per 16, E2M1 round-to-nearest-even), so the
whole quantize → export → convert chain runs on a CPU-only machine (CI, and
``--device-map cpu`` dry runs on tiny checkpoints). It is never installed when
the model is on a GPU; the H100 run uses ModelOpt's own CUDA kernel.
"""

from __future__ import annotations

import torch

from ..formats import NVFP4_GLOBAL_DIVISOR, NVFP4_GROUP, quantize_nvfp4_weight

_LIBRARY: torch.library.Library | None = None


def _fake_quant_cpu(inputs: torch.Tensor, block_size: int, amax: torch.Tensor, num_bits: int,
                    exponent_bits: int, scale_num_bits: int,
                    scale_exponent_bits: int) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``inputs`` along its last dimension (blocks of 16)."""
    if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
        raise NotImplementedError(
            "CPU fake quant supports NVFP4 only (E2M1 values, E4M3 scales); found "
            f"num_bits={num_bits} exponent_bits={exponent_bits} "
            f"scale_bits={scale_num_bits}/{scale_exponent_bits}")
    if block_size != NVFP4_GROUP:
        raise NotImplementedError(f"CPU fake quant: block size {NVFP4_GROUP}, found {block_size}")
    global_amax = amax.float().amax()
    if not bool(global_amax > 0):
        return torch.zeros_like(inputs)
    flat = inputs.reshape(-1, inputs.shape[-1])
    q = quantize_nvfp4_weight(flat, global_scale=global_amax / NVFP4_GLOBAL_DIVISOR)
    return q.dequantize(torch.float32).reshape(inputs.shape).to(inputs.dtype)


def install() -> None:
    """Register the CPU kernel (idempotent). Import ModelOpt first: it defines the op."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import warnings

    import modelopt.torch.quantization.tensor_quant  # noqa: F401  (defines tensorrt::*)

    lib = torch.library.Library("tensorrt", "IMPL")
    with warnings.catch_warnings():
        # Replacing ModelOpt's CPU kernel is the point; torch warns on any override.
        warnings.simplefilter("ignore")
        lib.impl("dynamic_block_quantize_op", _fake_quant_cpu, "CPU")
    _LIBRARY = lib
