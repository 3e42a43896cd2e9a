"""compose.yaml's `vllm serve` command, taken by vLLM 0.34.0's own code (the image's wheel).

Why: the image runs vLLM 0.34.0; a flag, a JSON key or a MoE backend name that
0.34.0 renamed or dropped must fail CI, not the 90-minute cold start on the
B200 node. The command is READ from compose.yaml through
`dsv4_nvfp4.deploy.compose` with `.env.example` (the one source of the flags),
for each MOE_BACKEND value that .env.example documents, interpolated the way
Compose does — never copied here.

Layers: vLLM's `make_arg_parser` (bad values exit 2) and
`validate_parsed_serve_args`; `AsyncEngineArgs.create_engine_config()` on
the CPU platform (the model config through transformers' DeepseekV4Config,
the MTP draft, kernel, cache and attention configs; tensor parallel 8 is only
recorded here, nothing is started); the tokenizer, tool- and reasoning-parser
registries; and what DeepSeek V4 decides from the result (sequence parallel,
hence shared-expert fusion into the MegaMoE kernel).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import get_args

import pytest
from vllm_serve_api import VllmServeApi

from dsv4_nvfp4.deploy import compose as dc

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

# What .env.example documents for MOE_BACKEND (checked against the file below).
MOE_BACKENDS = ("auto", "deep_gemm_mega_moe", "flashinfer_cutedsl")


def compose_flags(moe_backend: str | None = None) -> list[str]:
    """The serve flags of compose.yaml with .env.example, MOE_BACKEND as the environment sets it."""
    environ = {} if moe_backend is None else {"MOE_BACKEND": moe_backend}
    return dc.serve_flags(COMPOSE, env_file=ENV_EXAMPLE, environ=environ)


@pytest.fixture(scope="module")
def vllm_api() -> type[VllmServeApi]:
    """vLLM 0.34.0's serve parser pieces and registries (one import for the module)."""
    return VllmServeApi


