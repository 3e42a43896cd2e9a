"""Calibrate with ModelOpt (``mtq.quantize``, max calibration) and keep the result resumable.

The calibration state that matters is small: one amax per enabled quantizer
(plus routed-token counts per expert). It is saved to the work directory as
soon as calibration ends, so an interrupted export — or a rerun after the
expert-coverage check failed — restores it in seconds instead of running the
model over the data again. Restoring inserts the same quantizers
(``mtq.quantize`` without a forward loop) and loads every amax; a quantizer
left without one is an error, never a silent default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .calib_data import CalibrationSet
from .errors import QuantizeCheckError
from .traps import ExpertTokenCounter

STATE_FILE = "calibration.pt"


def _quantizers(model: nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer):
            yield name, mod


def _home_device(model: nn.Module, name: str) -> torch.device:
    """Device of the nearest enclosing module that owns a parameter (where amax must live)."""
    parts = name.split(".")
    while parts:
        parts.pop()
        mod = model.get_submodule(".".join(parts))
        p = next(mod.parameters(recurse=False), None)
        if p is None:
            p = next(mod.parameters(), None)
        if p is not None and p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def run_calibration(model: nn.Module, config: dict, calib: CalibrationSet, batch_size: int,
                    device: torch.device, progress: bool) -> dict[str, torch.Tensor]:
    """``mtq.quantize`` over the calibration batches; returns routed-token counts per expert."""
    import modelopt.torch.quantization as mtq
    from tqdm import tqdm

    batches = calib.batches(batch_size)
    counts: dict[str, torch.Tensor] = {}

    def forward_loop(m: nn.Module) -> None:
        counter = ExpertTokenCounter(m)
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
                    m(input_ids=batch.to(device), use_cache=False)
        finally:
            counter.remove()
        counts.update(counter.counts)

    mtq.quantize(model, config, forward_loop)
    return counts


def save_state(model: nn.Module, counts: dict[str, torch.Tensor], work: Path) -> Path:
    amax = {n: q._amax.detach().to("cpu").clone() for n, q in _quantizers(model)
            if getattr(q, "_amax", None) is not None}
    path = work / STATE_FILE
    tmp = work / f".{STATE_FILE}.tmp"
    torch.save({"amax": amax, "expert_tokens": counts}, tmp)
    os.replace(tmp, path)
    return path


def restore_state(model: nn.Module, config: dict, work: Path) -> dict[str, torch.Tensor]:
    """Insert quantizers without a forward pass and load the saved amax values."""
    import modelopt.torch.quantization as mtq

    state = torch.load(work / STATE_FILE, map_location="cpu", weights_only=True)
    mtq.quantize(model, config, None)
    amax: dict[str, torch.Tensor] = state["amax"]
    missing = []
    for name, q in _quantizers(model):
        if name in amax:
            value = amax[name]
            cur = getattr(q, "_amax", None)
            if cur is not None and cur.shape == value.shape:
                cur.data.copy_(value.to(cur.device, cur.dtype))
            else:
                q.amax = value.to(_home_device(model, name))
        elif q.is_enabled:
            missing.append(name)
    if missing:
        raise QuantizeCheckError(f"{work / STATE_FILE}: expected an amax for every enabled "
                                 f"quantizer, found none for {len(missing)} (first: "
                                 f"{missing[0]}); rerun with --restart")
    return state["expert_tokens"]
