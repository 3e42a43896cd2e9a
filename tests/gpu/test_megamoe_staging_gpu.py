"""Our vLLM-compatible NVFP4 MegaMoE staging against vLLM 0.34.0's own kernel: 0 differing bytes.

``kernels.stage_megamoe_nvfp4_inputs`` and vLLM's ``prepare_megamoe_nvfp4_inputs`` (the
pinned wheel's file, loaded by ``vllm_staging``) are called with the same arguments —
hidden states at DeepSeek V4 Pro's H = 7168, top-k 6, a padding mask, 48 local experts'
``w2_global_scale`` and ``l2_alpha`` — into output buffers pre-filled with a pattern, and
every output buffer must be byte-identical: ``x``, ``x_sf``, ``x_scales``, ``topk_idx``,
``topk_weights``, ``l2_alpha``; also against ``formats.mega_moe_stage_inputs`` (the torch
transcription). Rows: ``make_hidden``'s twelve kinds (zeros, subnormals, bf16-max and tiny
amax, values below both token-scale floors, ...) with ±inf, scattered NaN, all-NaN rows
and NaN blocks mixed in. T ∈ {0, 1, 7, 64, 512, 4096, 16384}.

The fast path's divisions (``div_by_reciprocal``) are checked exhaustively against IEEE
division on the operand sets that occur (see ``kernels/megamoe_staging.py``).

Run on the GPU machine with the checkout's ``.cache/`` (``scripts/fetch_vllm_source.py``):
``PYTHONPATH=src python3 -m pytest tests/gpu/test_megamoe_staging_gpu.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import triton
import triton.language as tl
from test_vllm_staging_gpu import _hash32, make_hidden, make_routing

from dsv4_nvfp4.formats import mega_moe_stage_inputs
from dsv4_nvfp4.kernels import TileConfig, stage_megamoe_nvfp4_inputs
from dsv4_nvfp4.kernels._bits import div_by_reciprocal, div_rn, f32_bits
from dsv4_nvfp4.kernels.megamoe_staging import (
    _vllm_magnitude_codes,
    quick_rows,
    quick_table,
    threshold_rows,
)

pytestmark = pytest.mark.h100
DEV = "cuda"
HIDDEN = 7168
TOKENS = [0, 1, 7, 64, 512, 4096, 16384]
NUM_LOCAL_EXPERTS = 48
L2_SCALE = 0.0123456789  # a float64 that fp32 rounds
OUTPUTS = ("x", "x_sf", "x_scales", "topk_idx", "topk_weights", "l2_alpha")


def make_special(t: int, h: int = HIDDEN) -> torch.Tensor:
    """``make_hidden`` rows with non-finite values mixed in: row r gets +inf (r % 23 == 5),
    -inf (r % 29 == 7), three NaN (r % 31 == 11), NaN everywhere (r % 37 == 13), one
    all-NaN 16-block (r % 41 == 17), inf and NaN together (r % 43 == 19)."""
    x = make_hidden(t, h)
    if t == 0:
        return x
    r = torch.arange(t, device=x.device)[:, None]
    c = torch.arange(h, device=x.device)[None, :]
    col = (r * 131 + 17) % h
    inf, nan = float("inf"), float("nan")
    x = torch.where((r % 23 == 5) & (c == col), inf, x)
    x = torch.where((r % 29 == 7) & (c == col), -inf, x)
    x = torch.where((r % 31 == 11) & ((c == col) | (c == (col + 1) % h) | (c == (col * 7) % h)),
                    nan, x)
    x = torch.where(r % 37 == 13, nan, x)
    x = torch.where((r % 41 == 17) & (c // 16 == col // 16), nan, x)
    x = torch.where((r % 43 == 19) & (c == col), inf, x)
    x = torch.where((r % 43 == 19) & (c == (col + 5) % h), nan, x)
    return x.bfloat16().contiguous()


def call_args(t: int, padding: bool = True, l2: bool = True) -> dict[str, Any]:
    x = make_special(t)
    ids, weights = make_routing(t)
    i = torch.arange(NUM_LOCAL_EXPERTS, dtype=torch.int64, device=DEV)
    gs = (_hash32(i * 77 + 5) >> 8).to(torch.float32) * 2.0**-30
    pad = (_hash32(torch.arange(t, dtype=torch.int64, device=DEV) + 99) % 5 == 0)
    return {"hidden_states": x, "topk_weights": weights, "topk_ids": ids,
            "is_padding": pad if padding else None,
            "w2_global_scale": gs if l2 else None, "l2_activation_scale": L2_SCALE}


def out_buffers(t: int, k: int = 6, h: int = HIDDEN) -> dict[str, torch.Tensor]:
    """Output buffers pre-filled with a pattern, so that unwritten bytes show."""
    return {"x": torch.full((t, h // 2), 0xAB, dtype=torch.uint8, device=DEV),
            "x_sf": torch.full((t, h // 64), 0x5A5A5A5A, dtype=torch.int32, device=DEV),
            "x_scales": torch.full((t,), float("nan"), dtype=torch.float32, device=DEV),
            "topk_idx": torch.full((t, k), -7, dtype=torch.int64, device=DEV),
            "topk_weights": torch.full((t, k), float("nan"), dtype=torch.float32, device=DEV),
            "l2_alpha": torch.full((NUM_LOCAL_EXPERTS,), float("nan"), dtype=torch.float32,
                                   device=DEV)}


def stage(fn, a: dict[str, Any], l2: bool = True, **kw: Any) -> dict[str, torch.Tensor]:
    t = a["hidden_states"].shape[0]
    o = out_buffers(t)
    fn(a["hidden_states"], a["topk_weights"], a["topk_ids"], o["x"], o["x_sf"], o["x_scales"],
       o["topk_idx"], o["topk_weights"], is_padding=a["is_padding"],
       w2_global_scale=a["w2_global_scale"], l2_alpha=o["l2_alpha"] if l2 else None,
       l2_activation_scale=a["l2_activation_scale"], **kw)
    torch.cuda.synchronize()
    return o


def differing_bytes(got: torch.Tensor, want: torch.Tensor) -> int:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    g = got.contiguous().view(torch.uint8)
    w = want.contiguous().view(torch.uint8)
    return int((g != w).sum())


@pytest.mark.parametrize("t", TOKENS)
def test_byte_identical_to_vllm(t: int, vllm, report: dict[str, Any]) -> None:
    a = call_args(t)
    theirs = stage(vllm.load().prepare_megamoe_nvfp4_inputs, a)
    ours = stage(stage_megamoe_nvfp4_inputs, a)
    ref = mega_moe_stage_inputs(a["hidden_states"], a["topk_weights"], a["topk_ids"],
                                is_padding=a["is_padding"], w2_global_scale=a["w2_global_scale"],
                                l2_activation_scale=L2_SCALE)
    diff = {k: differing_bytes(ours[k], theirs[k]) for k in OUTPUTS}
    diff_ref = {k: differing_bytes(ref[k], theirs[k]) for k in OUTPUTS}
    x = a["hidden_states"]
    rows = {"nonfinite_rows": int((~torch.isfinite(x.float())).any(dim=1).sum()) if t else 0,
            "padded_rows": int(a["is_padding"].sum()), "quick_rows": int(quick_rows(x).sum())}
    report[f"megamoe staging vs vllm T={t}"] = {
        "ours_vs_vllm_differing_bytes": diff, "formats_vs_vllm_differing_bytes": diff_ref,
        "bytes": {k: theirs[k].numel() * theirs[k].element_size() for k in OUTPUTS}, **rows}
    assert diff == dict.fromkeys(OUTPUTS, 0), diff
    assert diff_ref == dict.fromkeys(OUTPUTS, 0), diff_ref
    if t:  # every output byte was written
        assert not bool(torch.isnan(ours["x_scales"]).any())
        assert int((ours["topk_idx"] == -7).sum()) == 0


@pytest.mark.parametrize("t", [0, 7, 512])
def test_without_padding_or_l2_alpha(t: int, vllm) -> None:
    a = call_args(t, padding=False, l2=False)
    theirs = stage(vllm.load().prepare_megamoe_nvfp4_inputs, a, l2=False)
    ours = stage(stage_megamoe_nvfp4_inputs, a, l2=False)
    assert {k: differing_bytes(ours[k], theirs[k]) for k in OUTPUTS} == dict.fromkeys(OUTPUTS, 0)
    assert bool(torch.isnan(ours["l2_alpha"]).all())  # untouched, as vLLM leaves it


@pytest.mark.parametrize("cfg", [TileConfig(rows=1, block=1024, num_warps=2),
                                 TileConfig(rows=1, block=1024, num_warps=4),
                                 TileConfig(rows=1, block=1024, num_warps=8),
                                 TileConfig(rows=2, block=1024, num_warps=4),
                                 TileConfig(rows=1, block=512, num_warps=4),
                                 TileConfig(rows=1, block=1024, num_warps=2, max_registers=96),
                                 TileConfig(rows=1, block=1024, num_warps=2, max_registers=80),
                                 TileConfig(rows=1, block=1024, num_warps=2, programs_per_sm=8,
                                            max_registers=96)])
def test_tiles_give_the_same_bytes(cfg: TileConfig, vllm) -> None:
    a = call_args(515)
    theirs = stage(vllm.load().prepare_megamoe_nvfp4_inputs, a)
    ours = stage(stage_megamoe_nvfp4_inputs, a, config=cfg)
    assert {k: differing_bytes(ours[k], theirs[k]) for k in OUTPUTS} == dict.fromkeys(OUTPUTS, 0)


# --- the fast path's divisions, exhaustively --------------------------------------------------
@triton.jit
def _markstein_mismatches(vec_start, list_ptr, n_list, out_ptr, VEC_IS_NUMERATOR: tl.constexpr,
                          BLOCK: tl.constexpr):
    """For fp32 bit patterns vec_start + [0, BLOCK) x every value of the list: count
    div_by_reciprocal(a, b, RN(1/b)) != RN(a / b)."""
    v = (vec_start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.float32, bitcast=True)
    bad = tl.zeros([BLOCK], tl.int32)
    for i in range(n_list):
        s = tl.load(list_ptr + i) + tl.zeros([BLOCK], tl.float32)
        if VEC_IS_NUMERATOR:
            a = v
            b = s
        else:
            a = s
            b = v
        z = div_rn(tl.full([BLOCK], 1.0, tl.float32), b)
        bad += (f32_bits(div_by_reciprocal(a, b, z)) != f32_bits(div_rn(a, b))).to(tl.int32)
    tl.atomic_add(out_ptr, tl.sum(bad, axis=0))


def _mismatches(vec_is_numerator: bool, values: torch.Tensor) -> int:
    out = torch.zeros(1, dtype=torch.int32, device=DEV)
    block = 1024
    _markstein_mismatches[(2**23 // block,)](0x3F800000, values, values.numel(), out,
                                              VEC_IS_NUMERATOR=vec_is_numerator, BLOCK=block)
    return int(out.item())


def test_token_scale_division_is_exact_for_every_bf16_and_fp32_scale(report) -> None:
    """x / xs: x any bf16 significand (128), xs any fp32 significand (2**23), one binade each."""
    a = (1.0 + torch.arange(128, dtype=torch.float32, device=DEV) / 128)
    n = _mismatches(False, a)
    report["markstein x/xs mismatches (128 x 2**23)"] = n
    assert n == 0


def test_block_scale_division_is_exact_for_every_fp32_and_e4m3_scale(report) -> None:
    """v / SF: v any fp32 significand (2**23), SF any E4M3 significand (8), one binade each."""
    b = (1.0 + torch.arange(8, dtype=torch.float32, device=DEV) / 8)
    n = _mismatches(True, b)
    report["markstein v/SF mismatches (2**23 x 8)"] = n
    assert n == 0


@pytest.mark.parametrize("t,split", [(515, True), (7, False), (1, False)])
def test_both_launch_forms_give_the_same_bytes(t: int, split: bool, vllm) -> None:
    """Rows split over programs (the default up to 32 tokens) and whole rows per program."""
    a = call_args(t)
    theirs = stage(vllm.load().prepare_megamoe_nvfp4_inputs, a)
    ours = stage(stage_megamoe_nvfp4_inputs, a, split=split)
    assert {k: differing_bytes(ours[k], theirs[k]) for k in OUTPUTS} == dict.fromkeys(OUTPUTS, 0)


# --- the quick path: vLLM's codes from one multiplier per (amax significand, SF significand) ---
def test_rows_on_the_thresholds(vllm, report: dict[str, Any]) -> None:
    """Every row amax significand (and the floor), blocks of the bf16 values nearest each
    threshold ``T · SF · xs`` for random normal block scales: 0 differing bytes, on the quick
    path (84 significands and the floor) and on the two-division path (the other 44)."""
    x = torch.cat([threshold_rows(list(range(129)), HIDDEN, seed=s) for s in range(8)]).to(DEV)
    t = x.shape[0]
    ids, weights = make_routing(t)
    a = {"hidden_states": x, "topk_weights": weights, "topk_ids": ids, "is_padding": None,
         "w2_global_scale": None, "l2_activation_scale": L2_SCALE}
    theirs = stage(vllm.load().prepare_megamoe_nvfp4_inputs, a, l2=False)
    ours = stage(stage_megamoe_nvfp4_inputs, a, l2=False)
    diff = {k: differing_bytes(ours[k], theirs[k]) for k in OUTPUTS}
    quick = int(quick_rows(x).sum())
    report["megamoe threshold rows (8 x 129)"] = {"differing_bytes": diff, "quick_rows": quick,
                                                  "rows": t}
    assert quick == 8 * 85
    assert diff == dict.fromkeys(OUTPUTS, 0), diff


def test_quick_multipliers_hold_for_every_bf16_at_every_scale(report: dict[str, Any]) -> None:
    """:func:`quick_table`'s multipliers against vLLM's two IEEE fp32 divisions (torch on the
    GPU) for every positive bf16 ``x`` up to 6.5 · SF · xs, every table entry in use, row amax
    exponents -39..100 and block scale exponents -6..8: the code of the exact product ``x · C``
    (fp64) is vLLM's code in every case."""
    tab = quick_table().to(DEV)
    mult = tab[:129 * 8].view(torch.float32).reshape(129, 8).double()
    usable = (tab[:129 * 8].reshape(129, 8) != 0)[..., None]
    r = torch.tensor(1 / 2688, dtype=torch.float32, device=DEV)
    sig = torch.cat([1 + torch.arange(128, dtype=torch.float32, device=DEV) / 128,
                     torch.tensor([2.0**-45], device=DEV)])
    x = torch.arange(0x0001, 0x7F80, dtype=torch.int32, device=DEV).to(torch.int16)
    x = x.view(torch.bfloat16).float()  # every positive finite bf16, subnormals too
    is_row = torch.arange(129, device=DEV) < 128
    bad = cases = 0
    for a in range(-39, 101, 7):  # 2**-39 > 1e-12: no amax under the floor
        amax = torch.where(is_row, sig * 2.0**a, sig)
        xs = (torch.clamp(amax, min=1e-12) * r)[:, None, None]
        for sh in range(-6, 9):
            sf = ((1 + torch.arange(8, dtype=torch.float32, device=DEV) / 8)
                  * 2.0**sh)[None, :, None]
            ok = (x <= 6.5 * sf * xs) & (x <= amax[:, None, None]) & usable
            want = _vllm_magnitude_codes((x / xs) / sf)
            c = mult * 2.0 ** (-(torch.where(is_row, a, 0)[:, None] + sh))
            got = _vllm_magnitude_codes(x.double() * c[..., None])
            bad += int(((got != want) & ok).sum())
            cases += int(ok.sum())
    report["megamoe quick multipliers: cases, mismatches"] = [cases, bad]
    assert bad == 0
