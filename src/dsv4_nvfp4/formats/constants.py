"""Every format constant in one place, with its value and where it comes from.

Sources: OCP Microscaling Formats v1.0 (E2M1, E8M0), NVIDIA PTX ISA / CUDA
``__nv_fp8_e4m3`` (E4M3FN), NVIDIA ModelOpt ``NVFP4QTensor`` (the 6·448 global
divisor and the 2⁻⁹ block-scale floor), DeepSeek V4 checkpoints (128×128 FP8
blocks, MXFP4 group 32).
"""

from __future__ import annotations

# --- E2M1 (FP4): 1 sign, 2 exponent, 1 mantissa bit; no inf, no NaN ---------------
E2M1_MAX = 6.0  # largest magnitude, code 0b0111
# Magnitudes of codes 0..7; codes 8..15 are the same with the sign bit (bit 3) set.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)  # code 8 is -0.0
E2M1_SIGN_BIT = 0x8
# Rounding thresholds between neighbouring magnitudes; a value exactly on a
# threshold goes to the neighbour with the even code (round half to even).
E2M1_TIE_DOWN_THRESHOLDS = (0.25, 1.25, 2.5, 5.0)  # midpoint -> lower (even) code
E2M1_TIE_UP_THRESHOLDS = (0.75, 1.75, 3.5)  # midpoint -> upper (even) code
E2M1_NAN_CODE = 0x7  # our NaN policy: NaN -> +6 (ModelOpt's _cast_fp4 does the same)

# --- E4M3FN (float8_e4m3fn), used unsigned as the NVFP4 block scale "UE4M3" -------
E4M3_MAX = 448.0  # byte 0x7E
E4M3_MIN_SUBNORMAL = 2.0**-9  # byte 0x01
E4M3_MIN_NORMAL = 2.0**-6  # byte 0x08
E4M3_NAN_BYTES = (0x7F, 0xFF)  # the only NaN encodings; E4M3FN has no inf
UE4M3_ONE = 0x38  # 1.0: ModelOpt's value for all-zero weight blocks

# --- UE8M0 (float8_e8m0fnu): 8 exponent bits, bias 127, no zero, 0xFF = NaN -----
UE8M0_BIAS = 127
UE8M0_NAN = 0xFF
UE8M0_ONE = 0x7F  # 2**0

# --- Block sizes -----------------------------------------------------------------
NVFP4_GROUP = 16  # elements per UE4M3 block scale, along K
MXFP4_GROUP = 32  # elements per UE8M0 block scale, along K (OCP MX)
FP8_BLOCK = 128  # DeepSeek FP8 weights: one scale per 128x128 tile

# --- NVFP4 two-level scaling -------------------------------------------------------
# weight_scale_2 = amax / (E2M1_MAX * E4M3_MAX): the tensor amax maps to block scale 448.
NVFP4_GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688.0
# ModelOpt clamps weight block scales into [2**-9, 448] before the E4M3 cast.
NVFP4_WEIGHT_SCALE_MIN = E4M3_MIN_SUBNORMAL
# SGLang DeepGEMM fork, per-token activation scale floor: max(row_amax, 1e-4) / 2688.
PER_TOKEN_AMAX_FLOOR = 1e-4
# vLLM 0.34.0's NVFP4 MegaMoE token-scale floor (prepare_megamoe.py's staging):
# x_scale = max(row_amax, 1e-12) * fp32(1/2688), a different floor from the one above.
MEGA_MOE_TOKEN_AMAX_FLOOR = 1e-12
