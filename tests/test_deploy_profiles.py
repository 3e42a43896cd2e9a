"""The profiles and multi-node roles, validated by the real Docker Compose v2 binary.

Each profile or role is compose.yaml with one override file layered on it
(`COMPOSE_FILE`, src/dsv4_nvfp4/deploy/profiles.py). What is checked here:

* `docker compose config` accepts every layering with .env.example (the roles
  with their two required variables set), and refuses a role without them;
* our layered reader resolves the same command and container environment as the
  binary, for every profile, so `dsv4-nvfp4 serve` runs what compose runs;
* each override file restates compose.yaml's command with exactly the edits its
  profile declares, nothing else (compose.yaml stays the one place of a flag);
* the multi-node roles' network, devices and probes, and the MegaMoE refusal;
* .env.example documents every variable and every COMPOSE_FILE choice.

vLLM 0.34.0's own parser and engine config take every argv in
tests/vllm034/test_profiles_034.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import deploy_lint as lint
import pytest

from dsv4_nvfp4.deploy import compose as dc
from dsv4_nvfp4.deploy import profiles as pr

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / ".env.example"
# What a multi-node .env adds (lint's example values) plus an NCCL variable, set.
ROLE_ENV = {**lint.ROLE_EXAMPLE_ENV, "NCCL_SOCKET_IFNAME": "ib0"}

pytestmark = pytest.mark.cpu


def config(profile: pr.Profile, extra_env: dict[str, str] | None = None,
           env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    return lint.run_compose(ROOT, ["config", "--format", "json"], env_file=env_file,
                            compose_file=[ROOT / f for f in profile.files], extra_env=extra_env)


@pytest.fixture(scope="module", params=list(pr.PROFILES))
def profile(request: pytest.FixtureRequest) -> pr.Profile:
    return pr.PROFILES[request.param]


@pytest.fixture(scope="module")
def resolved(profile: pr.Profile) -> dict:
    """The binary's view of the vllm service for this profile, with ROLE_ENV set."""
    result = config(profile, ROLE_ENV)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["vllm"]


