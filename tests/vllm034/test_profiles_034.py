"""Every profile's and role's `vllm serve` argv, taken by vLLM 0.34.0's own code.

The argv is READ from the layered compose files through
`dsv4_nvfp4.deploy.profiles` with `.env.example` (the roles with their two
required variables), never copied here, and handed to vLLM 0.34.0's
`make_arg_parser` + `validate_parsed_serve_args` and
`AsyncEngineArgs.create_engine_config()` (the worker's with `headless=True`, as
`vllm serve --headless` builds it) on the CPU platform, for each MoE backend
the profile may run. Then what vLLM decides from each config, and the facts
docs/deploy.md states about vLLM 0.34.0, each checked on its source:

* the MegaMoE requirements: expert parallel in every shape; sequence parallel
  (and so shared-expert fusion) at TP8, no sequence parallel at TP1 but fusion
  all the same, since every TP1 rank holds the whole shared-expert MLP;
* why the multi-node roles run no MegaMoE: its buffer is CUDA symmetric memory
  written through peer pointers, which torch documents for one NVLink domain;
* why multi-node is data parallel and not TP16: Pro's expert intermediate size
  3072 splits into 192-wide TP16 shards, which vLLM's FP8 block check refuses;
* KV offload: `--kv-offloading-size` selects the OffloadingConnector, which keeps
  the hybrid KV-cache manager that DeepSeek V4's cache groups need; an LMCache
  connector turns it off.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import deploy_lint as lint
import pytest
from vllm_serve_api import VllmServeApi

from dsv4_nvfp4.deploy import compose as dc
from dsv4_nvfp4.deploy import profiles as pr

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
SINGLE_NODE_BACKENDS = ("auto", "deep_gemm_mega_moe", "flashinfer_cutedsl")
CASES = [(name, backend)
         for name, profile in pr.PROFILES.items()
         for backend in (pr.MULTINODE_MOE_BACKENDS if profile.multinode else SINGLE_NODE_BACKENDS)]
#: DeepSeek V4 Pro's routed-expert intermediate size (config.json, moe_intermediate_size).
PRO_MOE_INTERMEDIATE = 3072


def argv(name: str, backend: str, **extra: str) -> list[str]:
    """The profile's flags as compose resolves them (.env.example + role example values)."""
    var = "MULTINODE_MOE_BACKEND" if pr.PROFILES[name].multinode else "MOE_BACKEND"
    environ = {**lint.ROLE_EXAMPLE_ENV, var: backend, **extra}
    full = pr.serve_argv(name, ROOT, env_file=ENV_EXAMPLE, environ=environ)
    assert full[:3] == ["vllm", "serve", "/model"]
    return full[3:]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{b}" for n, b in CASES])
def case(request: pytest.FixtureRequest) -> tuple[pr.Profile, str]:
    name, backend = request.param
    return pr.PROFILES[name], backend


@pytest.fixture(scope="module")
def parsed(tiny_dsv4_dir: Path, case):  # type: ignore[no-untyped-def]
    profile, backend = case
    return VllmServeApi.parse(tiny_dsv4_dir, argv(profile.name, backend))


@pytest.fixture(scope="module")
def engine_config(parsed, case):  # type: ignore[no-untyped-def]
    from vllm.engine.arg_utils import AsyncEngineArgs

    profile, _ = case
    return AsyncEngineArgs.from_cli_args(parsed).create_engine_config(
        headless=not profile.serves_http)


def test_every_argv_parses(parsed, case):  # type: ignore[no-untyped-def]
    profile, backend = case
    assert parsed.moe_backend == backend
    assert parsed.enable_expert_parallel is True
    assert parsed.headless is (not profile.serves_http)
    assert parsed.served_model_name == ["deepseek-v4-pro"]
    assert parsed.trust_remote_code is False
    VllmServeApi.check_names(parsed)


