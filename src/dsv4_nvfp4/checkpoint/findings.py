"""A finding of the linter: which file, which tensor, what was expected, what was found.

Shared by the reader (index and shard problems), ``verify`` and ``convert``
(which refuses input with findings), so every tool words a problem the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    """One problem. ``severity`` is ``"error"`` (exit 1) or ``"note"`` (reported, exit 0).

    ``check`` is a stable identifier (e.g. ``"scale.e4m3_sign"``) that tests and
    ``--json`` consumers key on; ``expected``/``found`` are human-readable.
    """

    check: str
    file: str
    tensor: str
    expected: str
    found: str
    severity: str = "error"

    def line(self) -> str:
        where = f"{self.file}: {self.tensor}" if self.tensor else self.file
        return f"{where}: expected {self.expected}, found {self.found} [{self.check}]"

    def as_dict(self) -> dict:
        return asdict(self)
