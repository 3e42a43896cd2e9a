"""vLLM-compatible NVFP4 MegaMoE staging vs ``formats.mega_moe_stage_inputs``, in Triton's CPU
interpreter: every output buffer byte-identical.

The transcription is vLLM 0.34.0's ``prepare_megamoe_nvfp4_inputs`` (its GPU test compares
it and this kernel with vLLM's own kernel). Here: each E2M1 code point and tie of vLLM's
seven comparisons, the sign of values that round to zero, ±0, subnormals, rows below both
token-scale floors, ±inf and NaN rows, T = 0 (only ``l2_alpha`` written), padding,
both launch forms (whole rows, and one program per token and tile), fp16 input, and
calls the kernel leaves to vLLM named with their reason.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from interpreted import interpreter_guard

from dsv4_nvfp4.formats import FormatError, mega_moe_stage_inputs
from dsv4_nvfp4.kernels.interpret import InterpreterUnavailable, load_interpreted

try:
    kernels = load_interpreted()
except InterpreterUnavailable:  # triton came first in this pytest process
    kernels = None

pytestmark = pytest.mark.cpu
OUTPUTS = ("x", "x_sf", "x_scales", "topk_idx", "topk_weights", "l2_alpha")
E = 5
L2S = 0.37

_interpreter, test_fresh_process = interpreter_guard(kernels, __file__)


def stage(x: torch.Tensor, *, k: int = 6, pad: bool = True, l2: bool = True, **kw):
    t, h = x.shape
    g = torch.Generator().manual_seed(t * 31 + h)
    ids = torch.randint(0, 384, (t, k), dtype=torch.int32, generator=g)
    w = torch.rand(t, k, generator=g)
    padding = (torch.arange(t) % 3 == 1) if pad else None
    gs = torch.rand(E, generator=g) * 1e-3
    out = {"x": torch.full((t, h // 2), 0xAB, dtype=torch.uint8),
           "x_sf": torch.full((t, h // 64), 0x5A5A5A5A, dtype=torch.int32),
           "x_scales": torch.full((t,), float("nan")),
           "topk_idx": torch.full((t, k), -7, dtype=torch.int64),
           "topk_weights": torch.full((t, k), float("nan")),
           "l2_alpha": torch.full((E,), float("nan"))}
    kernels.stage_megamoe_nvfp4_inputs(
        x, w, ids, out["x"], out["x_sf"], out["x_scales"], out["topk_idx"], out["topk_weights"],
        is_padding=padding, w2_global_scale=gs if l2 else None,
        l2_alpha=out["l2_alpha"] if l2 else None, l2_activation_scale=L2S, **kw)
    ref = mega_moe_stage_inputs(x, w, ids, is_padding=padding,
                                w2_global_scale=gs if l2 else None, l2_activation_scale=L2S)
    return out, ref


def differing(out: dict, ref: dict) -> dict[str, int]:
    diff = {}
    for name in OUTPUTS:
        got, want = out[name], ref[name]
        if want is None:
            assert bool(torch.isnan(got).all()), f"{name} written without l2_alpha"
            diff[name] = 0
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, name
        diff[name] = int((got.contiguous().view(torch.uint8)
                          != want.contiguous().view(torch.uint8)).sum())
    return diff


def assert_identical(x: torch.Tensor, **kw) -> dict:
    out, ref = stage(x, **kw)
    assert differing(out, ref) == dict.fromkeys(OUTPUTS, 0)
    return out


def special_rows(h: int) -> torch.Tensor:
    """Rows: random over binades, with zeros and subnormals, below 1e-12, ±inf, NaN, all-NaN,
    a NaN block, all zero, bf16 max."""
    g = torch.Generator().manual_seed(h)
    x = torch.randn(12, h, generator=g) * torch.exp2(torch.randint(-20, 20, (12, 1),
                                                                   generator=g).float())
    x[1, ::5] = 0.0
    x[1, 1::7] = -0.0
    x[2, ::3] = 2.0**-130
    x[3] = torch.randn(h, generator=g) * 2.0**-50
    x[4, 7] = float("inf")
    x[5, 3] = -float("inf")
    x[6, 11] = float("nan")
    x[7] = float("nan")
    x[8, 16:32] = float("nan")
    x[9] = 0.0
    x[10, 0] = 3.3895313892515355e38
    x[11, 5] = float("nan")
    x[11, 9] = float("inf")
    return x.bfloat16()


@pytest.mark.parametrize("h", [128, 384, 7168])
@pytest.mark.parametrize("split", [False, True])
def test_special_rows(h: int, split: bool) -> None:
    assert_identical(special_rows(h), split=split)


def test_every_code_point_and_tie() -> None:
    """Values at each of vLLM's thresholds (0.25, 0.75, ..., 5) times the token scale and
    one fp32 step either side, both signs, beside the row's amax; -0 gets code 0."""
    xs = 2.0**-4
    mags = [0.0, 0.25, 0.2500001, 0.5, 0.75, 0.7499999, 1.0, 1.25, 1.2500001, 1.5, 1.75,
            1.7499999, 2.0, 2.5, 2.5000002, 3.0, 3.5, 3.4999998, 4.0, 5.0, 5.0000005, 6.0]
    row = torch.zeros(256)
    for i, m in enumerate(mags):
        row[i] = m * xs
        row[32 + i] = -m * xs
    row[32] = -0.0
    row[200] = 2688 * xs
    x = row.bfloat16()[None, :].repeat(3, 1)
    x[1] = -x[1]
    out = assert_identical(x)
    assert int(out["x"][0, 16]) & 0xF == 0  # -0: code 0, no sign


