"""Layout C → B as a weight stream (what the vLLM plugin loads a C directory with).

The contract: streaming a layout-C checkpoint's tensors, in the order vLLM's
safetensors iterator yields them (shard by shard, keys in header order) or in
any other order, gives exactly the tensors ``dsv4-nvfp4 convert --to
nvidia-nvfp4`` writes — same names, dtypes, shapes and bytes — and bad input
stops with one line naming the tensor, what was expected and what was found.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream, split_c_name
from dsv4_nvfp4.checkpoint.convert_exec import execute
from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
from dsv4_nvfp4.checkpoint.errors import CheckpointError
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.schema import Role
from dsv4_nvfp4.checkpoint.tiny import write_tiny

pytestmark = pytest.mark.cpu

RECIPES = ("full", "experts")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per recipe: a tiny layout-C export (two shards) and convert's layout-B output of it."""
    root = tmp_path_factory.mktemp("c_stream")
    out = {}
    for recipe in RECIPES:
        c = write_tiny(root / f"C-{recipe}", Layout.C, recipe=recipe, max_shard_bytes=400_000)
        b = root / f"B-{recipe}"
        execute(plan(c, Target.NVFP4), b)
        out[recipe] = (c, b)
    return out


def shard_stream(d: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """As vLLM's safetensors_weights_iterator: shard by shard, each shard's keys in order."""
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield k, h.get_tensor(k)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), name
        assert torch.equal(_bytes(g), _bytes(w)), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_stream_is_byte_identical_to_convert(dirs, recipe: str) -> None:  # type: ignore[no-untyped-def]
    c, b = dirs[recipe]
    assert len(list(c.glob("*.safetensors"))) >= 2
    stream = LayoutCStream.open(c)
    got = dict(stream.convert(shard_stream(c)))
    assert_same_tensors(got, dict(shard_stream(b)))
    assert not any(n.startswith("mtp.") for n in got)
    r = stream.report
    assert r.tensors_out == len(got)
    # full recipe: every dense linear is NVFP4 -> FP8, compressor/indexer NVFP4 -> BF16;
    # experts recipe: BF16 dense -> FP8, compressor/indexer already BF16 (copied)
    assert (r.requantized, r.worst is not None) == ({"full": 32, "experts": 25}[recipe], True)
    assert r.line().startswith(f"layout C converted at load: {r.modules} modules, {len(got)} ")


def test_stream_order_does_not_matter(dirs) -> None:  # type: ignore[no-untyped-def]
    c, b = dirs["full"]
    items = list(shard_stream(c))
    random.Random(7).shuffle(items)
    got = dict(LayoutCStream.open(c).convert(items))
    assert_same_tensors(got, dict(shard_stream(b)))


def test_device_path(dirs) -> None:  # type: ignore[no-untyped-def]
    """With a device, re-encoded modules round-trip through it (CUDA: tests/gpu)."""
    c, b = dirs["full"]
    stream = LayoutCStream.open(c, device="cpu")
    got = dict(stream.convert(shard_stream(c)))
    assert_same_tensors(got, dict(shard_stream(b)))
    assert all(t.device.type == "cpu" for t in got.values())


def test_stream_emits_each_module_when_complete(dirs) -> None:  # type: ignore[no-untyped-def]
    """Nothing waits for the end: output starts after the first module's parts."""
    c, _ = dirs["full"]
    consumed = 0

    def counting() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal consumed
        for item in shard_stream(c):
            consumed += 1
            yield item

    out = LayoutCStream.open(c).convert(counting())
    next(out)
    assert consumed <= 4  # at most one NVFP4 module's four parts


def test_split_c_name() -> None:
    m, part, ds = split_c_name("model.layers.2.mlp.experts.5.up_proj.weight_scale_2")
    assert (m, part, ds.name) == ("model.layers.2.mlp.experts.5.up_proj", "weight_scale_2",
                                  "layers.2.ffn.experts.5.w3")
    m, part, ds = split_c_name("model.layers.0.mlp.gate.e_score_correction_bias")
    assert (m, part, ds.name) == ("model.layers.0.mlp.gate.e_score_correction_bias", "",
                                  "layers.0.ffn.gate.bias")
    m, part, ds = split_c_name("model.norm.weight")
    assert (m, part, ds.name) == ("model.norm", "weight", "norm")


