"""The known traps of quantizing transformers' DeepseekV4ForCausalLM with ModelOpt.

Each function handles one trap found on a real run (ModelOpt 0.45/0.47,
transformers 5.17/5.19) and
says what it did, so the runner can report it. Tests in
``tests/test_quantize_traps.py`` first show each trap happening, then show
the handling removing it.

1. fp32 norms: transformers keeps every RMSNorm weight in fp32
   (``_keep_in_fp32_modules_strict``); an fp32 weight makes the norm return
   fp32, and the next bf16 Linear raises a dtype mismatch, so a bf16 forward
   (calibration) is impossible. We load norms in bf16 (exact: the checkpoint
   stores them in BF16; this also reaches offloaded layers) and cast any fp32
   norm left in memory (checked exact).
2. ``config.architectures`` unset (a model built from a config): ModelOpt's
   export crashes in ``is_multimodal_model``. We set it before export.
3. ``o_a_proj`` (``DeepseekV4GroupedLinear``, an ``nn.Linear`` subclass with
   its own ``forward``) gets no quantizer and is written BF16 without appearing
   in ``ignore``/``exclude_modules``: a loader trusting ``ignore`` would read
   it as NVFP4. The audit finds every linear the recipe wanted quantized but
   ModelOpt did not, and the export fix-up adds each to both lists.
4. MTP dropped: transformers never builds the MTP block (``mtp.*`` is in
   ``_keys_to_ignore_on_load_unexpected``), while config.json keeps
   ``num_nextn_predict_layers``. We say so and pass ``--mtp-from`` to convert.
5. Uncalibrated experts: ModelOpt 0.47 calibrates every expert's *weight*
   amax from the weight itself, so an expert that saw no calibration token is
   silent; its ``input_scale`` is the layer's shared one. We count routed
   tokens per expert and fail loudly (or, when allowed, report which experts
   rely on the shared scale alone).
6. Export names: ModelOpt 0.47 reverses transformers' load-time renames for
   V4 only partly (``model.embed_tokens`` keeps its prefix, the attention
   ``kv_norm`` becomes ``attn.norm``): a hybrid neither transformers' nor
   DeepSeek's. We export with transformers' module names (layout C), which
   ``convert`` reads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import QuantizeCheckError
from .recipes import Recipe, expects_quantized

ARCHITECTURE = "DeepseekV4ForCausalLM"


# --- 1. fp32 norms ------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(
        getattr(module, "weight", None), torch.Tensor)


# The entries of DeepseekV4PreTrainedModel._keep_in_fp32_modules_strict that name norms.
_NORM_KEYS = ("q_a_norm", "kv_norm", "input_layernorm", "post_attention_layernorm", "norm")


@contextlib.contextmanager
def bf16_norms_at_load(cls: type) -> Iterator[list[str]]:
    """Load norms in bf16: drop them from the class's keep-in-fp32 list for one load.

    Why at load and not only after: with CPU/disk offload (V4 Pro in BF16 does
    not fit 8 GPUs) offloaded norm weights live in accelerate's offload map,
    where a cast of the module's parameter never reaches them. The checkpoint
    stores norms in BF16, so loading them as bf16 is exact. The class attribute
    is restored on exit. Yields the names removed.
    """
    attr = "_keep_in_fp32_modules_strict"
    # Patch the class that defines it (DeepseekV4PreTrainedModel): transformers merges the
    # lists of the model's children, and DeepseekV4Model inherits it from there too.
    owner = next((c for c in cls.__mro__ if attr in c.__dict__), cls)
    saved = owner.__dict__.get(attr)
    current = list(saved or [])
    setattr(owner, attr, [m for m in current if m not in _NORM_KEYS])
    try:
        yield [m for m in current if m in _NORM_KEYS]
    finally:
        setattr(owner, attr, saved)


def count_norms(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(1 for _, m in model.named_modules() if _is_norm(m) and m.weight.dtype == dtype)


def cast_fp32_norms(model: nn.Module) -> list[str]:
    """Cast fp32 RMSNorm weights to bf16 in place; return their module names.

    Raises :class:`QuantizeCheckError` if a value is not exactly representable
    in bf16 (then the checkpoint was not BF16 and the cast would change it).
    """
    cast = []
    for name, mod in model.named_modules():
        if _is_norm(mod) and mod.weight.dtype == torch.float32:
            w = mod.weight.data
            b = w.to(torch.bfloat16)
            if not torch.equal(b.float(), w):
                raise QuantizeCheckError(f"{name}.weight: expected fp32 values exactly "
                                         "representable in bf16 (a BF16 checkpoint), found "
                                         "values that would be rounded")
            mod.weight.data = b
            cast.append(name)
    return cast


# --- 2. architectures ---------------------------------------------------------------


def ensure_architectures(model: nn.Module) -> bool:
    """Set ``config.architectures`` to DeepseekV4ForCausalLM; True if it was missing/different."""
    if list(getattr(model.config, "architectures", None) or []) == [ARCHITECTURE]:
        return False
    model.config.architectures = [ARCHITECTURE]
    return True


# --- 3. silently unquantized linears -----------------------------------------------


@dataclass
class QuantAudit:
    """What ModelOpt did to every linear, against what the recipe asked."""

    quantized: list[str] = field(default_factory=list)
    skipped_silently: list[str] = field(default_factory=list)   # wanted, but no quantizer
    unexpected: list[str] = field(default_factory=list)         # quantized against the recipe
    expert_modules: list[str] = field(default_factory=list)


def _enabled(q) -> bool:
    return q is not None and bool(getattr(q, "is_enabled", False))


def audit_quantizers(model: nn.Module, recipe: Recipe) -> QuantAudit:
    """Walk every Linear (subclasses too) and fused-experts module after ``mtq.quantize``."""
    audit = QuantAudit()
    for name, mod in model.named_modules():
        if hasattr(mod, "gate_up_proj_weight_quantizers"):
            qs = list(mod.gate_up_proj_weight_quantizers) + list(mod.down_proj_weight_quantizers)
            on = all(_enabled(q) for q in qs) and _enabled(mod.gate_up_proj_input_quantizer) \
                and _enabled(mod.down_proj_input_quantizer)
            audit.expert_modules.append(name)
            (audit.quantized if on else audit.skipped_silently).append(name)
            continue
        if not isinstance(mod, nn.Linear):
            continue
        want = expects_quantized(recipe, name)
        has = _enabled(getattr(mod, "weight_quantizer", None))
        if has:
            audit.quantized.append(name)
            if not want:
                audit.unexpected.append(name)
        elif want:
            audit.skipped_silently.append(name)
    return audit


def _covered(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name + ".weight", p)
               for p in patterns)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def add_to_ignore(export_dir: Path, names: list[str]) -> list[str]:
    """Add each unquantized module not already matched by ``exclude_modules``/``ignore``.

    Updates ``hf_quant_config.json`` (``quantization.exclude_modules``) and
    ``config.json`` (``quantization_config.ignore``) together; returns the
    names added.
    """
    hf_path, cfg_path = export_dir / "hf_quant_config.json", export_dir / "config.json"
    hf = json.loads(hf_path.read_text(encoding="utf-8"))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    exclude = hf["quantization"].setdefault("exclude_modules", [])
    added = [n for n in names if not _covered(n, exclude)]
    if not added:
        return []
    exclude.extend(added)
    qc = cfg.setdefault("quantization_config", {})
    ignore = qc.setdefault("ignore", [])
    ignore.extend(n for n in added if n not in ignore)
    _write_json_atomic(hf_path, hf)
    _write_json_atomic(cfg_path, cfg)
    return added


# --- 4. MTP -------------------------------------------------------------------------


def mtp_message(mtp_tensors: int, mtp_layers: int, mtp_from: Path | None) -> str | None:
    """What to tell the user about MTP, or None when the checkpoint has none."""
    if mtp_tensors == 0 and mtp_layers == 0:
        return None
    what = (f"the source has {mtp_tensors} mtp.* tensors and num_nextn_predict_layers="
            f"{mtp_layers}; transformers does not build the MTP block, so calibration and "
            "the ModelOpt export have no MTP")
    if mtp_from is not None:
        return what + f". convert grafts mtp.* byte-identical from {mtp_from} (--mtp-from)"
    return what + (". Without --mtp-from NATIVE_CHECKPOINT the output has no MTP and convert "
                   "sets num_nextn_predict_layers to 0 (no speculative decoding)")


# --- 5. expert coverage -------------------------------------------------------------


class ExpertTokenCounter:
    """Counts routed tokens per expert during calibration (forward pre-hooks on experts).

    The experts module's forward receives ``(hidden_states, top_k_index,
    top_k_weights)``; ``top_k_index`` holds each token's chosen experts, for the
    learned router and the hash router alike.
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, mod in model.named_modules():
            if hasattr(mod, "gate_up_proj") and hasattr(mod, "num_experts") and \
                    isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and \
                    mod.gate_up_proj.dim() == 3:
                self.counts[name] = torch.zeros(mod.num_experts, dtype=torch.int64)
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_mod, args, kwargs=None):
            idx = args[1] if len(args) > 1 else (kwargs or {}).get("top_k_index")
            n = self.counts[name].numel()
            flat = idx.detach().reshape(-1).to("cpu", torch.int64)
            flat = flat[(flat >= 0) & (flat < n)]
            self.counts[name] += torch.bincount(flat, minlength=n)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class ExpertCoverage:
    layers: int
    experts_per_layer: int
    min_tokens: int
    uncalibrated: dict[str, list[int]]   # experts module -> expert ids with 0 tokens

    def summary(self) -> str:
        n = sum(len(v) for v in self.uncalibrated.values())
        return (f"{self.layers} MoE layers x {self.experts_per_layer} experts, fewest tokens "
                f"routed to one expert: {self.min_tokens}, experts with none: {n}")