def test_quick_table_holds_at_every_scale() -> None:
    """The quick path's multipliers (checked at construction for one binade of ``xs`` and ``SF``)
    give vLLM's code at other binades too: exponents shifted on both, every bf16 ``x`` up to
    6.5 · SF · xs, vLLM's two IEEE divisions against the exact product ``x · C``."""
    ms = importlib.import_module("dsv4_nvfp4.kernels.megamoe_staging")
    tab = ms.quick_table()
    mult = tab[:129 * 8].view(torch.float32).reshape(129, 8).double()
    usable = tab[:129 * 8].reshape(129, 8) != 0
    flags = tab[129 * 8:129 * 9]
    assert int(flags[:128].sum()) == 84 and int(flags[128]) == 1
    assert bool(usable[flags.bool()].all())
    r = torch.tensor(1 / 2688, dtype=torch.float32)
    sig = torch.cat([1 + torch.arange(128, dtype=torch.float32) / 128,
                     torch.tensor([1e-12], dtype=torch.float32)])
    x = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x.float()  # every positive normal bf16
    for a, sh in ((-30, -9), (-3, 4), (0, 0), (11, -2), (40, 8)):
        amax = torch.where(torch.arange(129) < 128, sig * 2.0**a, sig)
        xs = (torch.clamp(amax, min=1e-12) * r)[:, None, None]
        sf = ((1 + torch.arange(8, dtype=torch.float32) / 8) * 2.0**sh)[None, :, None]
        ok = (x <= 6.5 * sf * xs) & (x >= 0.05 * sf * xs)
        want = ms._vllm_magnitude_codes((x / xs) / sf)
        c = mult * 2.0 ** (-(torch.where(torch.arange(129) < 128, a, 0)[:, None] + sh))
        got = ms._vllm_magnitude_codes(x.double() * c[..., None])
        assert int(((got != want) & ok & usable[..., None]).sum()) == 0, (a, sh)


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_on_the_thresholds(seed: int) -> None:
    """Blocks of values nearest every threshold ``T · SF · xs``, for row amax significands with
    a complete table row (the quick path) and without (vLLM's two divisions), and below the
    floor."""
    ms = importlib.import_module("dsv4_nvfp4.kernels.megamoe_staging")
    flags = ms.quick_table()[129 * 8:129 * 9]
    idx = [0, 1, 3, 5, 7, 10, 21, 42, 63, 64, 85, 96, 101, 127, 128,
           *range(30 + seed, 128, 17)]
    x = ms.threshold_rows(idx, 1024, seed=seed)
    assert torch.equal(ms.quick_rows(x), flags[idx] != 0)
    assert_identical(x, split=False)


def test_t0_writes_only_l2_alpha() -> None:
    out, ref = stage(torch.zeros(0, 256, dtype=torch.bfloat16))
    assert differing(out, ref) == dict.fromkeys(OUTPUTS, 0)
    assert not bool(torch.isnan(out["l2_alpha"]).any())


@pytest.mark.parametrize("t", [1, 3, 17])
def test_no_padding_no_l2_fp16_and_odd_tiles(t: int) -> None:
    g = torch.Generator().manual_seed(t)
    x = (torch.randn(t, 384, generator=g) * 100).half()
    assert_identical(x, pad=False, l2=False)
    assert_identical(x.bfloat16(), k=1, config=kernels.TileConfig(rows=2, block=128))
    assert_identical(x.bfloat16(), k=3, split=True, config=kernels.TileConfig(rows=1, block=128))


def test_unsupported_calls_are_named() -> None:
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    ids = torch.zeros(2, 6, dtype=torch.int32)
    w = torch.zeros(2, 6)
    bufs = (torch.empty(2, 128, dtype=torch.uint8), torch.empty(2, 4, dtype=torch.int32),
            torch.empty(2), torch.empty(2, 6, dtype=torch.int64), torch.empty(2, 6))

    class Eplb:
        logical_to_physical_map = torch.zeros(4, 1, dtype=torch.int64)

    class NoEplb:
        logical_to_physical_map = None

    why = kernels.megamoe_staging_unsupported
    assert why(x, w, ids, *bufs) is None
    assert why(x, w, ids, *bufs, eplb_state=NoEplb()) is None
    assert "EPLB" in why(x, w, ids, *bufs, eplb_state=Eplb())
    assert "shared expert" in why(x, w, ids, *bufs, shared_x=torch.empty(2, 256))
    assert "multiple of 128" in why(torch.zeros(2, 192, dtype=torch.bfloat16), w, ids, *bufs)
    assert "hidden_states" in why(x.float(), w, ids, *bufs)
    assert "strides" in why(torch.zeros(256, 2, dtype=torch.bfloat16).t(), w, ids, *bufs)
    with pytest.raises(FormatError, match="EPLB"):
        kernels.stage_megamoe_nvfp4_inputs(x, w, ids, *bufs, eplb_state=Eplb())