def test_engine_config_of_each_shape(engine_config, case):  # type: ignore[no-untyped-def]
    profile, backend = case
    p = engine_config.parallel_config
    shape = (p.tensor_parallel_size, p.data_parallel_size, p.data_parallel_size_local,
             p.data_parallel_rank)
    assert shape == {"latency": (8, 1, 1, 0), "kv-offload": (8, 1, 1, 0),
                     "throughput": (1, 8, 8, 0), "multinode-leader": (1, 16, 8, 0),
                     "multinode-worker": (1, 16, 8, 8)}[profile.name]
    assert p.enable_expert_parallel and p.pipeline_parallel_size == 1
    # MoE layers are sharded over TP x DP ranks: 8 on one node, 16 on two.
    assert p.tensor_parallel_size * p.data_parallel_size == (16 if profile.multinode else 8)
    assert engine_config.kernel_config.moe_backend == backend
    assert engine_config.model_config.architecture == "DeepseekV4ForCausalLM"
    assert engine_config.speculative_config.num_speculative_tokens == 2
    if profile.multinode:
        assert (p.data_parallel_master_ip, p.data_parallel_rpc_port) == ("192.0.2.10", 13345)
        # The leader balances over all ranks (internal LB); a worker is headless.
        assert p.data_parallel_hybrid_lb is False and p.data_parallel_external_lb is False
        assert p.all2all_backend == "allgather_reducescatter"  # NCCL between the nodes


def test_mega_moe_requirements_in_every_shape(engine_config, case):  # type: ignore[no-untyped-def]
    """Sequence parallel (vLLM turns it on itself) exactly where TP > 1 with MegaMoE;
    at TP1 it is off, and the shared experts fuse because tp_size == 1."""
    from vllm.models.deepseek_v4.nvidia import model as nv

    _, backend = case
    sp = nv._use_sequence_parallel(engine_config)
    tp1 = engine_config.parallel_config.tensor_parallel_size == 1
    assert sp is (not tp1 and backend == pr.MEGA_MOE)
    fuse = inspect.getsource(nv.DeepseekV4MoE._init_mega_moe_experts)
    assert "(self.use_sequence_parallel or self.tp_size == 1)" in fuse
    assert engine_config.parallel_config.enable_expert_parallel  # MegaMoE refuses without


def test_the_worker_goes_headless_the_leader_serves(tiny_dsv4_dir: Path):
    """`vllm serve`'s own dispatch: --headless means no API server (run_headless);
    the leader keeps the default API-server count (one per DP rank, internal LB)."""
    from vllm.entrypoints.cli import serve

    src = inspect.getsource(serve.ServeSubcommand.cmd)
    assert "args.api_server_count = 0" in src and "run_headless(args)" in src
    worker = VllmServeApi.parse(tiny_dsv4_dir, argv("multinode-worker", "auto"))
    leader = VllmServeApi.parse(tiny_dsv4_dir, argv("multinode-leader", "auto"))
    assert worker.headless and worker.data_parallel_start_rank == 8
    assert not leader.headless and leader.data_parallel_start_rank is None
    assert (leader.host, leader.port) == ("127.0.0.1", 8000)


def test_megamoe_buffer_is_nvlink_domain_only():
    """The evidence for MULTINODE_MOE_BACKEND: vLLM's vendored DeepGEMM MegaMoE allocates
    its buffer with torch symmetric memory and the kernel writes peers through their
    pointers; torch documents peer pointers for one NVLink domain, not across networks."""
    import torch.distributed._symmetric_memory as symm_mem
    from vllm.third_party.deep_gemm import mega

    src = inspect.getsource(mega)
    assert "symm_mem.rendezvous(self.buffer, group=group)" in src
    assert "sym_buffer.handle.buffer_ptrs" in src
    doc = Path(symm_mem.__file__).read_text()
    assert "only when the group is within NVLink domain or similar. It does not work across\n" \
           "network interfaces." in doc