@pytest.fixture(scope="module", params=MOE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def parsed(vllm_api, tiny_dsv4_dir: Path, backend: str):
    return vllm_api.parse(tiny_dsv4_dir, compose_flags(backend))


@pytest.fixture(scope="module")
def engine_config(vllm_api, parsed):
    return vllm_api.engine_config(parsed)


def test_env_example_documents_exactly_these_backends_and_vllm_has_them():
    from vllm.config.kernel import MoEBackend

    assert dc.documented_choices(ENV_EXAMPLE, "MOE_BACKEND") == list(MOE_BACKENDS)
    assert dc.read_env_file(ENV_EXAMPLE)["MOE_BACKEND"] == "auto"
    assert set(MOE_BACKENDS) <= set(get_args(MoEBackend))
    # Unset, compose's own default applies: the same value.
    assert compose_flags()[compose_flags().index("--moe-backend") + 1] == "auto"


def test_every_compose_flag_parses(parsed, backend: str):
    """argparse + validate_parsed_serve_args accept the whole command, MOE_BACKEND included."""
    flags = compose_flags(backend)
    assert parsed.moe_backend == backend
    assert parsed.kv_cache_dtype == "fp8"
    assert parsed.block_size == 256
    assert parsed.tensor_parallel_size == 8
    assert parsed.enable_expert_parallel is True
    assert parsed.enable_auto_tool_choice is True
    assert parsed.max_model_len == int(flags[flags.index("--max-model-len") + 1]) == 131072
    assert parsed.served_model_name == ["deepseek-v4-pro"]
    assert parsed.trust_remote_code is False


def test_json_flags_parse_into_vllm_034_configs(parsed):
    assert parsed.compilation_config.cudagraph_mode.name == "FULL_AND_PIECEWISE"
    assert parsed.compilation_config.custom_ops == ["all"]
    attention = parsed.attention_config
    assert attention.indexer_kv_dtype == "mxfp4"
    # 0.34.0's DeepSeek V4 keys, left at the defaults compose.yaml's comment states.
    assert attention.sparse_mla_shard_q is True
    assert attention.sparse_mla_shard_q_min_tokens == 1024
    assert attention.indexer_logits_dtype == "auto"
    assert parsed.speculative_config == {"method": "mtp", "num_speculative_tokens": 2}


def test_engine_config_builds(engine_config, backend: str):
    """create_engine_config: model, MTP draft, kernel, cache and attention configs resolve."""
    c = engine_config
    assert c.model_config.architecture == "DeepseekV4ForCausalLM"
    assert type(c.model_config.hf_config).__module__.startswith("transformers.")
    assert c.model_config.trust_remote_code is False
    assert c.model_config.max_model_len == 131072
    assert c.kernel_config.moe_backend == backend
    assert c.cache_config.cache_dtype == "fp8"
    assert c.cache_config.block_size == 256
    assert c.parallel_config.tensor_parallel_size == 8
    assert c.parallel_config.enable_expert_parallel is True
    assert c.parallel_config.pipeline_parallel_size == 1
    assert c.attention_config.indexer_kv_dtype == "mxfp4"
    spec = c.speculative_config
    assert (spec.method, spec.num_speculative_tokens) == ("mtp", 2)
    assert spec.draft_model_config.architecture == "DeepSeekV4MTPModel"
    # The CPU platform has no CUDA graphs: it rewrites the parsed FULL_AND_PIECEWISE.
    assert c.compilation_config.cudagraph_mode.name == "NONE"


def test_sequence_parallel_fuses_shared_experts_only_with_mega_moe(engine_config, backend):
    """What compose.yaml's comment says: with TP 8 + EP, vLLM runs DeepSeek V4 sequence
    parallel exactly for deep_gemm_mega_moe, the condition for fusing the shared experts."""
    import vllm.envs as envs
    from vllm.models.deepseek_v4.nvidia import model as nv

    assert nv._use_sequence_parallel(engine_config) is (backend == "deep_gemm_mega_moe")
    src = inspect.getsource(nv.DeepseekV4MoE._init_mega_moe_experts)
    assert "self.use_sequence_parallel or self.tp_size == 1" in src
    assert envs.VLLM_DISABLE_DSV4_MEGAMOE_SHARED_EXPERT_FUSION is False
    assert "VLLM_DISABLE_DSV4_MEGAMOE_SHARED_EXPERT_FUSION" not in dc.service_environment(
        COMPOSE, env_file=ENV_EXAMPLE, environ={})


def test_parser_names_exist_in_vllm_registries(vllm_api, parsed):
    assert (parsed.tokenizer_mode, parsed.tool_call_parser, parsed.reasoning_parser) == (
        "deepseek_v4", "deepseek_v4", "deepseek_v4")
    vllm_api.check_names(parsed)


def test_auto_tries_trtllm_gen_first_for_nvfp4():
    """.env.example's `auto` line: vLLM's NVFP4 MoE oracle tries FlashInfer trtllm-gen,
    then CuTe DSL, then CUTLASS."""
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4

    src = inspect.getsource(nvfp4.select_nvfp4_moe_backend)
    order = [src.index(f"NvFp4MoeBackend.{b},") for b in
             ("FLASHINFER_TRTLLM", "FLASHINFER_CUTEDSL", "FLASHINFER_CUTLASS", "VLLM_CUTLASS")]
    assert order == sorted(order)


def test_compose_vllm_env_vars_exist_in_vllm_034():
    """Every VLLM_* variable compose.yaml sets is one vLLM 0.34.0 reads (none renamed)."""
    import vllm.envs as envs

    declared = dc.service_environment(COMPOSE, env_file=ENV_EXAMPLE, environ={})
    ours = {k for k in declared if k.startswith("VLLM_")}
    assert "VLLM_ENGINE_READY_TIMEOUT_S" in ours
    assert ours <= set(envs.environment_variables), sorted(ours - set(envs.environment_variables))


def test_an_unknown_moe_backend_fails(vllm_api, tiny_dsv4_dir: Path):
    with pytest.raises(SystemExit) as excinfo:
        vllm_api.parse(tiny_dsv4_dir, compose_flags("deepgemm"))  # the removed plugin spelling
    assert excinfo.value.code == 2


def test_an_unknown_attention_key_fails(vllm_api, tiny_dsv4_dir: Path):
    """The JSON keys are checked too: the old `use_fp4_indexer_cache` is long gone."""
    old = dc.with_overrides(compose_flags(), {"--attention-config":
                                              '{"use_fp4_indexer_cache": true}'})
    with pytest.raises(SystemExit) as excinfo:
        vllm_api.parse(tiny_dsv4_dir, old)
    assert excinfo.value.code == 2


def test_mega_moe_without_expert_parallel_is_refused_by_the_model(
        vllm_api, tiny_dsv4_dir: Path, single_process_world):
    """Why compose.yaml keeps --enable-expert-parallel: DeepSeek V4's MoE refuses
    deep_gemm_mega_moe without it (checked where vLLM checks it, at layer build)."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MoE

    args = vllm_api.parse(tiny_dsv4_dir,
                          dc.drop_flags(compose_flags("deep_gemm_mega_moe"),
                                        ["--enable-expert-parallel"]))
    config = vllm_api.engine_config(args)
    assert config.parallel_config.enable_expert_parallel is False
    single_process_world(config)
    with pytest.raises(NotImplementedError, match="requires expert parallel"):
        DeepseekV4MoE(config, prefix="model.layers.1.ffn", num_hash_layers=1)
