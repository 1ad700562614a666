"""When a measurement is not to be trusted: step times that scatter, copies too slow to be real.

Another job on the same cores shows in both: some steps take twice as long as
their neighbours, and a copy whose thread waits for a core reports a bandwidth
near zero. Rows that show either are marked, and the summary says so, instead
of printing their numbers as if they were results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import common

# (p80 - p20) / median of one strategy's step times: a few percent on an idle machine.
MAX_SPREAD = 0.2
# Far below any memcpy, pinned or not: a copy this slow spent its time waiting for a core.
MIN_GBPS = 0.1
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
