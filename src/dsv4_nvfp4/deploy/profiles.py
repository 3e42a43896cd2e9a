"""Deployment profiles and multi-node roles: which compose files, which `vllm serve` argv.

One node runs one of three profiles; two or more nodes run one leader and N-1
workers. Each is `compose.yaml` with at most one override file layered on it,
the way Compose layers files named in ``COMPOSE_FILE`` (the one variable that
chooses: ``COMPOSE_FILE=compose.yaml:compose.throughput.yaml`` in `.env`):

=================  ======================================  =============================
name               files                                    shape
=================  ======================================  =============================
latency            compose.yaml                             TP8 + EP, one engine
throughput         + compose.throughput.yaml                DP8 + EP (TP1): "DEP8"
kv-offload         + compose.kv-offload.yaml                latency + native CPU KV offload
multinode-leader   + compose.multinode-leader.yaml          DP 8xN + EP, ranks 0..7, API
multinode-worker   + compose.multinode-worker.yaml          ranks 8k..8k+7, --headless
=================  ======================================  =============================

An override file restates `services.vllm.command` whole (Compose replaces a
command, it never merges one), so `compose.yaml` stays the one place a flag is
written: each profile declares its `edits` to compose.yaml's command here, and
CI fails if an override file's command is anything but compose.yaml's with
exactly those edits (tests/test_deploy_profiles.py). Everything else of the
service (environment, volumes, healthcheck, restart policy) is compose.yaml's,
merged as Compose merges it; the reader here is checked against the real
Docker Compose binary for every profile.

Nothing here imports vLLM; tests/vllm034/test_profiles_034.py hands every
profile's argv to vLLM 0.34.0's own parser and engine config.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsv4_nvfp4.deploy import compose as dc

BASE_FILE = dc.COMPOSE_FILE_NAME
#: Compose's own variable for the files of a project (separator ':' on Linux).
COMPOSE_FILE_VAR = "COMPOSE_FILE"
#: Every GPU of one 8xB200 node is one data-parallel rank in the DP profiles.
GPUS_PER_NODE = 8
#: vLLM's DeepGEMM MegaMoE (the one MoE backend that cannot span nodes: docs/deploy.md).
MEGA_MOE = "deep_gemm_mega_moe"
#: The routed-expert backends a multi-node role may run (MULTINODE_MOE_BACKEND).
MULTINODE_MOE_BACKENDS = ("auto", "flashinfer_cutedsl")


@dataclass(frozen=True)
class Profile:
    """One way to run the service: its compose files and its edits to compose.yaml's command."""

    name: str
    #: Override file layered on compose.yaml (None: compose.yaml alone).
    override: str | None
    #: What the profile changes in compose.yaml's raw (uninterpolated) command:
    #: flag -> new value (None: a bare switch), replaced in place or appended.
    edits: Mapping[str, str | None] = field(default_factory=dict)
    #: Whether this process serves the OpenAI API (False: a headless worker).
    serves_http: bool = True
    #: Whether the role spans nodes (then the MegaMoE backend is refused).
    multinode: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        return (BASE_FILE,) if self.override is None else (BASE_FILE, self.override)

    @property
    def compose_file_value(self) -> str:
        """The `COMPOSE_FILE` value that selects this profile."""
        return ":".join(self.files)


_DP_SHAPE = {"--tensor-parallel-size": "1"}
_MULTINODE = {
    **_DP_SHAPE,
    # MegaMoE cannot span nodes (docs/deploy.md): a knob of its own, auto by default.
    "--moe-backend": "${MULTINODE_MOE_BACKEND:-auto}",
    "--data-parallel-size": "${DATA_PARALLEL_SIZE:-16}",
    "--data-parallel-size-local": str(GPUS_PER_NODE),
    "--data-parallel-address": "${DATA_PARALLEL_ADDRESS:?set DATA_PARALLEL_ADDRESS in .env "
    "to the leader address on the cluster network}",
    "--data-parallel-rpc-port": "${DATA_PARALLEL_RPC_PORT:-13345}",
}

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("latency", None),
        Profile(
            "throughput",
            "compose.throughput.yaml",
            {**_DP_SHAPE, "--data-parallel-size": str(GPUS_PER_NODE)},
        ),
        Profile(
            "kv-offload",
            "compose.kv-offload.yaml",
            {"--kv-offloading-size": "${KV_OFFLOAD_GIB:-256}", "--kv-offloading-backend": "native"},
        ),
        Profile(
            "multinode-leader",
            "compose.multinode-leader.yaml",
            # Host networking: vLLM's own --host/--port take BIND_ADDRESS/HOST_PORT.
            {**_MULTINODE, "--host": "${BIND_ADDRESS:-127.0.0.1}", "--port": "${HOST_PORT:-8000}"},
            multinode=True,
        ),
        Profile(
            "multinode-worker",
            "compose.multinode-worker.yaml",
            {
                **_MULTINODE,
                "--data-parallel-start-rank": "${DATA_PARALLEL_START_RANK:?set "
                "DATA_PARALLEL_START_RANK in .env to 8 times the node index, 8 on the second node}",
                "--headless": None,
            },
            serves_http=False,
            multinode=True,
        ),
    )
}
ROLES = ("multinode-leader", "multinode-worker")


