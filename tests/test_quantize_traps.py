"""The quantize traps: each shown happening with plain transformers/ModelOpt, then handled.

CPU only: ModelOpt's NVFP4 fake quant is swapped for the formats-based CPU
kernel (``quantize/cpu_fakequant.py``) where a forward through enabled
quantizers is needed (export's dummy forward); calibration itself is ModelOpt's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_quantize_support import small_config, write_small_checkpoint

from dsv4_nvfp4.quantize.errors import QuantizeCheckError
from dsv4_nvfp4.quantize.recipes import Recipe, modelopt_config, nvfp4_attributes_from_modelopt
from dsv4_nvfp4.quantize.traps import (
    add_to_ignore,
    cast_fp32_norms,
    check_expert_coverage,
    ensure_architectures,
    expert_coverage,
    mtp_message,
    transformers_names,
)

pytestmark = pytest.mark.cpu

transformers = pytest.importorskip("transformers")
mtq = pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp("src") / "bf16")


def _ids(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(seed))


# --- trap 1: fp32 norms -------------------------------------------------------------------


def test_fp32_norms_break_bf16_forward_and_the_cast_fixes_it(small_src: Path) -> None:
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(
        small_src, dtype=torch.bfloat16, experts_implementation="eager").eval()
    fp32 = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm")
            and getattr(m, "weight", None) is not None and m.weight.dtype == torch.float32}
    assert len(fp32) == 16   # 4 per layer, 2 compressor, 1 indexer compressor, model.norm
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        model(_ids(), use_cache=False)
    cast = cast_fp32_norms(model)
    assert sorted(cast) == sorted(fp32)
    for name, before in fp32.items():
        w = model.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and torch.equal(w.float(), before)   # exact
    with torch.no_grad():
        logits = model(_ids(), use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_norm_cast_refuses_to_round() -> None:
    norm = transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4RMSNorm(8)
    norm.weight.data = torch.full((8,), 1.0 + 2.0**-12)   # not a bf16 value
    with pytest.raises(QuantizeCheckError, match="exactly representable"):
        cast_fp32_norms(torch.nn.ModuleDict({"n": norm}))


# --- traps 2 and 6: architectures, export names ---------------------------------------------


def quantized_from_config():
    """An experts-recipe model built from a config (no architectures), calibrated on CPU.

    A fresh one per export: ModelOpt's export splits the fused experts in place.
    """
    from dsv4_nvfp4.quantize import cpu_fakequant

    cpu_fakequant.install()
    d = small_config(mtp=False)
    d.pop("architectures")
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**d))
    model = model.to(torch.bfloat16).eval()
    cast_fp32_norms(model)
    cfg = modelopt_config(Recipe.EXPERTS, nvfp4_attributes_from_modelopt())

    def loop(m):
        with torch.no_grad():
            for s in range(4):
                m(_ids(64, s), use_cache=False)

    mtq.quantize(model, cfg, loop)
    return model


def test_export_without_architectures_crashes(tmp_path: Path) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    model = quantized_from_config()
    assert model.config.architectures is None
    with pytest.raises(TypeError, match="NoneType"):
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / "x")


def test_names_architectures_fixed(tmp_path: Path) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    from dsv4_nvfp4.checkpoint.layouts import Layout, detect

    model = quantized_from_config()
    assert ensure_architectures(model) is True
    assert ensure_architectures(model) is False
    # ModelOpt 0.47's own naming: a lossy partial reversal of transformers' renames.
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / "hybrid")
    hybrid = set(safe_open(tmp_path / "hybrid" / "model.safetensors", "pt").keys())
    assert "model.layers.0.attn.norm.weight" in hybrid         # was self_attn.kv_norm
    assert "model.embed_tokens.weight" in hybrid and "head.weight" in hybrid
    # Ours: transformers names throughout (layout C, what convert reads).
    model = quantized_from_config()
    ensure_architectures(model)
    with transformers_names(model):
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp_path / "c")
    assert getattr(model, "_weight_conversions", None) != []   # restored afterwards
    names = set(safe_open(tmp_path / "c" / "model.safetensors", "pt").keys())
    assert "model.layers.0.self_attn.kv_norm.weight" in names
    assert "lm_head.weight" in names and "model.layers.1.mlp.experts.7.up_proj.weight" in names
    assert not any(".attn." in n or ".ffn." in n for n in names)
    assert detect(names, json.loads((tmp_path / "c" / "config.json").read_text())) is Layout.C


# --- trap 3: o_a_proj missing from ignore ---------------------------------------------------


def test_add_to_ignore(tmp_path: Path) -> None:
    hf = {"quantization": {"quant_algo": "NVFP4", "exclude_modules": ["lm_head",
                                                                      "model.layers.0.self_attn*"]}}
    cfg = {"quantization_config": {"ignore": ["lm_head", "model.layers.0.self_attn*"]}}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    names = ["model.layers.0.self_attn.o_a_proj", "model.layers.1.self_attn.o_a_proj"]
    assert add_to_ignore(tmp_path, names) == ["model.layers.1.self_attn.o_a_proj"]
    hf2 = json.loads((tmp_path / "hf_quant_config.json").read_text())
    cfg2 = json.loads((tmp_path / "config.json").read_text())
    assert hf2["quantization"]["exclude_modules"][-1] == "model.layers.1.self_attn.o_a_proj"
    assert cfg2["quantization_config"]["ignore"][-1] == "model.layers.1.self_attn.o_a_proj"
    assert add_to_ignore(tmp_path, names) == []   # idempotent


# --- trap 4: MTP ----------------------------------------------------------------------------


def test_mtp_messages() -> None:
    assert mtp_message(0, 0, None) is None
    msg = mtp_message(53, 1, None)
    assert "53 mtp.* tensors" in msg and "num_nextn_predict_layers to 0" in msg
    assert "grafts mtp.* byte-identical from /n" in mtp_message(53, 1, Path("/n"))


def test_transformers_drops_mtp(small_src: Path) -> None:
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(small_src, dtype=torch.bfloat16)
    assert model.config.num_nextn_predict_layers == 1
    assert not any("mtp" in n for n, _ in model.named_parameters())


# --- trap 5: experts without calibration tokens -----------------------------------------------


def test_coverage_check() -> None:
    counts = {"model.layers.1.mlp.experts": torch.tensor([5, 0, 3, 0]),
              "model.layers.2.mlp.experts": torch.tensor([1, 1, 1, 1])}
    cov = expert_coverage(counts)
    assert cov.uncalibrated == {"model.layers.1.mlp.experts": [1, 3]}
    assert cov.min_tokens == 0 and cov.layers == 2 and cov.experts_per_layer == 4
    with pytest.raises(QuantizeCheckError, match=r"2 routed experts saw no calibration token "
                                                 r"\(model.layers.1.mlp.experts: experts \[1, 3\]"):
        check_expert_coverage(cov, allow=False)
    assert "experts [1, 3]" in check_expert_coverage(cov, allow=True)
    assert check_expert_coverage(expert_coverage({"x": torch.tensor([1, 2])}), False) is None


def test_norms_load_in_bf16_and_class_is_restored(small_src: Path) -> None:
    from dsv4_nvfp4.quantize.traps import bf16_norms_at_load, count_norms

    cls = transformers.DeepseekV4ForCausalLM
    before = list(cls._keep_in_fp32_modules_strict)
    with bf16_norms_at_load(cls) as removed:
        model = cls.from_pretrained(small_src, dtype=torch.bfloat16,
                                    experts_implementation="eager").eval()
    assert sorted(removed) == sorted(["q_a_norm", "kv_norm", "input_layernorm",
                                      "post_attention_layernorm", "norm"])
    assert list(cls._keep_in_fp32_modules_strict) == before
    assert count_norms(model, torch.bfloat16) == 16 and count_norms(model, torch.float32) == 0
    assert model.model.layers[0].attn_hc.fn.dtype == torch.float32   # hc stays fp32
    with torch.no_grad():
        assert torch.isfinite(model(_ids(), use_cache=False).logits.float()).all()