@pytest.mark.parametrize("tp,refused", [(8, False), (16, True)])
def test_tp16_shards_of_pro_experts_are_not_fp8_blocks(tp: int, refused: bool, monkeypatch):  # type: ignore[no-untyped-def]
    """3072 / 16 = 192 is not a multiple of the 128-wide FP8 block: vLLM 0.34.0's block
    check refuses the row-parallel shard (e.g. the shared experts' down projection)."""
    import vllm.distributed
    from vllm.model_executor.layers.quantization.utils.fp8_utils import validate_fp8_block_shape

    # The check reads the layer's tp_size; its fallback asks for a process group first.
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: tp)

    layer = types.SimpleNamespace(tp_size=tp, prefix="shared_experts.down_proj")
    shard = PRO_MOE_INTERMEDIATE // tp

    def check() -> None:
        validate_fp8_block_shape(layer, PRO_MOE_INTERMEDIATE, 7168, shard, [7168], [128, 128])

    if refused:
        with pytest.raises(ValueError, match="192 is not divisible by weight quantization"):
            check()
    else:
        check()


@pytest.fixture(scope="module")
def kv_config(tiny_dsv4_dir: Path):  # type: ignore[no-untyped-def]
    return VllmServeApi.engine_config(VllmServeApi.parse(tiny_dsv4_dir,
                                                         argv("kv-offload", "auto")))


def test_kv_offload_is_the_native_offloading_connector(kv_config):  # type: ignore[no-untyped-def]
    import vllm.envs as envs

    kv = kv_config.kv_transfer_config
    assert envs.VLLM_USE_SIMPLE_KV_OFFLOAD is False  # else SimpleCPUOffloadConnector
    assert kv.kv_connector == "OffloadingConnector" and kv.kv_role == "kv_both"
    assert kv.kv_connector_extra_config["cpu_bytes_to_use"] == 256 * (1 << 30)
    assert kv_config.cache_config.kv_offloading_backend == "native"


def test_kv_offload_keeps_the_hybrid_kv_cache_manager(kv_config, tiny_dsv4_dir: Path):  # type: ignore[no-untyped-def]
    """The decision of docs/deploy.md: the OffloadingConnector supports HMA, so DeepSeek
    V4's cache groups stay separate; LMCacheConnectorV1 does not, and vLLM turns HMA off."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert KVConnectorFactory.supports_hma_config(kv_config.kv_transfer_config)
    assert kv_config.scheduler_config.disable_hybrid_kv_cache_manager is False
    lmcache = dc.with_overrides(argv("latency", "auto"), {
        "--kv-transfer-config": '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'})
    config = VllmServeApi.engine_config(VllmServeApi.parse(tiny_dsv4_dir, lmcache))
    assert not KVConnectorFactory.supports_hma_config(config.kv_transfer_config)
    assert config.scheduler_config.disable_hybrid_kv_cache_manager is True


def test_the_offloading_scheduler_is_written_for_deepseek_v4_groups():
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading import config, scheduler

    assert "architectures like DeepSeek V4 (MLA + SWA groups)" in inspect.getsource(
        scheduler.SchedulerOffloadConfig.from_spec)
    # Every prefix-cacheable group is offloaded, however many there are.
    assert "return kv_cache_config.prefix_cacheable_group_ids" in inspect.getsource(
        config.get_offloading_group_ids)


def test_lmcache_mp_builtin_refuses_more_than_one_kv_group():
    """vLLM's built-in LMCacheMPConnector (used when the lmcache package lacks its own)
    raises on a request with more than one KV-cache group: DeepSeek V4 has several."""
    import vllm

    path = Path(vllm.__file__).parent / (
        "distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py")
    src = path.read_text()
    assert "LMCacheMPConnector only works without hybrid kv cache manager." in src


def test_deepseek_v4_kv_cache_is_several_spec_kinds():
    """The groups: compressed MLA (tokens_per_state = compress ratio), the sliding-window
    cache and the compressor state as SlidingWindowMLASpec."""
    from vllm.models.deepseek_v4 import attention, compressor
    from vllm.v1.attention.backends.mla import sparse_swa

    assert "tokens_per_state=self.compress_ratio" in inspect.getsource(
        attention.DeepseekV4Attention.get_kv_cache_spec)
    assert "return SlidingWindowMLASpec(" in inspect.getsource(
        sparse_swa.DeepseekV4SWACache.get_kv_cache_spec)
    assert "return SlidingWindowMLASpec(" in inspect.getsource(
        compressor.CompressorStateCache.get_kv_cache_spec)
