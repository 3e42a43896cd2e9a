"""NVFP4 → BF16 dequant kernel vs formats, bit for bit, in Triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch
from bitwise import assert_bitwise_equal
from interpreted import interpreter_guard

from dsv4_nvfp4.formats import FormatError, dequantize_nvfp4, quantize_nvfp4_weight
from dsv4_nvfp4.kernels.interpret import InterpreterUnavailable, load_interpreted

try:
    kernels = load_interpreted()
except InterpreterUnavailable:  # triton came first in this pytest process
    kernels = None

pytestmark = pytest.mark.cpu


_interpreter, test_fresh_process = interpreter_guard(kernels, __file__)


def assert_same_bf16(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise, except that any NaN matches any NaN (torch's casts pick different NaN bits)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    assert_bitwise_equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16), what)


def reference(packed, block_scale, global_scale) -> torch.Tensor:
    return dequantize_nvfp4(packed, block_scale, global_scale, dtype=torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (64, 512), (33, 3072), (3, 5, 256)])
def test_matches_formats_on_modelopt_weights(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    t = quantize_nvfp4_weight(w)
    got = kernels.dequantize_nvfp4_to_bf16(t.packed, t.block_scale, t.global_scale)
    assert_same_bf16(got, reference(t.packed, t.block_scale, t.global_scale), "bf16 weight")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("global_scale", [1.0, 2.0**-10, 3.7e-5, 1e30, 0.0, -1.5])
def test_every_packed_byte_with_every_scale_byte(global_scale: float) -> None:
    """Row r uses scale byte r for all its groups and holds all 256 packed bytes."""
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(256, 1)  # [256, 256]
    sf = torch.arange(256, dtype=torch.int32).to(torch.uint8)[:, None].repeat(1, 32)
    block_scale = sf.view(torch.float8_e4m3fn)
    got = kernels.dequantize_nvfp4_to_bf16(packed, block_scale, global_scale)
    assert_same_bf16(got, reference(packed, block_scale, global_scale), "bf16 (all byte pairs)")


def test_spelled_out_values() -> None:
    # bytes 0x21 → (1: 0.5, 2: 1.0), 0xF7 → (7: 6, 15: -6), 0x08 → (-0.0, 0); scale 0x38 = 1.0
    packed = torch.tensor([[0x21, 0xF7, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00]], dtype=torch.uint8)
    block_scale = torch.tensor([[0x38]], dtype=torch.uint8)
    got = kernels.dequantize_nvfp4_to_bf16(packed, block_scale, 2.0)
    assert got[0, :6].float().tolist() == [1.0, 2.0, 12.0, -12.0, -0.0, 0.0]
    assert int(got[0, 4].view(torch.int16)) == -32768  # -0.0 keeps its sign bit


def test_scale_as_tensor_and_out_buffer() -> None:
    t = quantize_nvfp4_weight(torch.randn(16, 256))
    out = torch.full((16, 256), float("nan"), dtype=torch.bfloat16)
    res = kernels.dequantize_nvfp4_to_bf16(t.packed.view(torch.int8), t.block_scale,
                                           t.global_scale.reshape(1), out=out)
    assert res is out
    assert_same_bf16(out, reference(t.packed, t.block_scale, t.global_scale), "into out")


@pytest.mark.parametrize(("rows", "block"), [(1, 16), (4, 64), (16, 256), (64, 32)])
def test_results_do_not_depend_on_the_tile(rows: int, block: int) -> None:
    t = quantize_nvfp4_weight(torch.randn(37, 256))
    got = kernels.dequantize_nvfp4_to_bf16(t.packed, t.block_scale, t.global_scale,
                                           config=kernels.TileConfig(rows=rows, block=block))
    assert_same_bf16(got, reference(t.packed, t.block_scale, t.global_scale), "bf16 weight")


def test_zero_rows() -> None:
    got = kernels.dequantize_nvfp4_to_bf16(torch.empty(0, 8, dtype=torch.uint8),
                                           torch.empty(0, 1, dtype=torch.uint8), 1.0)
    assert got.shape == (0, 16) and got.dtype == torch.bfloat16


@pytest.mark.parametrize(("args", "pattern"), [
    ((torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8)),
     r"^block_scale: expected shape \(4, 1\)"),
    ((torch.zeros(4, 8), torch.zeros(4, 1, dtype=torch.uint8)), r"^packed: expected uint8"),
    ((torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1)),
     r"^block_scale: expected float8_e4m3fn"),
    ((torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)),
     r"^block_scale: expected shape"),
])
def test_bad_input(args: tuple, pattern: str) -> None:
    with pytest.raises(FormatError, match=pattern):
        kernels.dequantize_nvfp4_to_bf16(*args, 1.0)


def test_bad_out_buffer() -> None:
    p, s = torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)
    with pytest.raises(FormatError, match=r"^out: expected dtype torch.bfloat16"):
        kernels.dequantize_nvfp4_to_bf16(p, s, 1.0, out=torch.zeros(4, 16))
    with pytest.raises(FormatError, match=r"^out: expected shape \(4, 16\)"):
        kernels.dequantize_nvfp4_to_bf16(p, s, 1.0, out=torch.zeros(4, 8, dtype=torch.bfloat16))
