"""Bitwise comparison that names the first differing element, and checks strides."""

from __future__ import annotations

import torch


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor",
                         check_strides: bool = False) -> None:
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if check_strides:
        assert actual.stride() == expected.stride(), (
            f"{what}: strides {actual.stride()} != expected {expected.stride()}")
    a = actual.contiguous().view(torch.uint8) if actual.element_size() == 1 else actual
    e = expected.contiguous().view(torch.uint8) if expected.element_size() == 1 else expected
    if actual.element_size() != 1:
        a = actual.contiguous().flatten().view(torch.uint8)
        e = expected.contiguous().flatten().view(torch.uint8)
        a = a.reshape(-1, actual.element_size())
        e = e.reshape(-1, actual.element_size())
        diff = (a != e).any(dim=-1)
    else:
        diff = a != e
    if bool(diff.any()):
        n_bad = int(diff.sum())
        flat = int(diff.flatten().nonzero()[0])
        coord = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
        got = actual.contiguous().flatten()[flat]
        want = expected.contiguous().flatten()[flat]
        raise AssertionError(
            f"{what}: {n_bad} of {diff.numel()} elements differ; first at {coord}: "
            f"got {got.view(torch.uint8) if got.element_size() == 1 else got} "
            f"expected {want.view(torch.uint8) if want.element_size() == 1 else want}")
