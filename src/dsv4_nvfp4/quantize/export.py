"""Export the calibrated model with ModelOpt's HF exporter into a complete-or-absent directory.

ModelOpt writes ``config.json``, ``hf_quant_config.json``, safetensors shards
and ``generation_config.json``. We write into ``<export>.partial``, fix the
ignore lists (trap 3), copy the tokenizer files ``convert`` and vLLM need,
add ``quantize_report.json`` last, and only then rename the directory to its
final name — so a directory named ``export`` is always a finished export and
a rerun can skip straight to ``convert``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .traps import add_to_ignore, ensure_architectures, transformers_names

REPORT_FILE = "quantize_report.json"
# Side files of the source checkpoint the served model needs besides weights and config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")


def is_complete(export_dir: Path) -> bool:
    return (export_dir / REPORT_FILE).is_file()


def export_checkpoint(model: nn.Module, export_dir: Path, source: Path,
                      unquantized_linears: list[str], report: dict) -> dict:
    """Run the exporter and the fix-ups; returns the report written beside the weights."""
    from modelopt.torch.export import export_hf_checkpoint

    partial = export_dir.with_name(export_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    ensure_architectures(model)
    with transformers_names(model):
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=partial)
    report = dict(report)
    report["added_to_ignore"] = add_to_ignore(partial, unquantized_linears)
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_file() and not (partial / name).exists():
            shutil.copy2(src, partial / name)
    hf = json.loads((partial / "hf_quant_config.json").read_text(encoding="utf-8"))
    report["exclude_modules"] = hf["quantization"].get("exclude_modules", [])
    tmp = partial / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, partial / REPORT_FILE)
    os.replace(partial, export_dir)
    return report
