"""Swap: run a layer without checkpointing and park what autograd saves in host memory, storage by storage.

A swapped layer is not recomputed in backward, like a kept one, and holds
nothing on the device between its forward and backward passes, like an
offloaded one: its saved activations travel to host memory through the copy
engine while the following layers compute, and come back one layer ahead of
backward. It pays in bus time what checkpointing pays in recompute, so it wins
where the bus has room: the autopilot decides that per layer.

* :func:`swap_activations`: a context manager for arbitrary code (the place
  where other libraries put an activation-offloading context).
* :func:`run_swapped`: one layer call in swap mode (``wrap_layers(...,
  mode="swap")``, the autopilot's ``swap`` layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..checkpointing import counters
from ..checkpointing.layer_call import LayerCall
from ..checkpointing.options import DEFAULT_MIN_OFFLOAD_BYTES, OffloadOptions
from ..checkpointing.saved_input import saving_is_ours
from .region import SwapRegion, swappable

__all__ = ["SwapRegion", "run_swapped", "swap_activations", "swappable"]


@contextlib.contextmanager
def swap_activations(
    *, prefetch_depth: int = 4, min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES, keep_pending: int = 4
) -> Iterator[SwapRegion | None]:
    """Parks every activation the block saves for backward in host memory, and brings it back ahead of use.

    Each storage is copied once on the copy engine's side stream, after
    ``keep_pending`` newer storages were saved (a later operation may save
    another view of a recent one) or when the block ends, and freed on the
    device once copied. Backward copies them back ``prefetch_depth`` storages
    ahead of use, from the engine's pinned pool. Parameters, non-floating
    tensors and storages under ``min_offload_bytes`` stay on the device (Note
    [What a region never swaps] in region.py). Inside another region that
    saves tensors its own way (a checkpoint, ``save_on_cpu``) the block changes
    nothing: those tensors are the outer region's.

    Args:
        prefetch_depth: storages copied back ahead of the one backward needs.
        min_offload_bytes: smaller storages stay on the device.
        keep_pending: storages kept on the device, newest first, until a newer one is saved.

    Yields:
        The :class:`SwapRegion` (``swapped_bytes``: bytes sent so far), or
        None inside an outer region.

    Raises:
        ValueError: an argument is not a non-negative int (``keep_pending``: positive).

    Example:
        >>> with gcoffload.swap_activations():
        ...     loss = model(**batch).loss
        >>> loss.backward()
    """
    for name, value, least in (
        ("prefetch_depth", prefetch_depth, 0),
        ("min_offload_bytes", min_offload_bytes, 0),
        ("keep_pending", keep_pending, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "positive" if least else "non-negative"
            raise ValueError(f"swap_activations: {name} must be a {kind} int, got {value!r}")
    if not saving_is_ours():
        yield None
        return
    region = SwapRegion(
        "swap_activations",
        prefetch_depth=prefetch_depth,
        min_offload_bytes=min_offload_bytes,
        keep_pending=keep_pending,
    )
    with region.active():
        yield region


def run_swapped(call: LayerCall, options: OffloadOptions, *, prefetched: bool = True) -> Any:
    """Runs a layer call in swap mode: not checkpointed, its saved activations parked in host memory.

    The region closes when the layer returns, so each storage it saved
    travels once with every view of it known. ``options`` give the prefetch
    depth (in units of the forward chain: swapped and checkpointed layers) and
    the threshold. ``prefetched``: whether the layers after it prefetch its
    activations, or its own backward pass does (Note [When swapped storages
    come back] in swapped_storage.py).
    """
    hidden = call.hidden
    if hidden is not None:
        counters.count(hidden.device, "swapped_layers")
    if not saving_is_ours():
        return call.run()
    region = SwapRegion.for_call(
        call, options.min_offload_bytes, prefetch_depth=options.prefetch_depth, prefetched=prefetched
    )
    with region.active():
        return call.run()
