"""Layout C → layout B as a stream of ``(name, tensor)``: how vLLM can load a C directory as is.

vLLM hands a model's ``load_weights`` an iterator of ``(checkpoint name,
tensor)``. :class:`LayoutCStream` turns the iterator of a layout-C checkpoint
(transformers names, NVFP4 dense linears, no ``mtp.*``) into the iterator of
the layout-B checkpoint ``dsv4-nvfp4 convert --to nvidia-nvfp4`` would have
written: it groups the stream by layout-C module and hands each complete module
to :func:`~dsv4_nvfp4.checkpoint.transforms.c_to_b_module`, the per-module
conversion ``convert`` itself runs. One name map, one set of formulas, two
callers; a test checks the two outputs are byte-identical.

When is a module complete? Exactly when it has the parts its storage has
(:func:`~dsv4_nvfp4.checkpoint.layouts.storage_for` of layout C), with the
context ``verify`` and ``convert`` use: the export's ``ignore`` /
``exclude_modules`` plus the names of every tensor in the checkpoint (read from
the shard headers up front). So a BF16 module is emitted at its ``weight``, an
NVFP4 one at its fourth part, and nothing waits for the end of the stream:
memory holds only the modules whose parts are still arriving (normally one;
a shard's keys are sorted, so a module's parts are adjacent).

Checked on the way, as ``convert`` checks them: every name maps to a DeepSeek
V4 tensor, no part arrives twice or is foreign to its module's storage, gate
and up of an expert share ``weight_scale_2`` (vLLM fuses them with one global
scale), and no module is left incomplete. Errors are :class:`CheckpointError`
with one line: where, tensor, expected, found.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv4_nvfp4.formats import ConversionError

from .errors import CheckpointError
from .layouts import Layout, LayoutContext, detect, storage_for
from .names import c_to_deepseek
from .reader import open_checkpoint
from .schema import NVFP4_PARTS, Module, Role, expert_key, role_of, storage_suffixes
from .transforms import DenseMode, c_to_b_module, check_w13_global_scales


def split_c_name(name: str, where: str = "checkpoint") -> tuple[str, str, Module]:
    """``(layout-C module, part, DeepSeek module)`` of a layout-C tensor name.

    Bare tensors (hyper-connection and router vectors, sinks, ``ape``,
    ``tid2eid``) are their own module with part ``""``.
    """
    ds = c_to_deepseek(name)
    role = role_of(ds) if ds is not None else None
    if ds is not None and role in (Role.FP32, Role.INDEX):
        return name, "", Module(ds, role, ())
    module, _, part = name.rpartition(".")
    # a suffix carries over unchanged (names.py), so the module's DeepSeek name is ds's prefix
    ds_module = ds.rpartition(".")[0] if ds is not None and ds.endswith("." + part) else None
    mod_role = role_of(ds_module) if ds_module else None
    if ds_module is None or mod_role is None or mod_role in (Role.FP32, Role.INDEX):
        raise CheckpointError(f"{where}: {name}: expected a tensor of transformers' "
                              "DeepseekV4ForCausalLM (layout C), found a name no rule maps")
    if part not in NVFP4_PARTS:
        raise CheckpointError(f"{where}: {name}: expected one of {', '.join(NVFP4_PARTS)} of "
                              f"{module}, found part {part!r}")
    return module, part, Module(ds_module, mod_role, ())


def re_encoded(m: Module, expected: frozenset[str]) -> bool:
    """Does C → B re-encode this module (rather than rename its bytes)?

    Dense linears (NVFP4 or BF16 → FP8) and NVFP4 compressor / indexer
    projections (→ BF16) do; routed experts, norms, vectors, router, embedding
    and head keep their bytes. Only these visit :attr:`LayoutCStream.device`.
    """
    return m.role is Role.DENSE or (m.role is Role.BF16_LINEAR and "weight_scale" in expected)


@dataclass
class StreamReport:
    """What a pass of :meth:`LayoutCStream.convert` did (the plugin logs it in one line)."""

    modules: int = 0
    requantized: int = 0
    tensors_out: int = 0
    worst: tuple[str, ConversionError] | None = None

    def add(self, name: str, err: ConversionError | None) -> None:
        self.modules += 1
        if err is None:
            return
        self.requantized += 1
        if self.worst is None or _rank(err) > _rank(self.worst[1]):
            self.worst = (name, err)

    def line(self) -> str:
        worst = ""
        if self.worst is not None:
            name, e = self.worst
            worst = f"; worst re-encoding error {name}: rel_l2 {e.rel_l2:.3g}"
        return (f"layout C converted at load: {self.modules} modules, {self.tensors_out} "
                f"layout-B tensors, {self.requantized} re-encoded (dense to FP8, compressor and "
                f"indexer projections to BF16){worst}")


@dataclass
class LayoutCStream:
    """Converts the ``(name, tensor)`` stream of one layout-C checkpoint to layout B."""

    ctx: LayoutContext
    dense: DenseMode = DenseMode.FP8
    where: str = "checkpoint"
    device: torch.device | str | None = None
    report: StreamReport = field(default_factory=StreamReport)

    @classmethod
    def from_config(cls, config: dict, hf_quant: dict | None, names: Iterable[str],
                    dense: DenseMode = DenseMode.FP8, where: str = "checkpoint",
                    device: torch.device | str | None = None) -> LayoutCStream:
        """From ``config.json``, ``hf_quant_config.json`` and every tensor name it holds.

        ``device``: where modules that are re-encoded (not just renamed) are
        converted, and where their outputs stay (vLLM's weight loaders copy them into
        parameters on that device; a round trip to host memory cost more than the
        conversion itself on the H100). The formats functions give the same bits on
        CPU and CUDA (a GPU test checks it).
        """
        return cls(LayoutContext.from_config(config, hf_quant, list(names)), dense, where,
                   device)

    @classmethod
    def open(cls, path: str | Path, dense: DenseMode = DenseMode.FP8,
             device: torch.device | str | None = None) -> LayoutCStream:
        """From a checkpoint directory (headers only); refuses anything but a clean layout C."""
        ck = open_checkpoint(path)
        if ck.problems:
            raise CheckpointError(ck.problems[0].line())
        layout = detect(set(ck.tensors), ck.config)
        if layout is not Layout.C:
            raise CheckpointError(f"{path}: expected a layout C checkpoint (transformers names), "
                                  f"found layout {layout.name}")
        return cls.from_config(ck.config, ck.json_file("hf_quant_config.json"), ck.tensors,
                               dense, str(path), device)

    def expected_parts(self, c_module: str, m: Module) -> frozenset[str]:
        """The parts module ``c_module`` (DeepSeek ``m``) has in this checkpoint."""
        if m.bare:
            return frozenset({""})
        return frozenset(storage_suffixes(storage_for(Layout.C, m, self.ctx)))

    def convert(self, tensors: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Layout-B ``(DeepSeek name, tensor)`` pairs, each module as soon as it is complete."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        modules: dict[str, tuple[Module, frozenset[str]]] = {}
        gate_up: dict[tuple[str, int], dict[int, tuple[str, torch.Tensor]]] = {}
        done: set[str] = set()
        for name, tensor in tensors:
            c_module, part, m = split_c_name(name, self.where)
            if c_module in done:
                raise CheckpointError(f"{self.where}: {name}: expected once, found twice")
            if c_module not in modules:
                modules[c_module] = (m, self.expected_parts(c_module, m))
            m, expected = modules[c_module]
            got = pending.setdefault(c_module, {})
            if part not in expected:
                raise CheckpointError(f"{self.where}: {name}: expected the parts "
                                      f"{_parts(expected)} of {c_module}, found {part!r} too")
            if part in got:
                raise CheckpointError(f"{self.where}: {name}: expected once, found twice")
            got[part] = tensor
            if part == "weight_scale_2":
                self._check_gate_up(gate_up, m, name, tensor)
            if len(got) == len(expected):
                out, err = self._convert_module(c_module, m, expected, pending.pop(c_module))
                done.add(c_module)
                self.report.add(m.name, err)
                self.report.tensors_out += len(out)
                yield from out.items()
        if pending:
            c_module, got = next(iter(pending.items()))
            _, expected = modules[c_module]
            raise CheckpointError(f"{self.where}: {c_module}: expected the parts "
                                  f"{_parts(expected)}, found only {_parts(got)} "
                                  f"({len(pending)} module(s) incomplete)")

    def _convert_module(self, c_module: str, m: Module, expected: frozenset[str],
                        parts: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], ConversionError | None]:
        if self.device is not None and re_encoded(m, expected):
            parts = {k: v.to(self.device) for k, v in parts.items()}
        return c_to_b_module(c_module, parts, self.dense)

    def _check_gate_up(self, seen: dict[tuple[str, int], dict[int, tuple[str, torch.Tensor]]],
                       m: Module, name: str, tensor: torch.Tensor) -> None:
        expert = expert_key(m.name)
        if expert is None or not expert.gate_or_up:
            return
        pair = seen.setdefault(expert.expert_id, {})
        pair[expert.proj] = (name, tensor)
        if len(pair) == 2:
            (gate_name, gate), (up_name, up) = pair[1], pair[3]
            check_w13_global_scales(gate_name, gate, up_name, up, self.where)
            del seen[expert.expert_id]


def _rank(err: ConversionError) -> float:
    """rel_l2, an undefined one (all-zero or non-finite reference) ranking worst."""
    return err.rel_l2 if err.defined else float("inf")


def _parts(parts: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(p or "(bare)" for p in parts)) + "}"
