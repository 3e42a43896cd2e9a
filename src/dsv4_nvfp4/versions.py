"""The version pins, read from the one pin file (``versions.env`` beside this module)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

PIN_FILE = Path(__file__).with_name("versions.env")


@cache
def pins() -> dict[str, str]:
    """Return ``{KEY: VALUE}`` from ``versions.env`` (comments and blank lines ignored)."""
    out: dict[str, str] = {}
    for raw in PIN_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{PIN_FILE}: line {raw!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def pin(key: str) -> str:
    """One pinned value; KeyError names the pin file when the key is missing."""
    try:
        return pins()[key]
    except KeyError:
        raise KeyError(f"{key} is not pinned in {PIN_FILE}") from None
