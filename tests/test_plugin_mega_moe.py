"""The MegaMoE selection logic of the plugin, on plain values (no vLLM needed).

vLLM 0.34.0's own classes go through the same functions in
``tests/vllm034/test_plugin_mega_moe_034.py``; here every branch of the rule is
pinned on stand-ins that record what vLLM's constructor would receive.
"""

from __future__ import annotations

import types

import pytest

from dsv4_nvfp4.checkpoint.layouts import B_EXCLUDE_MODULES
from dsv4_nvfp4.vllm_plugin.mega_moe import (
    experts_factory,
    substituted,
    summary_line,
    without_unused_input_scales,
)

pytestmark = pytest.mark.cpu

NVFP4 = types.SimpleNamespace(name="nvfp4")
MXFP4 = types.SimpleNamespace(name="mxfp4")
BF16 = types.SimpleNamespace(name="bf16")
LAYER_B = {"quant_method": "fp8", "moe_quant_algo": "NVFP4",
           "exclude_modules": list(B_EXCLUDE_MODULES)}
NUM_LAYERS = 4


class Recorder:
    """Stands in for vLLM's DeepGemmMegaMoEExperts: keeps what it was built with."""

    def __init__(self, vllm_config: object, **kwargs: object) -> None:
        self.vllm_config, self.kwargs = vllm_config, kwargs


def build(quant: dict, prefix: str, fmt: object = MXFP4) -> tuple[Recorder, dict[str, str]]:
    chosen: dict[str, str] = {}
    factory = experts_factory(Recorder, NVFP4, MXFP4, quant, NUM_LAYERS, chosen)
    return factory("VC", prefix=prefix, weight_format=fmt, top_k=6), chosen


def test_nvfp4_layer_gets_the_nvfp4_format_and_nothing_else_changes() -> None:
    experts, chosen = build(LAYER_B, "model.layers.2.ffn.experts")
    assert experts.vllm_config == "VC"
    assert experts.kwargs == {"prefix": "model.layers.2.ffn.experts",
                              "weight_format": NVFP4, "top_k": 6}
    assert chosen == {"layers.2.ffn.experts": "nvfp4"}


def test_mtp_layer_excluded_by_the_checkpoint_keeps_mxfp4() -> None:
    # vLLM builds the draft layer as layers.{num_hidden_layers}; the checkpoint says mtp.0.
    experts, chosen = build(LAYER_B, f"model.layers.{NUM_LAYERS}.ffn.experts")
    assert experts.kwargs["weight_format"] is MXFP4
    assert chosen == {"mtp.0.ffn.experts": "mxfp4"}


def test_mtp_layer_listed_as_nvfp4_gets_nvfp4() -> None:
    quant = {"moe_quant_algo": "NVFP4", "quantized_layers": {
        "layers.0.ffn.experts": {"quant_algo": "NVFP4"},
        "mtp.0.ffn.experts": {"quant_algo": "NVFP4"}}}
    assert build(quant, f"model.layers.{NUM_LAYERS}.ffn.experts")[0].kwargs[
        "weight_format"] is NVFP4
    # quantized_layers present: a layer it does not list keeps its native format
    assert build(quant, "model.layers.1.ffn.experts")[0].kwargs["weight_format"] is MXFP4


def test_native_checkpoint_and_other_formats_are_left_alone() -> None:
    native = {"quant_method": "fp8"}  # layout A: MXFP4 experts, no moe_quant_algo
    assert build(native, "model.layers.0.ffn.experts")[0].kwargs["weight_format"] is MXFP4
    # a format other than vLLM's MXFP4 default is never rewritten
    assert build(LAYER_B, "model.layers.0.ffn.experts", BF16)[0].kwargs["weight_format"] is BF16


def test_substituted_restores_on_error() -> None:
    mod = types.SimpleNamespace(X=1)
    with pytest.raises(RuntimeError), substituted(mod, "X", 2):
        assert mod.X == 2
        raise RuntimeError
    assert mod.X == 1


def test_summary_line_counts_layers_per_format() -> None:
    line = summary_line("main model", {"layers.0.ffn.experts": "nvfp4",
                                       "layers.1.ffn.experts": "nvfp4",
                                       "mtp.0.ffn.experts": "mxfp4"})
    assert line == ("dsv4_nvfp4: main model routed experts on vLLM's DeepGEMM MegaMoE, "
                    "layers per format: mxfp4: 1, nvfp4: 2")
    assert summary_line("x", {}).endswith("layers per format: none")


def test_only_fc1_input_scales_of_nvfp4_experts_leave_the_stream() -> None:
    names = [
        "layers.0.ffn.experts.0.w1.weight",
        "layers.0.ffn.experts.0.w1.input_scale",       # dropped: FC1, NVFP4 layer
        "layers.0.ffn.experts.0.w3.input_scale",       # dropped
        "layers.0.ffn.experts.0.w2.input_scale",       # kept: FC2 scale (layer max)
        "layers.0.ffn.experts.0.w1.weight_scale_2",
        "layers.0.ffn.shared_experts.w1.input_scale",  # kept: not a routed expert
        "layers.0.attn.wq_a.input_scale",
        "mtp.0.ffn.experts.3.w1.input_scale",          # kept: mtp.* is not NVFP4 here
        "layers.10.ffn.experts.255.w3.input_scale",    # dropped (multi-digit indices)
    ]
    out = [n for n, _ in without_unused_input_scales(((n, None) for n in names), LAYER_B)]
    assert out == [names[0], names[3], names[4], names[5], names[6], names[7]]
    # a native checkpoint keeps everything
    assert [n for n, _ in without_unused_input_scales(((n, None) for n in names),
                                                      {"quant_method": "fp8"})] == names