def expert_coverage(counts: dict[str, torch.Tensor]) -> ExpertCoverage:
    unc = {name: (c == 0).nonzero().flatten().tolist() for name, c in counts.items()}
    unc = {k: v for k, v in unc.items() if v}
    per = max((c.numel() for c in counts.values()), default=0)
    low = min((int(c.min()) for c in counts.values()), default=0)
    return ExpertCoverage(len(counts), per, low, unc)


def check_expert_coverage(cov: ExpertCoverage, allow: bool) -> str | None:
    """Fail loudly when an expert saw no token; with ``allow``, return the report line instead."""
    if not cov.uncalibrated:
        return None
    detail = "; ".join(f"{k}: experts {v}" for k, v in sorted(cov.uncalibrated.items()))
    n = sum(len(v) for v in cov.uncalibrated.values())
    if not allow:
        raise QuantizeCheckError(
            f"{n} routed experts saw no calibration token ({detail}). Their input_scale would "
            "be the layer's shared value calibrated on other experts only. Give more or more "
            "varied --calib data / --num-samples, or pass --allow-uncalibrated-experts to "
            "accept it (the experts are listed in quantize_report.json)")
    return (f"{n} routed experts saw no calibration token and rely on the layer's shared "
            f"input_scale (their weight scales come from the weights): {detail}")


# --- 6. export names ----------------------------------------------------------------


@contextlib.contextmanager
def transformers_names(model: nn.Module) -> Iterator[None]:
    """Make ModelOpt's exporter keep transformers' module names (layout C).

    ModelOpt derives its reverse renames from ``model._weight_conversions``
    (the conversions transformers applied at load); with none recorded it
    writes the in-memory names, its documented fallback.
    """
    missing = object()
    saved = getattr(model, "_weight_conversions", missing)
    model._weight_conversions = []
    try:
        yield
    finally:
        if saved is missing:
            del model._weight_conversions
        else:
            model._weight_conversions = saved
