"""``dsv4-nvfp4 quantize``: BF16 DeepSeek V4 → ModelOpt NVFP4 calibration → export → layout B.

Stages, each resumable from the work directory (default ``OUTPUT.work``):

1. check the source (BF16, DeepSeek V4, MTP noted) and build the calibration
   samples — seconds, before anything heavy;
2. load with transformers, calibrate with ModelOpt (``calibration.pt`` saved);
3. audit what ModelOpt quantized, check every expert saw tokens, export
   (``export/``, complete or absent);
4. ``convert`` the export to layout B in OUTPUT (itself resumable).

A rerun with the same inputs skips finished stages; different inputs against
an existing work directory stop with a message (``--restart`` discards it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from .errors import EXIT_OK, QuantizeCheckError, QuantizeInputError
from .recipes import Recipe

STAMP_FILE = "stamp.json"
EXPORT_DIR = "export"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="calibrate a BF16 DeepSeek V4 checkpoint with ModelOpt into NVFP4 (layout B)",
        description="Load a BF16 DeepSeek V4 checkpoint with transformers, calibrate it with "
                    "NVIDIA ModelOpt, export, and convert the export to the layout vLLM "
                    "serves (NVFP4 routed experts, FP8 dense). Resumable.")
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="BF16 DeepSeek V4 checkpoint directory")
    p.add_argument("output", type=Path, help="layout-B output directory")
    p.add_argument("--recipe", choices=[r.value for r in Recipe], default=Recipe.EXPERTS.value,
                   help="experts: routed experts only, NVFP4 W4A4 (default); full: every "
                        "linear ModelOpt quantizes")
    p.add_argument("--calib", type=Path, default=None,
                   help="JSON lines of chat conversations ({'messages': [...]}); default: "
                        "the small built-in set")
    p.add_argument("--num-samples", type=_positive, default=512,
                   help="calibration samples (default 512)")
    p.add_argument("--seq-len", type=_positive, default=2048,
                   help="tokens per calibration sample (default 2048)")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="samples per forward pass (default 1)")
    p.add_argument("--device-map", default="auto",
                   help="transformers device_map: auto (all visible GPUs), balanced, "
                        "sequential, cuda:N, or cpu (dry run of a tiny checkpoint)")
    p.add_argument("--max-gpu-memory", type=float, default=None, metavar="GIB",
                   help="GiB of each GPU the weights may use (rest offloads to CPU/disk)")
    p.add_argument("--offload-dir", type=Path, default=None,
                   help="directory for disk offload when GPU and CPU memory are not enough")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="calibration state and ModelOpt export (default: OUTPUT.work)")
    p.add_argument("--mtp-from", type=Path, default=None, metavar="NATIVE",
                   help="native checkpoint whose mtp.* convert grafts into the output")
    p.add_argument("--dense", choices=["fp8", "bf16"], default="fp8",
                   help="dense linears in the output: FP8 128x128 (default) or BF16")
    p.add_argument("--allow-uncalibrated-experts", action="store_true",
                   help="report, instead of failing on, routed experts no calibration token "
                        "reached")
    p.add_argument("--export-only", action="store_true",
                   help="stop after the ModelOpt export (no convert)")
    p.add_argument("--restart", action="store_true",
                   help="discard an existing work directory and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}"
                                         ) from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {v}")
    return v


def _say(msg: str) -> None:
    print(f"quantize: {msg}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("nvidia-modelopt", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def _stamp(args, source_fp: str, calib_digest: str, versions: dict[str, str]) -> dict:
    return {"source": str(args.checkpoint.resolve()), "source_fingerprint": source_fp,
            "recipe": args.recipe, "calibration_digest": calib_digest,
            "versions": {k: versions[k] for k in ("nvidia-modelopt", "transformers")}}


def _prepare_work(work: Path, stamp: dict, restart: bool) -> None:
    """Create or reuse the work directory; refuse one that belongs to other inputs."""
    path = work / STAMP_FILE
    if restart and work.exists():
        shutil.rmtree(work)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != stamp:
            diff = sorted(k for k in stamp if old.get(k) != stamp[k])
            raise QuantizeInputError(f"{work}: expected a work directory of this run, found one "
                                     f"whose {', '.join(diff)} differ; pass --restart to "
                                     "discard it or --work-dir to use another")
        return
    if work.exists() and any(work.iterdir()):
        raise QuantizeInputError(f"{work}: expected an empty or absent work directory, found "
                                 "other files; pass --restart or another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def _validate_paths(args) -> None:
    if args.output.resolve() == args.checkpoint.resolve():
        raise QuantizeInputError(f"output {args.output}: expected a directory other than the "
                                 "source checkpoint, found the same")
    if args.calib is not None and not args.calib.is_file():
        raise QuantizeInputError(f"--calib {args.calib}: expected a JSON-lines file, found "
                                 "no such file")
    if args.mtp_from is not None and not (args.mtp_from / "config.json").is_file():
        raise QuantizeInputError(f"--mtp-from {args.mtp_from}: expected a checkpoint directory "
                                 "with config.json, found none")


def quantize(args) -> dict:
    """The whole pipeline; returns the report. Raises Quantize*Error on failure."""
    from .calib_data import build_calibration
    from .source import inspect_source

    _validate_paths(args)
    recipe = Recipe(args.recipe)
    progress = not args.no_progress
    work = args.work_dir or args.output.with_name(args.output.name + ".work")
    t0 = time.monotonic()

    src = inspect_source(args.checkpoint)
    _say(f"source {args.checkpoint}: {src.n_tensors} tensors, "
         f"{src.total_bytes / 2**30:.2f} GiB BF16")
    calib = build_calibration(args.checkpoint, args.calib, args.seq_len, args.num_samples,
                              int(src.config.get("vocab_size", 1 << 62)))
    _say(f"calibration: {calib.source}, {calib.conversations} conversations -> "
         f"{len(calib.samples)} samples, {calib.tokens} tokens")
    from .traps import mtp_message

    mtp_note = mtp_message(src.mtp_tensors, src.mtp_layers_in_config, args.mtp_from)
    if mtp_note:
        _say("MTP: " + mtp_note)

    versions = _versions()
    _prepare_work(work, _stamp(args, src.fingerprint, calib.digest, versions), args.restart)
    export_dir = work / EXPORT_DIR

    from .export import REPORT_FILE, is_complete

    if is_complete(export_dir):
        _say(f"export {export_dir} is complete from an earlier run; skipping calibration")
        report = json.loads((export_dir / REPORT_FILE).read_text(encoding="utf-8"))
    else:
        report = _calibrate_and_export(args, recipe, calib, src, work, export_dir, progress,
                                       versions, mtp_note)
    if args.export_only:
        _say(f"done (export only) in {time.monotonic() - t0:.0f} s: {export_dir}")
        return report
    from .handoff import convert_to_layout_b, verify_output

    _say(f"convert {export_dir} -> {args.output} (layout B, dense {args.dense})")
    convert_to_layout_b(export_dir, args.output, args.mtp_from, args.dense, progress)
    findings = verify_output(args.output)
    if findings:
        raise QuantizeCheckError(f"verify {args.output}: {len(findings)} findings, first: "
                                 f"{findings[0]}")
    _say(f"verify {args.output}: clean")
    _say(f"done in {time.monotonic() - t0:.0f} s: {args.output}")
    return report


def _calibrate_and_export(args, recipe: Recipe, calib, src, work: Path, export_dir: Path,
                          progress: bool, versions: dict, mtp_note: str | None) -> dict:
    from . import calibrate as cal
    from .export import export_checkpoint
    from .model_load import load_bf16_model
    from .recipes import modelopt_config, nvfp4_attributes_from_modelopt
    from .traps import audit_quantizers, check_expert_coverage, expert_coverage

    t = time.monotonic()
    loaded = load_bf16_model(args.checkpoint, args.device_map, args.max_gpu_memory,
                             args.offload_dir)
    _say(f"loaded in {time.monotonic() - t:.0f} s; {loaded.norms_bf16} RMSNorm weights in bf16 "
         "(transformers keeps them fp32, which breaks a bf16 forward)"
         + ("; set config.architectures" if loaded.architectures_set else ""))
    import modelopt.torch.quantization  # noqa: F401  (defines the fake-quant op)

    if loaded.on_cpu:
        from .cpu_fakequant import install

        install()
    config = modelopt_config(recipe, nvfp4_attributes_from_modelopt())
    if (work / cal.STATE_FILE).is_file():
        _say(f"restoring calibration from {work / cal.STATE_FILE}")
        counts = cal.restore_state(loaded.model, config, work)
    else:
        t = time.monotonic()
        counts = cal.run_calibration(loaded.model, config, calib, args.batch_size,
                                     loaded.input_device, progress)
        cal.save_state(loaded.model, counts, work)
        _say(f"calibrated in {time.monotonic() - t:.0f} s")
    audit = audit_quantizers(loaded.model, recipe)
    if audit.unexpected:
        raise QuantizeCheckError(f"ModelOpt quantized {len(audit.unexpected)} linears the "
                                 f"{recipe.value} recipe keeps unquantized (first: "
                                 f"{audit.unexpected[0]})")
    if audit.skipped_silently:
        _say(f"ModelOpt left {len(audit.skipped_silently)} linears the recipe wanted NVFP4 "
             f"in BF16 without listing them (e.g. {audit.skipped_silently[0]}); adding them to "
             "ignore/exclude_modules")
    cov = expert_coverage(counts)
    _say("experts: " + cov.summary())
    coverage_note = check_expert_coverage(cov, args.allow_uncalibrated_experts)
    if coverage_note:
        _say("WARNING: " + coverage_note)
    report = {
        "recipe": recipe.value,
        "source": str(args.checkpoint),
        "versions": versions,
        "calibration": {"source": calib.source, "conversations": calib.conversations,
                        "samples": len(calib.samples), "tokens": calib.tokens,
                        "seq_len": args.seq_len, "digest": calib.digest},
        "norms_in_bf16": loaded.norms_bf16,
        "norms_cast_after_load": loaded.norms_cast,
        "architectures_set": loaded.architectures_set,
        "quantized_modules": len(audit.quantized),
        "unquantized_by_modelopt": audit.skipped_silently,
        "experts": {"summary": cov.summary(), "min_tokens": cov.min_tokens,
                    "uncalibrated": cov.uncalibrated,
                    "tokens_hash": hashlib.sha256(
                        b"".join(c.numpy().tobytes() for c in counts.values())).hexdigest()},
        "mtp": mtp_note,
    }
    t = time.monotonic()
    report = export_checkpoint(loaded.model, export_dir, args.checkpoint,
                               audit.skipped_silently, report)
    _say(f"exported in {time.monotonic() - t:.0f} s to {export_dir}"
         + (f"; added to ignore: {report['added_to_ignore']}" if report["added_to_ignore"]
            else ""))
    return report


def run(args) -> int:
    """CLI entry: one line and exit 2 on bad input, exit 1 on a failed check, 0 when done."""
    try:
        quantize(args)
    except (QuantizeInputError, QuantizeCheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("quantize: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return EXIT_OK