def test_every_layering_passes_compose_config(profile: pr.Profile):
    extra = lint.ROLE_EXAMPLE_ENV if profile.multinode else None
    result = lint.run_compose(ROOT, ["config", "--quiet"],
                              compose_file=[ROOT / f for f in profile.files], extra_env=extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_our_reader_resolves_what_compose_runs(profile: pr.Profile, resolved: dict):
    ours = pr.serve_command(profile, ROOT, env_file=ENV_EXAMPLE, environ=ROLE_ENV)
    assert ours.argv() == resolved["command"]
    assert ours.model == "/model"
    env = pr.service_environment(profile, ROOT, env_file=ENV_EXAMPLE, environ=ROLE_ENV)
    # A variable listed without a value and unset stays out of the container (None here).
    assert env == {k: v for k, v in resolved["environment"].items() if v is not None}
    assert pr.serve_argv(profile, ROOT, env_file=ENV_EXAMPLE, environ=ROLE_ENV)[:3] == [
        "vllm", "serve", "/model"]


def test_override_files_restate_compose_yaml_with_exactly_the_declared_edits(
        profile: pr.Profile):
    """compose.yaml stays the one place a flag is written: an override file's command is
    compose.yaml's with its profile's edits, token for token (raw, before interpolation)."""
    raw = pr.layered_service(ROOT, profile)["command"]
    assert raw == pr.expected_command(ROOT, profile), (
        f"{profile.override} drifted from compose.yaml + {dict(profile.edits)}; restate it as: "
        f"{pr.expected_command(ROOT, profile)}")


def test_the_check_above_catches_a_flag_changed_in_compose_yaml_only(tmp_path: Path):
    for name in ("compose.yaml", *(p.override for p in pr.PROFILES.values() if p.override)):
        (tmp_path / name).write_text((ROOT / name).read_text())
    base = tmp_path / "compose.yaml"
    base.write_text(base.read_text().replace('      - "256"\n', '      - "64"\n', 1))
    throughput = pr.PROFILES["throughput"]
    assert pr.layered_service(tmp_path, throughput)["command"] != pr.expected_command(
        tmp_path, throughput)


def test_the_shapes(resolved: dict, profile: pr.Profile):
    flags = resolved["command"][1:]
    tp, dp = dc.flag_value(flags, "--tensor-parallel-size"), dc.flag_value(
        flags, "--data-parallel-size")
    assert dc.has_flag(flags, "--enable-expert-parallel")  # MegaMoE's requirement, everywhere
    expected = {"latency": ("8", None), "kv-offload": ("8", None), "throughput": ("1", "8"),
                "multinode-leader": ("1", "16"), "multinode-worker": ("1", "16")}
    assert (tp, dp) == expected[profile.name]
    assert dc.has_flag(flags, "--headless") is (not profile.serves_http)
    if profile.multinode:
        assert dc.flag_value(flags, "--data-parallel-size-local") == "8"
        assert dc.flag_value(flags, "--data-parallel-address") == "192.0.2.10"
        assert dc.flag_value(flags, "--data-parallel-rpc-port") == "13345"
        assert dc.flag_value(flags, "--moe-backend") == "auto"
    assert (dc.flag_value(flags, "--data-parallel-start-rank") == "8") is (
        profile.name == "multinode-worker")
    assert (dc.flag_value(flags, "--kv-offloading-size") == "256") is (
        profile.name == "kv-offload")


@pytest.mark.parametrize("role,missing", [("multinode-leader", "DATA_PARALLEL_ADDRESS"),
                                          ("multinode-worker", "DATA_PARALLEL_ADDRESS"),
                                          ("multinode-worker", "DATA_PARALLEL_START_RANK")])
def test_a_role_without_its_required_variable_is_refused(role: str, missing: str):
    env = {k: v for k, v in lint.ROLE_EXAMPLE_ENV.items() if k != missing}
    result = config(pr.PROFILES[role], env)
    assert result.returncode != 0
    assert missing in result.stderr
    with pytest.raises(dc.ComposeError, match=f"{missing} is missing"):
        pr.serve_command(role, ROOT, env_file=ENV_EXAMPLE, environ=env)


def test_roles_use_host_networking_rdma_devices_and_no_published_port(resolved: dict,
                                                                      profile: pr.Profile):
    if not profile.multinode:
        assert "network_mode" not in resolved
        (port,) = resolved["ports"]
        assert (port["host_ip"], port["target"]) == ("127.0.0.1", 8000)
        return
    assert resolved["network_mode"] == "host"
    assert "ports" not in resolved
    assert [d["source"] for d in resolved["devices"]] == ["/dev/infiniband"]
    assert resolved["cap_add"] == ["IPC_LOCK"]
    assert resolved["ulimits"]["memlock"] == -1  # compose.yaml's, kept
    # NCCL/Gloo settings reach the container only when .env sets them.
    assert resolved["environment"]["NCCL_SOCKET_IFNAME"] == "ib0"
    assert resolved["environment"]["NCCL_IB_HCA"] is None


def test_probes(resolved: dict, profile: pr.Profile):
    base = dc.load_compose(ROOT / "compose.yaml")["services"]["vllm"]["healthcheck"]
    if not profile.serves_http:
        assert resolved["healthcheck"] == {"disable": True}  # headless: no HTTP to ask
        return
    test = resolved["healthcheck"]["test"]
    assert test[:6] == ["CMD", "python3", "-m", "dsv4_nvfp4", "health", "ready"]
    assert test[-2:] == ["--model", "deepseek-v4-pro"]
    if profile.name == "multinode-leader":  # vLLM's own --host/--port under host networking
        assert test[6:8] == ["--url", "http://127.0.0.1:8000"]
    else:
        assert len(test) == 8
    # compose.yaml's timing, unchanged: the 90-minute start period covers every profile.
    assert resolved["healthcheck"]["start_period"] == "1h30m0s"
    assert base["start_period"] == "90m"


def test_leader_probe_follows_bind_address_and_port():
    result = config(pr.PROFILES["multinode-leader"],
                    {**ROLE_ENV, "BIND_ADDRESS": "0.0.0.0", "HOST_PORT": "9000"})
    service = json.loads(result.stdout)["services"]["vllm"]
    assert service["healthcheck"]["test"][6:8] == ["--url", "http://0.0.0.0:9000"]
    flags = service["command"]
    assert flags[flags.index("--host") + 1 :][:3] == ["0.0.0.0", "--port", "9000"]


def test_multinode_refuses_the_megamoe_backend():
    env = {**ROLE_ENV, "MULTINODE_MOE_BACKEND": "deep_gemm_mega_moe"}
    for role in pr.ROLES:
        with pytest.raises(dc.ComposeError, match="one NVLink domain"):
            pr.serve_argv(role, ROOT, env_file=ENV_EXAMPLE, environ=env)
    # One node is one NVLink domain: the single-node profiles take it.
    argv = pr.serve_argv("throughput", ROOT, env_file=ENV_EXAMPLE,
                         environ={"MOE_BACKEND": "deep_gemm_mega_moe"})
    assert dc.flag_value(argv[3:], "--moe-backend") == "deep_gemm_mega_moe"


def test_compose_file_selects_the_profile():
    for profile in pr.PROFILES.values():
        assert pr.from_compose_file_value(profile.compose_file_value) is profile
    assert pr.from_compose_file_value(None).name == "latency"
    assert pr.from_compose_file_value("./compose.yaml:./compose.throughput.yaml").name == (
        "throughput")
    with pytest.raises(dc.ComposeError, match="not a profile"):
        pr.from_compose_file_value("compose.throughput.yaml")  # without compose.yaml


def test_compose_reads_compose_file_from_the_env_file(tmp_path: Path):
    """The one variable works for Compose itself: COMPOSE_FILE in the env file, no -f."""
    env_file = tmp_path / "env"
    env_file.write_text(ENV_EXAMPLE.read_text()
                        + "COMPOSE_FILE=compose.yaml:compose.throughput.yaml\n")
    cmd = [str(lint.compose_binary()), "--project-directory", str(ROOT), "--env-file",
           str(env_file), "config", "--format", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    command = json.loads(result.stdout)["services"]["vllm"]["command"]
    assert dc.flag_value(command[1:], "--data-parallel-size") == "8"


def _variables(path: Path) -> set[str]:
    code = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", code))


def _env_list_names(path: Path) -> set[str]:
    """Variables an override file passes through by name (`NAME:` without a value)."""
    service = pr.load_file(path)["services"]["vllm"]
    return {k for k, v in pr._as_env_mapping(service.get("environment")).items() if v is None}


def test_env_example_documents_every_variable_and_choice():
    text = ENV_EXAMPLE.read_text()
    active = set(dc.read_env_file(ENV_EXAMPLE))
    commented = set(re.findall(r"(?m)^# ([A-Z][A-Z0-9_]*)=", text))
    for profile in pr.PROFILES.values():
        if profile.override is None:
            continue
        path = ROOT / profile.override
        used = _variables(path) | _env_list_names(path)
        assert used <= active | commented, f"{path.name}: undocumented {used - active - commented}"
        assert f"# COMPOSE_FILE={profile.compose_file_value} " in text
    # The documented multi-node backends are the ones the roles accept.
    lines = text.splitlines()
    at = lines.index(f"# MULTINODE_MOE_BACKEND={pr.MULTINODE_MOE_BACKENDS[0]}")
    block = " ".join(lines[at - 2 : at])
    assert f"{' or '.join(pr.MULTINODE_MOE_BACKENDS)} ({pr.MEGA_MOE}" in block
    # None of the new variables is active in .env.example: the latency profile is the default.
    assert "COMPOSE_FILE" not in active and "KV_OFFLOAD_GIB" not in active


def test_unknown_profile_is_one_line():
    with pytest.raises(dc.ComposeError, match="unknown profile 'fast'; one of: latency"):
        pr.get("fast")


# ------------------------------------------------ `dsv4-nvfp4 serve` on bare metal

SERVE_ENV = {"VLLM_API_KEY": "k", **lint.ROLE_EXAMPLE_ENV}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("name", ["throughput", "kv-offload", "multinode-leader"])
def test_serve_runs_a_profile_with_its_compose_flags_and_environment(model_dir: Path,
                                                                     name: str):
    from dsv4_nvfp4.launch import serve

    cfg = serve.build_server_config(model_dir, profile=name, environ=SERVE_ENV)
    expected = pr.serve_command(name, ROOT, environ=SERVE_ENV)
    assert list(cfg.serve_args) == expected.flags
    assert cfg.env == pr.service_environment(name, ROOT, environ=SERVE_ENV)


def test_serve_follows_compose_file_like_compose_does(model_dir: Path):
    from dsv4_nvfp4.launch import serve

    env = {**SERVE_ENV, "COMPOSE_FILE": pr.PROFILES["throughput"].compose_file_value}
    cfg = serve.build_server_config(model_dir, environ=env)
    assert dc.flag_value(cfg.serve_args, "--data-parallel-size") == "8"
    # The CPU demo serves compose.yaml's flags whatever .env selects.
    cpu = serve.build_server_config(model_dir, cpu=True, environ=env)
    assert not dc.has_flag(cpu.serve_args, "--data-parallel-size")
    with pytest.raises(serve.ServeError, match=r"--cpu serves compose\.yaml's latency flags"):
        serve.build_server_config(model_dir, cpu=True, profile="throughput", environ=env)


def test_serve_refuses_megamoe_across_nodes_and_a_headless_server(model_dir: Path):
    from dsv4_nvfp4.launch import serve

    env = {**SERVE_ENV, "MULTINODE_MOE_BACKEND": "deep_gemm_mega_moe"}
    with pytest.raises(serve.ServeError, match="one NVLink domain"):
        serve.build_server_config(model_dir, profile="multinode-leader", environ=env)
    with pytest.raises(serve.ServeError, match="headless"):
        serve.build_server_config(model_dir, profile="multinode-worker", environ=SERVE_ENV)


def test_serve_runs_a_worker_as_vllm_serve_headless(model_dir: Path, capsys, monkeypatch):
    from dsv4_nvfp4.cli import main as cli_main

    for key, value in SERVE_ENV.items():
        monkeypatch.setenv(key, value)
    code = cli_main(["serve", "--profile", "multinode-worker", "--model-dir", str(model_dir),
                     "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "VLLM_API_KEY=..." in out and "=k " not in out
    argv = shlex.split(out.split(" -m ", 1)[1])
    assert argv[:3] == ["vllm.entrypoints.cli.main", "serve", str(model_dir)]
    assert argv[3:] == pr.serve_command("multinode-worker", ROOT, environ=SERVE_ENV).flags
