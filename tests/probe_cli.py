"""The readiness probe run the way compose runs it, minus every site-packages directory.

Compose runs ``python3 -m dsv4_nvfp4 health ready`` in the image. Tests run the
same command line in a fresh interpreter with ``-I -S`` (isolated: no
site-packages, no user site, no PYTHON* variables) and only this checkout's
``src`` on the path, so a probe that needed anything beyond the standard library
would fail here.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
_RUN = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from dsv4_nvfp4.cli import main; sys.exit(main())"
)


def isolated_health_argv(*args: str) -> list[str]:
    """argv for ``dsv4-nvfp4 health ARGS`` in an interpreter without site-packages."""
    return [sys.executable, "-I", "-S", "-c", _RUN, str(SRC), "health", *args]
