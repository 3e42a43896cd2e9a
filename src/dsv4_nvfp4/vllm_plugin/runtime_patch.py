"""What one runtime patch of vLLM is (:class:`Patch`), and how its wrapper is marked.

Why a module of its own: each patch lives beside the code it concerns
(:mod:`.cpu_fixes`, :mod:`.staging_patch`) and builds its :class:`Patch` record
here, while :mod:`.patch_register` lists every record and applies them. With
the record type in the register itself, the register and the patches would
import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

#: Attribute set on a wrapper so that applying a patch twice is a no-op.
PATCH_MARKER = "__dsv4_nvfp4_patch__"


@dataclass(frozen=True)
class Patch:
    """One runtime patch of a vLLM symbol.

    Attributes:
        name: short id, used in logs and tests.
        module: dotted module that owns ``symbol``.
        symbol: ``Class.method`` or ``function`` inside ``module``.
        why: what breaks without it.
        upstream: upstream issue/PR (or "not filed" with the reason).
        remove_when: the condition under which this entry is deleted.
        active: called at apply time; False skips the patch (e.g. not the CPU platform).
        apply: called with the imported module; installs the wrapper.
    """

    name: str
    module: str
    symbol: str
    why: str
    upstream: str
    remove_when: str
    active: Callable[[], bool]
    apply: Callable[[ModuleType], None]


def resolve_symbol(module: ModuleType, symbol: str) -> tuple[object, str]:
    """Return ``(owner, attribute)`` for ``symbol`` inside ``module`` (``A.b`` -> (A, "b"))."""
    owner: object = module
    *path, attr = symbol.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def is_patched(module: ModuleType, symbol: str) -> bool:
    """True when ``symbol`` in ``module`` is one of our wrappers."""
    owner, attr = resolve_symbol(module, symbol)
    return bool(getattr(getattr(owner, attr, None), PATCH_MARKER, False))


def mark(wrapper: Callable, original: Callable, patch_name: str) -> Callable:
    """Tag ``wrapper`` as our patch of ``original`` (kept reachable as ``__wrapped__``)."""
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(wrapper, PATCH_MARKER, patch_name)
    wrapper.__name__ = getattr(original, "__name__", wrapper.__name__)
    wrapper.__qualname__ = getattr(original, "__qualname__", wrapper.__qualname__)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper
