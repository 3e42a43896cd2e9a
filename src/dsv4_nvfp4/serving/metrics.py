"""Read vLLM's Prometheus ``/metrics`` text: the speculative-decoding (MTP) counters.

Why: MTP acceptance is the one number that shows a draft layer survived the
NVFP4 conversion (a broken conversion gives 1.8-3 % acceptance, a good one
80-91 %). vLLM exports cumulative counters —
drafts, draft tokens, accepted tokens, accepted tokens per position — so the
rates over a run are differences of two snapshots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# name{labels} value  (the optional timestamp is ignored)
_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

DRAFTS = "vllm:spec_decode_num_drafts_total"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"

# The one MTP threshold: smoke's default, acceptance's default, bench's flag.
# Mean accepted length (tokens emitted per target step) with
# num_speculative_tokens 2, so 1.0 is "nothing accepted" and 3.0 the ceiling.
# Native V4 Pro accepts 2.61 on chat prompts (80.6 % of drafted tokens); a draft
# layer whose experts are misquantized gives ~1.0-1.2. 2.2 (60 % of drafted
# tokens) leaves 0.4 tokens per step for the NVFP4 target shifting the
# distribution a little and for prompt mix, and still sits a full token above a
# broken draft — between the two, closer to the good side, so a half-broken
# draft (e.g. one misread scale) fails too.
MTP_MIN_ACCEPTED_LENGTH = 2.2

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    """All samples of a Prometheus text exposition: (name, labels, value)."""
    out: Samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, value))
    return out


def total(samples: Samples, name: str, **match: str) -> float | None:
    """Sum of ``name`` over the label sets matching ``match``; None if the metric is absent."""
    values = [
        v
        for n, labels, v in samples
        if n == name and all(labels.get(k) == want for k, want in match.items())
    ]
    return sum(values) if values else None


@dataclass
class SpecDecodeStats:
    drafts: float
    draft_tokens: float
    accepted_tokens: float
    acceptance_rate: float  # accepted / drafted tokens
    mean_accepted_length: float  # 1 + accepted per draft: tokens emitted per target step
    per_position_rate: list[float]
    window: str  # "this run" (difference of snapshots) or "since server start"


def spec_decode_stats(
    after: Samples, before: Samples | None = None, model: str | None = None
) -> SpecDecodeStats | None:
    """Acceptance over the window between two snapshots (or since start); None without MTP."""
    match = (
        {"model_name": model}
        if model and any("model_name" in labels for n, labels, _ in after if n == DRAFTS)
        else {}
    )
    now = [total(after, name, **match) for name in (DRAFTS, DRAFT_TOKENS, ACCEPTED)]
    if any(v is None for v in now):
        return None
    window = "since server start"
    values = [float(v or 0) for v in now]
    positions = sorted(
        {int(lab["position"]) for n, lab, _ in after if n == ACCEPTED_PER_POS and "position" in lab}
    )
    per_pos = [total(after, ACCEPTED_PER_POS, position=str(p), **match) or 0.0 for p in positions]
    if before is not None:
        then = [total(before, name, **match) for name in (DRAFTS, DRAFT_TOKENS, ACCEPTED)]
        if all(v is not None for v in then) and values[0] - float(then[0] or 0) > 0:
            values = [a - float(b or 0) for a, b in zip(values, then, strict=True)]
            per_pos = [
                a - (total(before, ACCEPTED_PER_POS, position=str(p), **match) or 0.0)
                for a, p in zip(per_pos, positions, strict=True)
            ]
            window = "this run"
    drafts, draft_tokens, accepted = values
    return SpecDecodeStats(
        drafts=drafts,
        draft_tokens=draft_tokens,
        accepted_tokens=accepted,
        acceptance_rate=accepted / draft_tokens if draft_tokens else 0.0,
        mean_accepted_length=1.0 + accepted / drafts if drafts else 0.0,
        per_position_rate=[a / drafts if drafts else 0.0 for a in per_pos],
        window=window,
    )
