"""Hand the ModelOpt export (layout C) to the checkpoint toolkit → layout B, then verify it.

The one place the quantize runner touches the converter and the linter, so a
change of their API is a change here only. ``convert`` plans every tensor and
validates its input before writing, streams shard by shard and resumes after
a kill; the runner only passes ``--mtp-from`` (graft ``mtp.*`` from the
native checkpoint, since transformers dropped it) and ``--dense``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import QuantizeCheckError


def convert_to_layout_b(export_dir: Path, out_dir: Path, mtp_from: Path | None,
                        dense: str, progress: bool) -> list[str]:
    """``dsv4-nvfp4 convert EXPORT OUT --to nvidia-nvfp4`` in process; returns its warnings."""
    from ..checkpoint.convert_exec import execute
    from ..checkpoint.convert_plan import Target, plan
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.transforms import DenseMode
    from ..formats import FormatError

    try:
        p = plan(export_dir, Target.NVFP4, DenseMode(dense), mtp_from, None)
        for w in p.warnings:
            print(w, file=sys.stderr, flush=True)
        execute(p, out_dir, progress=progress)
    except (CheckpointError, FormatError) as e:
        raise QuantizeCheckError(f"convert refused the export ({e}); the ModelOpt export is "
                                 f"kept complete at {export_dir}") from None
    return list(p.warnings)


def verify_output(out_dir: Path) -> list[str]:
    """``dsv4-nvfp4 verify OUT``: the finding lines (empty when clean)."""
    from ..checkpoint.verify import verify

    rep = verify(out_dir)
    return [f.line() for f in rep.findings]
