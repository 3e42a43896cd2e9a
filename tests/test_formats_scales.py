"""UE4M3 and UE8M0 scale codecs against ml_dtypes, every byte."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from dsv4_nvfp4.formats import (
    FormatError,
    decode_ue4m3,
    decode_ue8m0,
    encode_ue4m3,
    ue8m0_exponent_for_amax,
)

pytestmark = pytest.mark.cpu


def test_every_e4m3_byte_decodes_like_ml_dtypes():
    b = np.arange(256, dtype=np.uint8)
    theirs = torch.from_numpy(b.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    ours = decode_ue4m3(torch.from_numpy(b))
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert torch.equal(ours[~nan], theirs[~nan])
    assert ours[0x7E] == 448 and ours[0x01] == 2**-9 and ours[0x38] == 1.0


def test_e4m3_encode_rounds_like_ml_dtypes_in_range():
    # every E4M3 value, every midpoint between neighbours, and a nudge either side
    vals = decode_ue4m3(torch.arange(0, 0x7F, dtype=torch.uint8))
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, torch.nextafter(mids, torch.zeros_like(mids)),
                   torch.nextafter(mids, torch.full_like(mids, 1e9))])
    ours = encode_ue4m3(x).view(torch.uint8)
    theirs = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy())
    assert torch.equal(ours, theirs)


def test_e4m3_clamps_before_cast_where_ml_dtypes_gives_nan():
    x = torch.tensor([448.0, 464.0, 465.0, 1e6, float("inf")])
    ours = encode_ue4m3(x).view(torch.uint8)
    assert ours.tolist() == [0x7E] * 5
    theirs = x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tolist()
    assert theirs[2:] == [0x7F, 0x7F, 0x7F]  # NaN: why the clamp is explicit


def test_zero_block_policy_is_a_parameter():
    x = torch.tensor([0.0, 1.0])
    assert encode_ue4m3(x).view(torch.uint8).tolist() == [0x00, 0x38]
    assert encode_ue4m3(x, zero_value=1.0).view(torch.uint8).tolist() == [0x38, 0x38]


def test_negative_scale_is_an_error():
    with pytest.raises(FormatError, match="scale: expected non-negative"):
        encode_ue4m3(torch.tensor([-1.0]))


def test_every_ue8m0_byte_decodes_like_ml_dtypes_and_torch():
    b = np.arange(256, dtype=np.uint8)
    theirs = torch.from_numpy(b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ours = decode_ue8m0(torch.from_numpy(b))
    assert torch.isnan(ours[255]) and torch.isnan(theirs[255])
    assert torch.equal(ours[:255], theirs[:255])
    via_torch = torch.from_numpy(b).view(torch.float8_e8m0fnu)
    assert torch.equal(decode_ue8m0(via_torch)[:255], via_torch.float()[:255])
    assert ours[127] == 1.0 and ours[0] == 2.0**-127


@pytest.mark.parametrize(("amax", "elem_max", "k"), [
    (6.0, 6.0, 0), (6.000001, 6.0, 1), (3.0, 6.0, -1), (5.0, 6.0, 0), (448.0, 448.0, 0),
    (449.0, 448.0, 1), (0.0, 6.0, 0), (1e-30, 6.0, math.ceil(math.log2(1e-30 / 6))),
])
def test_ue8m0_round_up_rule(amax, elem_max, k):
    b = ue8m0_exponent_for_amax(torch.tensor([amax]), elem_max)
    assert int(b[0]) - 127 == k


def test_e4m3_bytes_decoded_as_ue8m0_are_detectably_wrong():
    """Regression: UE4M3 block scales decoded as UE8M0."""
    e4m3 = encode_ue4m3(torch.tensor([448.0, 1.0, 52.0]))
    right = decode_ue4m3(e4m3)
    wrong = decode_ue8m0(e4m3.view(torch.uint8))
    assert right.tolist() == [448.0, 1.0, 52.0]
    assert e4m3.view(torch.uint8).tolist() == [0x7E, 0x38, 0x65]
    assert wrong.tolist() == [0.5, 2.0**-71, 2.0**-26]
    # the same bug through float bits (b << 23, FlashInfer's UE8M0 path)
    bits = (e4m3.view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    assert not torch.allclose(bits, right)


def test_nan_scale_is_always_byte_0x7f():
    """The sign of a NaN differs between CPU and CUDA arithmetic; the scale byte must not."""
    x = torch.tensor([float("nan"), float("nan"), 1.0])
    x[1] = -x[1]
    assert [bool(v) for v in torch.signbit(x[:2])] == [False, True]
    assert encode_ue4m3(x).view(torch.uint8).tolist() == [0x7F, 0x7F, 0x38]
