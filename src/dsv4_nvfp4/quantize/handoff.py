"""Hand the ModelOpt export (layout C) to the checkpoint toolkit's ``convert`` → layout B.

The one place the quantize runner touches the converter, so a change of its
API is a change here only. ``convert`` streams shard by shard, resumes after
a kill and validates its input before writing; the runner adds nothing to it
but the arguments: ``--mtp-from`` (graft ``mtp.*`` from the native checkpoint,
since transformers dropped it) and ``--dense`` (FP8 or BF16 dense linears).
"""

from __future__ import annotations

from pathlib import Path

from .errors import QuantizeCheckError


def convert_to_layout_b(export_dir: Path, out_dir: Path, mtp_from: Path | None,
                        dense: str, progress: bool) -> None:
    """Run ``dsv4-nvfp4 convert EXPORT OUT --to nvidia-nvfp4`` in process."""
    try:
        from ..checkpoint import convert as ck_convert
    except ImportError:
        raise QuantizeCheckError(
            f"the checkpoint converter is not available in this build; the ModelOpt export is "
            f"complete at {export_dir}: run `dsv4-nvfp4 convert {export_dir} {out_dir} "
            f"--to nvidia-nvfp4`") from None
    ck_convert.convert(export_dir, out_dir, to="nvidia-nvfp4", mtp_from=mtp_from, dense=dense,
                       progress=progress)