def test_only_re_encoded_modules_visit_the_device(dirs) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.checkpoint.c_stream import re_encoded

    c, _ = dirs["full"]
    stream = LayoutCStream.open(c)
    moved = set()
    for name, _ in shard_stream(c):
        c_module, _, m = split_c_name(name)
        if re_encoded(m, stream.expected_parts(c_module, m)):
            moved.add(m.name)
    kinds = {n.split(".", 2)[2] if n.startswith("layers.") else n for n in moved}
    assert kinds == {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b",
                     "attn.indexer.wq_b", "attn.compressor.wkv", "attn.compressor.wgate",
                     "attn.indexer.compressor.wkv", "attn.indexer.compressor.wgate",
                     "attn.indexer.weights_proj", "ffn.shared_experts.w1",
                     "ffn.shared_experts.w2", "ffn.shared_experts.w3"}
    # the experts recipe's compressor / indexer projections are BF16: renamed, not moved;
    # its BF16 dense linears are re-encoded to FP8
    c2, _ = dirs["experts"]
    s2 = LayoutCStream.open(c2)
    seen = {True: 0, False: 0}
    for name, _ in shard_stream(c2):
        c_module, _, m = split_c_name(name)
        if m.role is Role.BF16_LINEAR and ("compressor" in m.name or "weights_proj" in m.name):
            assert not re_encoded(m, s2.expected_parts(c_module, m)), c_module
            seen[False] += 1
        elif m.role is Role.DENSE:
            assert re_encoded(m, s2.expected_parts(c_module, m)), c_module
            seen[True] += 1
    assert seen[True] > 0 and seen[False] > 0


def _items(c: Path) -> list[tuple[str, torch.Tensor]]:
    return list(shard_stream(c))


def _run(c: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    for _ in LayoutCStream.open(c).convert(items):
        pass


def test_unknown_name_is_one_line(dirs) -> None:  # type: ignore[no-untyped-def]
    c, _ = dirs["full"]
    items = [*_items(c), ("model.layers.0.mlp.router.weight", torch.zeros(2))]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.router\.weight: expected "
                       r"a tensor of transformers' DeepseekV4ForCausalLM"):
        _run(c, items)


def test_missing_part_is_reported_at_the_end(dirs) -> None:  # type: ignore[no-untyped-def]
    c, _ = dirs["full"]
    gone = "model.layers.1.self_attn.q_b_proj.weight_scale_2"
    items = [(n, t) for n, t in _items(c) if n != gone]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_b_proj: expected "
                       r"the parts \{input_scale, weight, weight_scale, weight_scale_2\}, found "
                       r"only \{input_scale, weight, weight_scale\} \(1 module\(s\) incomplete\)"):
        _run(c, items)


def test_duplicate_and_foreign_parts(dirs) -> None:  # type: ignore[no-untyped-def]
    c, _ = dirs["full"]
    items = _items(c)
    first = items[0]
    with pytest.raises(CheckpointError, match=rf"{first[0]}: expected once, found twice"):
        _run(c, [first, first])
    with pytest.raises(CheckpointError, match=r"lm_head\.input_scale: expected the parts "
                       r"\{weight\} of lm_head, found 'input_scale' too"):
        _run(c, [("lm_head.input_scale", torch.ones(()))])


def test_gate_up_global_scale_mismatch(dirs) -> None:  # type: ignore[no-untyped-def]
    c, _ = dirs["full"]
    up = "model.layers.0.mlp.experts.3.up_proj.weight_scale_2"
    items = [(n, t * 2 if n == up else t) for n, t in _items(c)]
    with pytest.raises(CheckpointError, match=rf"{up}: expected the gate_proj's weight_scale_2 "):
        _run(c, items)


def test_open_refuses_other_layouts(dirs) -> None:  # type: ignore[no-untyped-def]
    _, b = dirs["full"]
    with pytest.raises(CheckpointError, match=r"expected a layout C checkpoint \(transformers "
                       r"names\), found layout B"):
        LayoutCStream.open(b)