def get(name: str) -> Profile:
    """The profile or role called `name` (one clear line if there is none)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise dc.ComposeError(
            f"unknown profile {name!r}; one of: {', '.join(PROFILES)}"
        ) from None


def from_compose_file_value(value: str | None) -> Profile:
    """The profile a `COMPOSE_FILE` value selects (unset or empty: latency)."""
    if not value:
        return PROFILES["latency"]
    files = tuple(Path(f).name for f in value.split(":") if f)
    for profile in PROFILES.values():
        if files == profile.files:
            return profile
    raise dc.ComposeError(
        f"{COMPOSE_FILE_VAR}={value}: not a profile of this repository; one of: "
        + ", ".join(p.compose_file_value for p in PROFILES.values())
    )


# ------------------------------------------------------------- layered reading


class _Tag:
    """Compose's `!reset` / `!override` on a value of an override file."""

    def __init__(self, tag: str, value: object) -> None:
        self.tag, self.value = tag, value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(tag: str):  # type: ignore[no-untyped-def]
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> _Tag:
        if isinstance(node, yaml.MappingNode):
            value: object = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        return _Tag(tag, value)

    return construct


for _name in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_name, _tagged(_name))


def load_file(path: Path) -> dict:
    """One compose file's YAML (Compose's `!reset` / `!override` tags understood)."""
    try:
        data = yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise dc.ComposeError(f"{path}: cannot read YAML: {exc}") from None
    if not isinstance(data, dict):
        raise dc.ComposeError(f"{path}: expected a mapping at the top level")
    return data


def _as_env_mapping(value: object) -> dict[str, object]:
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return dict(value or {})


def layered_service(root: Path, profile: Profile, service: str = dc.SERVICE) -> dict:
    """`services.<service>` of the profile's files merged the way Compose merges them,
    for the keys read here: `command` replaced by a later file, `environment` and
    `healthcheck` merged key by key; `!reset` drops a key, `!override` replaces it."""
    merged: dict = {}
    for name in profile.files:
        path = root / name
        services = load_file(path).get("services") or {}
        if service not in services:
            if name == BASE_FILE:
                raise dc.ComposeError(f"{path}: services.{service}: not found")
            continue
        for key, value in (services[service] or {}).items():
            if isinstance(value, _Tag):
                if value.tag == "!reset":
                    merged.pop(key, None)
                    continue
                merged[key] = value.value
            elif key == "environment":
                merged[key] = {**_as_env_mapping(merged.get(key)), **_as_env_mapping(value)}
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}  # e.g. healthcheck: test replaced
            else:
                merged[key] = value
    return merged


def serve_command(
    profile: Profile | str,
    root: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dc.ServeCommand:
    """The profile's `vllm serve` model and flags, interpolated like Compose does."""
    profile = get(profile) if isinstance(profile, str) else profile
    root = root or dc.find_compose_file().parent
    raw = layered_service(root, profile)
    command = raw.get("command")
    where = f"{profile.compose_file_value}: services.{dc.SERVICE}.command"
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command:
        raise dc.ComposeError(f"{where}: expected a non-empty list of arguments")
    env = dc.compose_environment(root / BASE_FILE, env_file, environ)
    argv = [dc.interpolate(str(item), env, where) for item in command]
    if argv[0].startswith("-"):
        return dc.ServeCommand(model=None, flags=argv)
    return dc.ServeCommand(model=argv[0], flags=argv[1:])


def service_environment(
    profile: Profile | str,
    root: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container environment of the profile (interpolated). A variable listed
    without a value takes it from `.env` / the environment, or is left out, as in Compose."""
    profile = get(profile) if isinstance(profile, str) else profile
    root = root or dc.find_compose_file().parent
    declared = _as_env_mapping(layered_service(root, profile).get("environment"))
    env = dc.compose_environment(root / BASE_FILE, env_file, environ)
    where = f"{profile.compose_file_value}: services.{dc.SERVICE}.environment"
    out: dict[str, str] = {}
    for key, value in declared.items():
        if value is None:
            if key in env:
                out[key] = env[key]
        else:
            out[key] = dc.interpolate(str(value), env, f"{where}.{key}")
    return out


def serve_argv(
    profile: Profile | str,
    root: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The whole `vllm serve MODEL FLAGS...` a profile or role runs (the image's
    ENTRYPOINT is `vllm serve`; the compose command is appended to it)."""
    command = serve_command(profile, root, env_file, environ)
    check_backend(get(profile) if isinstance(profile, str) else profile, command.flags)
    return ["vllm", "serve", *command.argv()]


def check_backend(profile: Profile, flags: list[str]) -> None:
    """Refuse a multi-node role on the MegaMoE backend: its symmetric-memory buffer
    needs every expert-parallel rank in one NVLink domain (docs/deploy.md)."""
    backend = dc.flag_value(flags, "--moe-backend")
    if profile.multinode and backend not in MULTINODE_MOE_BACKENDS:
        raise dc.ComposeError(
            f"{profile.name}: --moe-backend {backend}: a multi-node role runs one of "
            f"{', '.join(MULTINODE_MOE_BACKENDS)} ({MEGA_MOE} needs all expert-parallel "
            "ranks in one NVLink domain, one 8-GPU node here; docs/deploy.md)"
        )


def expected_command(root: Path, profile: Profile) -> list[str]:
    """compose.yaml's raw command with the profile's edits: what its file must restate."""
    base = layered_service(root, PROFILES["latency"])["command"]
    model, flags = base[0], base[1:]
    return [model, *dc.with_overrides(flags, profile.edits)]
