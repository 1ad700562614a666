"""When a measurement is not to be trusted: step times that scatter, copies too slow to be real, and
rows that measure the same work yet differ more than the work allows.

Another job on the same cores shows in all three: some steps take twice as long
as their neighbours, a copy whose thread waits for a core reports a bandwidth
near zero, and a strategy measured while the other job ran takes many times as
long as one measured while it did not (torch's worker threads wait at every
barrier for a thread that lost its core, so a step can take 20-30 times as
long: that is not a strategy being slow). Rows that show any of it are marked,
and the summary says so, instead of printing their numbers as if they were
results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from . import common

# (p80 - p20) / median of one strategy's step times: a few percent on an idle machine.
MAX_SPREAD = 0.2
# Far below any memcpy, pinned or not: a copy this slow spent its time waiting for a core.
MIN_GBPS = 0.1
# How many times the fastest row's median step a row doing the same work may take (see
# :func:`implausible_rows` for the arithmetic: at most about 2x, so 3x leaves 50% to spare).
MAX_STEP_RATIO = 3.0
ADVICE = "rerun on an idle machine"


def relative_spread(step_ms: Sequence[float]) -> float:
    """(p80 - p20) / median of the step times: 0 when every step took as long."""
    spread = common.spread(step_ms)
    return (spread["p80"] - spread["p20"]) / spread["median"]


def diagnose(step_ms: Sequence[float] = (), gbps: Mapping[str, float | None] | None = None) -> str | None:
    """Why these measurements look noisy, or None when they look sound.

    Args:
        step_ms: the timed steps of one strategy, in ms (empty: no step times to judge).
        gbps: measured copy bandwidths by name (e.g. ``{"D2H": 12.5}``); None where nothing was copied.
    """
    reasons = []
    if step_ms and (spread := relative_spread(step_ms)) > MAX_SPREAD:
        reasons.append(f"step times spread {spread:.0%} > {MAX_SPREAD:.0%}")
    slow = [
        f"{name} {rate:.2f}" for name, rate in (gbps or {}).items() if rate is not None and rate < MIN_GBPS
    ]
    if slow:
        reasons.append(f"{', '.join(slow)} GB/s < {MIN_GBPS} GB/s")
    return "; ".join(reasons) or None


def implausible_rows(median_ms: Mapping[str, float], max_ratio: float = MAX_STEP_RATIO) -> dict[str, str]:
    """The rows of one group that took implausibly longer than its fastest, each with why.

    A group is rows that do the same work: the strategies of one stack, the
    runs of the autopilot scenario, the strategies of one transformers mode.
    Every one of them computes the same forward and backward pass (about three
    forward passes' worth of FLOPs: one forward, two for backward) and adds at
    most:

    * one recompute of each layer's forward pass: at most 4/3 of a step
      without checkpointing;
    * the copies of each layer's input, one each way per step, even if none of
      them hides behind compute. Offloading is only worth measuring where a copy
      takes less time than its layer's forward pass (on an H100 the Llama
      shapes leave a margin of 3-5x, see benchmarks/NOTES.md; on the CPU a
      memcpy of a layer input takes a fraction of a percent of the layer's
      compute), so two exposed copies add at most two forward passes.

    * the host's bookkeeping per checkpointed layer (hundreds of microseconds,
      see the host-cost scenario), small next to a decoder layer's compute.

    The slowest honest row thus takes about (4 + 2) / 3 = 2x the fastest at
    most. A row beyond ``max_ratio`` times the fastest (3x: 50% over that
    bound) was slowed by something outside the work, most often another job on
    the same cores. Noise only adds time, so the fastest row is the one trusted
    and the slower ones are named. The host-cost scenario's variants are not a
    group: the bookkeeping is all they measure, and they run interleaved, so
    noise hits each alike.

    Args:
        median_ms: median step time by row name; rows without one (out of
            memory, skipped) are left out by the caller.
        max_ratio: how many times the fastest row's time a row may take.
    """
    if len(median_ms) < 2:
        return {}
    fastest = min(median_ms, key=median_ms.__getitem__)
    reference = median_ms[fastest]
    if reference <= 0:
        return {}
    return {
        name: f"step time {value / reference:.1f}x the fastest ({fastest}) > {max_ratio:g}x for the same work"
        for name, value in median_ms.items()
        if value > max_ratio * reference
    }


def mark_implausible(rows: Iterable[MutableMapping[str, Any]], name_key: str) -> None:
    """Adds :func:`implausible_rows`' reasons to the ``noisy`` entry of rows that do the same work.

    ``rows`` are JSON-ready rows with ``median_ms`` where they were measured;
    ``name_key`` names the row (e.g. ``"strategy"``).
    """
    measured = [row for row in rows if row.get("median_ms") is not None]
    reasons = implausible_rows({row[name_key]: row["median_ms"] for row in measured})
    for row in measured:
        reason = reasons.get(row[name_key])
        if reason is not None:
            row["noisy"] = f"{row['noisy']}; {reason}" if row.get("noisy") else reason
