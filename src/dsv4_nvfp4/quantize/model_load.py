"""Load a BF16 DeepSeek V4 checkpoint with transformers, ready for a bf16 calibration forward.

Why these arguments: ``experts_implementation="eager"`` because ModelOpt
intercepts the experts' ``F.linear`` calls, which the grouped_mm backend
(transformers' default on GPU) bypasses — calibration would silently see no
expert input; ``dtype=bfloat16`` with norms loaded in bf16
(:func:`traps.bf16_norms_at_load`) because transformers' fp32 norms break a
bf16 forward. ``device_map`` spreads layers
over the visible GPUs (accelerate), with optional CPU/disk offload for models
larger than GPU memory (V4 Pro in BF16 is ~3.2 TB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuantizeInputError
from .traps import bf16_norms_at_load, cast_fp32_norms, count_norms, ensure_architectures


@dataclass
class LoadedModel:
    model: torch.nn.Module
    norms_bf16: int          # RMSNorm weights in bf16 (transformers would keep them fp32)
    norms_cast: list[str]    # of those, cast after loading (none when loaded as bf16)
    architectures_set: bool
    input_device: torch.device
    on_cpu: bool


def _model_class():
    try:
        import transformers
    except ImportError:
        raise QuantizeInputError("transformers: expected an installed transformers with "
                                 "DeepseekV4ForCausalLM, found none") from None
    cls = getattr(transformers, "DeepseekV4ForCausalLM", None)
    if cls is None:
        raise QuantizeInputError(f"transformers {transformers.__version__}: expected "
                                 "DeepseekV4ForCausalLM, found none (needs a release with "
                                 "DeepSeek V4 support)")
    return cls


def resolve_device_map(device_map: str) -> str | None:
    """``cpu`` loads without accelerate; anything else needs a GPU."""
    if device_map == "cpu":
        return None
    if not torch.cuda.is_available():
        raise QuantizeInputError(f"--device-map {device_map}: expected a visible CUDA GPU, "
                                 "found none (pass --device-map cpu for a dry run on a tiny "
                                 "checkpoint)")
    return device_map


def load_bf16_model(path: Path, device_map: str, max_gpu_memory_gib: float | None,
                    offload_dir: Path | None) -> LoadedModel:
    cls = _model_class()
    dm = resolve_device_map(device_map)
    kwargs: dict = {"dtype": torch.bfloat16, "experts_implementation": "eager"}
    if dm is not None:
        kwargs["device_map"] = dm
        if max_gpu_memory_gib is not None:
            kwargs["max_memory"] = {i: f"{max_gpu_memory_gib}GiB"
                                    for i in range(torch.cuda.device_count())}
            kwargs["max_memory"]["cpu"] = "100000GiB"
        if offload_dir is not None:
            kwargs["offload_folder"] = str(offload_dir)
    try:
        with bf16_norms_at_load(cls):
            model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        # transformers' own message names the problem; keep it to one line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuantizeInputError(f"{path}: transformers could not load it as "
                                 f"DeepseekV4ForCausalLM: {type(e).__name__}: {first}") from None
    model.eval()
    norms = cast_fp32_norms(model)
    arch = ensure_architectures(model)
    # ModelOpt also forces this; doing it here keeps the counter's view and ModelOpt's equal.
    if hasattr(model.config, "_experts_implementation"):
        model.config._experts_implementation = "eager"
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # embeddings offloaded: accelerate moves inputs itself
        device = torch.device("cuda", 0)
    return LoadedModel(model, count_norms(model, torch.bfloat16), norms, arch, device,
                       dm is None)
