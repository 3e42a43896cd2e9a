"""B200 ONLY (README acceptance runbook): the one call CPU CI cannot make — fp4_fp4_mega_moe.

Never run in CPU CI (skipped unless the GPU is SM100 and the installed
DeepGEMM exports ``fp4_fp4_mega_moe``); never claimed as run by the CPU suite.
Run inside the image on one B200::

    python -m pytest -m b200 tests/test_plugin_b200_mega_moe.py -v

What it does: a single-rank EP group (world size 1, so DeepGEMM allocates a
plain CUDA buffer instead of symmetric memory), ``NvFp4MegaMoEExperts`` at
DeepSeek V4 Pro shapes (H=7168, I=3072, 8 local experts, top-6) loaded with
random ModelOpt-exact NVFP4 experts through the same loader calls as vLLM's
model, ``finalize_weights`` (formats transforms + alphas), then ``forward`` on
BF16 tokens — staging kernel, buffer, and the real ``fp4_fp4_mega_moe``.

Expected: the output matches a torch reference built from the ModelOpt
dequantized weights and the same staged activations, with the FC2 input
requantized to NVFP4 by ``a2_scale`` as the kernel does: relative L2 error
below 2e-2 (BF16 intermediates and in-kernel requantization ties), no NaN,
and zero rows for tokens routed nowhere.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.b200

H, INTER, N_EXPERTS, TOP_K, T = 7168, 3072, 8, 6, 64
SWIGLU_LIMIT = 10.0


def _sm100_with_fp4_mega_moe() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 10:
        return False
    try:
        import deep_gemm
    except ImportError:
        return False
    return hasattr(deep_gemm, "fp4_fp4_mega_moe")


if not _sm100_with_fp4_mega_moe():
    pytest.skip("needs an SM100 GPU and deep_gemm.fp4_fp4_mega_moe", allow_module_level=True)


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    from test_plugin_helpers import layout_b_quant_config, write_layout_b_config
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.network_utils import get_open_port

    d = write_layout_b_config(tmp_path_factory.mktemp("layout_b"), layout_b_quant_config())
    config = EngineArgs(model=str(d), skip_tokenizer_init=True, max_model_len=512,
                        enable_expert_parallel=True).create_engine_config()
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="nccl",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        initialize_model_parallel(1, 1)
        yield config


def test_fp4_fp4_mega_moe_matches_reference(vc) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.formats import (
        dequantize_nvfp4,
        quantize_nvfp4_activation_static,
        quantize_nvfp4_weight,
    )
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes, get_nvfp4_mega_moe_backend

    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    _, experts_cls = classes()
    ex = experts_cls(vc, num_experts=N_EXPERTS, num_local_experts=N_EXPERTS, experts_start_idx=0,
                     top_k=TOP_K, hidden_size=H, intermediate_size=INTER,
                     prefix="b200.layers.1.ffn.experts").to(dev)
    assert type(get_nvfp4_mega_moe_backend(dev, H, INTER)).__name__ == "NvFp4MegaMoEBackend"
    deq: dict[tuple[int, str], torch.Tensor] = {}
    for e in range(N_EXPERTS):
        for w, shape in (("w1", (INTER, H)), ("w3", (INTER, H)), ("w2", (H, INTER))):
            q = quantize_nvfp4_weight(torch.randn(*shape, generator=gen) * 0.02)
            deq[e, w] = dequantize_nvfp4(q.packed, q.block_scale, q.global_scale).to(dev)
            group = "w13_" if w != "w2" else "w2_"
            for suffix, t in (("weight", q.packed), ("weight_scale", q.block_scale),
                              ("weight_scale_2", q.global_scale),
                              ("input_scale", torch.tensor(4.0 / 2688.0))):
                param = getattr(ex, group + suffix)
                ex.weight_loader(param, t.to(dev), group + suffix, w, e)
    ex.finalize_weights()
    a = ex._alphas

    x = (torch.randn(T, H, generator=gen) * 0.5).to(torch.bfloat16).to(dev)
    ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(T)])
    weights = torch.rand(T, TOP_K, generator=gen)
    y = ex(x, weights.to(dev), ids.to(dev), activation_clamp=SWIGLU_LIMIT)
    torch.cuda.synchronize()
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())

    packed, sf = quantize_nvfp4_activation_static(x, a.a1)
    x_deq = dequantize_nvfp4(packed, sf, a.a1)
    ref = torch.zeros(T, H, device=dev)
    for i in range(T):
        for k in range(TOP_K):
            e = int(ids[i, k])
            gate = (deq[e, "w1"] @ x_deq[i]).bfloat16().float().clamp(max=SWIGLU_LIMIT)
            up = (deq[e, "w3"] @ x_deq[i]).bfloat16().float().clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
            h = (torch.nn.functional.silu(gate) * up)[None]
            hp, hsf = quantize_nvfp4_activation_static(h, a.a2_scales[e])
            h_deq = dequantize_nvfp4(hp, hsf, a.a2_scales[e])[0]
            ref[i] += float(weights[i, k]) * (deq[e, "w2"] @ h_deq)
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, f"relative L2 error {rel.item():.3e}"
