"""Exact codecs for NVFP4, MXFP4, FP8 block scales and DeepGEMM layouts — torch only.

The single source of numeric truth of the package: kernels, converter and
plugin call these functions (or are tested bit-exact against them).
"""

from .constants import (
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    FP8_BLOCK,
    MXFP4_GROUP,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_GROUP,
    UE4M3_ONE,
    UE8M0_BIAS,
    UE8M0_NAN,
)
from .convert import ConversionError, mxfp4_to_nvfp4_lossless, nvfp4_to_bf16, nvfp4_to_fp8_block
from .deepgemm import (
    deinterleave_gate_up,
    from_mn_major,
    interleave_gate_up,
    nvfp4_sf_to_deepgemm,
    pack_sf_bytes_to_int32,
    to_mn_major_tma_aligned,
    transform_nvfp4_for_mega_moe,
    unpack_sf_int32_to_bytes,
    untransform_nvfp4_from_mega_moe,
    utccp_transpose_sf,
    utccp_untranspose_sf,
)
from .e2m1 import dequant_e2m1_packed, e2m1_decode, e2m1_encode, e2m1_table, pack_e2m1, unpack_e2m1
from .errors import FormatError
from .fp8_block import ScaleFormat, decode_fp8_block_scale, dequantize_fp8_block, quantize_fp8_block
from .mega_moe_reference import (
    mega_moe_stage_inputs,
    mega_moe_stage_tokens,
    nvfp4_mega_moe_reference,
)
from .mxfp4 import dequantize_mxfp4, quantize_mxfp4
from .nvfp4 import (
    NVFP4Tensor,
    dequantize_nvfp4,
    nvfp4_global_scale_from_amax,
    quantize_nvfp4_activation_per_token,
    quantize_nvfp4_activation_static,
    quantize_nvfp4_weight,
)
from .scales import (
    as_e4m3,
    decode_ue4m3,
    decode_ue8m0,
    encode_ue4m3,
    ue8m0_bytes,
    ue8m0_exponent_for_amax,
)

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "E4M3_MIN_SUBNORMAL",
    "FP8_BLOCK",
    "MXFP4_GROUP",
    "NVFP4_GLOBAL_DIVISOR",
    "NVFP4_GROUP",
    "UE4M3_ONE",
    "UE8M0_BIAS",
    "UE8M0_NAN",
    "ConversionError",
    "FormatError",
    "NVFP4Tensor",
    "ScaleFormat",
    "as_e4m3",
    "decode_fp8_block_scale",
    "decode_ue4m3",
    "decode_ue8m0",
    "deinterleave_gate_up",
    "dequant_e2m1_packed",
    "dequantize_fp8_block",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "e2m1_decode",
    "e2m1_encode",
    "e2m1_table",
    "encode_ue4m3",
    "from_mn_major",
    "interleave_gate_up",
    "mega_moe_stage_inputs",
    "mega_moe_stage_tokens",
    "mxfp4_to_nvfp4_lossless",
    "nvfp4_global_scale_from_amax",
    "nvfp4_mega_moe_reference",
    "nvfp4_sf_to_deepgemm",
    "nvfp4_to_bf16",
    "nvfp4_to_fp8_block",
    "pack_e2m1",
    "pack_sf_bytes_to_int32",
    "quantize_fp8_block",
    "quantize_mxfp4",
    "quantize_nvfp4_activation_per_token",
    "quantize_nvfp4_activation_static",
    "quantize_nvfp4_weight",
    "to_mn_major_tma_aligned",
    "transform_nvfp4_for_mega_moe",
    "ue8m0_bytes",
    "ue8m0_exponent_for_amax",
    "unpack_e2m1",
    "unpack_sf_int32_to_bytes",
    "untransform_nvfp4_from_mega_moe",
    "utccp_transpose_sf",
    "utccp_untranspose_sf",
]
