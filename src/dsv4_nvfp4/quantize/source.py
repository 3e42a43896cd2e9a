"""Check the source checkpoint before anything heavy: BF16 DeepSeek V4, readable, MTP noted.

Why before loading: loading V4 Pro takes tens of minutes and terabytes of
memory; a checkpoint that is already quantized (native layout A, or an NVFP4
layout B/C) must be refused in a second, with the command that handles it.
Only safetensors headers are read (kilobytes), through the checkpoint
toolkit's reader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.errors import CheckpointError
from ..checkpoint.reader import open_checkpoint
from .errors import QuantizeInputError

# Tensors that DeepSeek V4 keeps in fp32 (hyper-connections, sinks, compressor
# position biases, router bias) or int64 (hash-routing table); everything named
# ``*.weight`` must be BF16.
_QUANTIZED_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "F4"}

LAYOUT_A_HINT = (
    "ModelOpt calibrates BF16 weights. For a native DeepSeek V4 checkpoint (layout A) either "
    "`dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4 --input-scales-from NVFP4_CHECKPOINT` "
    "(lossless MXFP4->NVFP4 cast of the experts, input scales from a published NVFP4 "
    "checkpoint), or `dsv4-nvfp4 convert SRC BF16_DIR --to bf16` and quantize BF16_DIR")


@dataclass(frozen=True)
class SourceInfo:
    path: Path
    config: dict
    n_tensors: int
    total_bytes: int
    mtp_tensors: int           # ``mtp.*`` tensors on disk (transformers never loads them)
    mtp_layers_in_config: int  # num_nextn_predict_layers
    fingerprint: str           # names, dtypes, shapes and file sizes (resume stamp)


def inspect_source(path: Path) -> SourceInfo:
    """Validate ``path`` as a BF16 DeepSeek V4 checkpoint; :class:`QuantizeInputError` if not."""
    try:
        ck = open_checkpoint(path)
    except CheckpointError as e:
        raise QuantizeInputError(str(e)) from None
    if ck.problems:
        first = ck.problems[0]
        raise QuantizeInputError(f"{path}: {first.line()}"
                                 + (f" (+{len(ck.problems) - 1} more)" if len(ck.problems) > 1
                                    else ""))
    cfg = ck.config
    if cfg.get("model_type") != "deepseek_v4":
        raise QuantizeInputError(f"{path}/config.json: model_type: expected 'deepseek_v4', "
                                 f"found {cfg.get('model_type')!r}")
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        method, moe = qc.get("quant_method"), qc.get("moe_quant_algo")
        if moe == "NVFP4":
            raise QuantizeInputError(f"{path}/config.json: expected an unquantized BF16 "
                                     "checkpoint, found NVIDIA NVFP4 (layout B: already "
                                     "quantized, serve or verify it)")
        if method == "modelopt":
            raise QuantizeInputError(f"{path}/config.json: expected an unquantized BF16 "
                                     "checkpoint, found a ModelOpt export (layout C): run "
                                     "`dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4`")
        raise QuantizeInputError(f"{path}/config.json: expected an unquantized BF16 checkpoint, "
                                 f"found quantization_config quant_method={method!r} (native "
                                 f"FP8/MXFP4, layout A). {LAYOUT_A_HINT}")
    bad = [t for t in ck.tensors.values()
           if t.dtype in _QUANTIZED_DTYPES or (t.name.endswith(".weight") and t.dtype != "BF16")]
    if bad:
        t = bad[0]
        hint = LAYOUT_A_HINT if t.dtype in _QUANTIZED_DTYPES else "re-save the weights in BF16"
        raise QuantizeInputError(f"{t.file.name}: {t.name}: expected BF16, found {t.dtype} "
                                 f"({len(bad)} such tensors). {hint}")
    fp = hashlib.sha256()
    for name in sorted(ck.tensors):
        t = ck.tensors[name]
        fp.update(f"{name}|{t.dtype}|{t.shape}\n".encode())
    for fname in sorted(ck.shards):
        fp.update(f"{fname}|{ck.shards[fname].file_size}\n".encode())
    return SourceInfo(
        path=path, config=cfg, n_tensors=len(ck.tensors), total_bytes=ck.total_bytes(),
        mtp_tensors=sum(1 for n in ck.tensors if n.startswith(("mtp.", "model.mtp."))),
        mtp_layers_in_config=int(cfg.get("num_nextn_predict_layers") or 0),
        fingerprint=fp.hexdigest())
