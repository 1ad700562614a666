"""The disk tier in the plan: which layer inputs go to disk, and how much later a step ends for them.

Note [The disk in the time model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
One drive serves one transfer at a time, in the order they were issued. The
forward pass runs the layers back to back; the input of a layer on disk is
written once that layer's forward began and the write before it finished, at
the write bandwidth. At the turn (the end of the last layer's forward pass)
the reads are issued, the latest disk layer first, and the drive runs them one
after another at the read bandwidth once its last write finished. The backward
pass runs the layers in reverse, each for its backward time (its recompute
included, as Note [The time model] in planner.py has it), and cannot start a
layer on disk before that layer's input was read back. The exposed disk time
is how much later the backward pass ends than it would without the disk: the
sum of its waits.

Left out, making the disk look slower than it is: the head's forward and
backward passes between the last layer's forward and the first layer's
backward, which reads hide behind too. Left out, making it look faster: a
read's latency; the H2D copy after a read (the host link's model charges it,
Note [The time model], but it cannot start before the read ends); the
engine's staging pool, which is bounded: writes here may lag the forward pass
without stalling it, and all reads are queued at the turn, where the engine
stalls an offload that finds the pool full and reads only ``disk_read_ahead``
units ahead; and the staging buffers' pinned bytes, which the host bytes do not
count. Where the drive keeps pace with the compute (the case worth planning
for), none of these moves the answer much; where it does not, the estimate is
optimistic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

__all__ = ["exposed_disk_seconds", "layers_on_disk"]


def exposed_disk_seconds(
    forward_seconds: Sequence[float],
    backward_seconds: Sequence[float],
    disk_bytes: Sequence[int],
    *,
    read_bytes_per_second: float,
    write_bytes_per_second: float,
) -> float:
    """How much later a step ends for the layer inputs on disk (Note [The disk in the time model]).

    Args:
        forward_seconds: each layer's forward time, in forward order.
        backward_seconds: each layer's backward time, its recompute included.
        disk_bytes: each layer's input bytes on disk (0: none).
        read_bytes_per_second, write_bytes_per_second: the drive's rates.
    """
    starts = list(itertools.accumulate(forward_seconds, initial=0.0))
    on_disk = [layer for layer, nbytes in enumerate(disk_bytes) if nbytes > 0]
    drive_free = 0.0
    for layer in on_disk:
        drive_free = max(drive_free, starts[layer]) + disk_bytes[layer] / write_bytes_per_second
    turn = starts[-1]
    drive_free = max(drive_free, turn)
    read_back = {}
    for layer in reversed(on_disk):
        drive_free += disk_bytes[layer] / read_bytes_per_second
        read_back[layer] = drive_free
    clock = turn
    waited = 0.0
    for layer in reversed(range(len(backward_seconds))):
        wait = max(0.0, read_back.get(layer, 0.0) - clock)
        waited += wait
        clock += wait + backward_seconds[layer]
    return waited


def layers_on_disk(
    offloaded: Sequence[tuple[int, int]], host_bytes: int, host_memory: int
) -> tuple[int, ...]:
    """The layers whose inputs go to disk: the earliest offloaded ones, until the rest fits ``host_memory``.

    Args:
        offloaded: ``(layer, input bytes)`` of each offloaded layer, in forward order.
        host_bytes: the host bytes with every input on the host (swapped activations included).
        host_memory: the pinned host bytes allowed.

    Returns:
        The layers on disk, in forward order; every offloaded layer if even
        that leaves more than ``host_memory`` on the host.
    """
    chosen = []
    for layer, nbytes in offloaded:
        if host_bytes <= host_memory:
            break
        chosen.append(layer)
        host_bytes -= nbytes
    return tuple(chosen)
