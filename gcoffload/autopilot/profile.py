"""What the autopilot knows about a model: plain numbers per layer and per device.

A :class:`Profile` is measured in one training step, the *profile step*
(:mod:`.measure`), and read by the planner (:mod:`.planner`), which is tested
without running a model.

Note [What a layer holds, by storage]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd holds storages, not tensors: a saved view holds its whole storage,
and a storage saved twice is held once. So the profile describes each layer
by the storages it would hold:

* its input (``input_bytes``) and its output (``output_bytes``, the storage
  of the first tensor it returns), and whether the layer, kept, saves them;
* whether its input *is* the previous layer's output, the same storage
  (``input_is_previous_output``: measured, by storage identity, in the
  profile step; false when anything runs between the layers, such as
  ``x = layer(x) * 0.5``, a norm or a cast);
* its own saved storages (``own_bytes``): everything else the kept layer
  saves, but for its parameters and buffers, which the model holds anyway;
* the storages of its other tensor arguments (rotary tables, masks), which
  several layers share: ids into :attr:`Profile.arguments`. A checkpoint
  saves all of them; a kept layer those in ``saved_arguments``. Only
  arguments made during the pass count (the profile step drops those still
  alive when the next pass begins: the model or the caller holds them);
* what swap mode would do with the storages the layer saves
  (``swap_bytes`` travel to host memory, counted by the swap region's own
  rules; ``swap_resident_bytes`` of its own storages stay on the device, and
  whether its input and output travel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["CopyProfile", "DiskRates", "LayerProfile", "Profile"]


@dataclass(frozen=True)
class LayerProfile:
    """One layer of the stack, measured at the profile's token count.

    Args:
        index: the layer's position in its stack.
        planned: False for a layer the selective rule runs plainly (nothing in
            it requires grad): its mode is "plain", not the planner's to pick.
        own_bytes: bytes of the storages the layer, not checkpointed, saves
            besides its input, output and arguments.
        input_bytes: bytes of its hidden-states input's storage.
        offloadable: whether that input can be parked in host memory (a dense
            floating-point tensor of at least ``min_offload_bytes``).
        saves_input: whether the layer, not checkpointed, saves its input.
        saves_output: whether the layer, not checkpointed, saves its output.
        forward_seconds: the layer's forward time (device events on an
            accelerator, the wall clock on the CPU).
        output_bytes: bytes of its output's storage.
        input_is_previous_output: whether its input is the previous layer's
            output storage (Note [What a layer holds, by storage]).
        arguments: ids into :attr:`Profile.arguments` of its other tensor arguments.
        saved_arguments: those of ``arguments`` the layer, not checkpointed, saves.
        largest_saved_bytes: its largest saved storage, input and output
            included: the gradient buffer its backward pass allocates for it
            (Note [The memory model] in planner.py).
        swap_bytes: bytes swap mode sends to host memory (the spans of the
            saved storages that may travel, input and output included).
        swap_resident_bytes: bytes of its own saved storages swap mode leaves
            on the device (not floating point, too small), input, output and
            arguments aside.
        input_swapped, output_swapped: whether swap mode sends its input,
            its output, to host memory (if it saves them).
        first_needed_swap_bytes: bytes of the storage swap mode sends last,
            which backward needs first.
    """

    index: int
    planned: bool
    own_bytes: int
    input_bytes: int
    offloadable: bool
    saves_input: bool
    saves_output: bool
    forward_seconds: float
    output_bytes: int = 0
    input_is_previous_output: bool = False
    arguments: tuple[int, ...] = ()
    saved_arguments: tuple[int, ...] = ()
    largest_saved_bytes: int = 0
    swap_bytes: int = 0
    swap_resident_bytes: int = 0
    input_swapped: bool = False
    output_swapped: bool = False
    first_needed_swap_bytes: int = 0

    @classmethod
    def plain(cls, index: int, input_bytes: int = 0, output_bytes: int = 0) -> LayerProfile:
        """A layer the planner does not plan: run plainly, or never seen by the profile step."""
        return cls(index, False, 0, input_bytes, False, False, False, 0.0, output_bytes)

    @property
    def saved_bytes(self) -> int:
        """Bytes the layer alone holds when it is not checkpointed (arguments aside)."""
        return (
            self.own_bytes
            + (self.input_bytes if self.saves_input else 0)
            + (self.output_bytes if self.saves_output else 0)
        )


@dataclass(frozen=True)
class CopyProfile:
    """A device's copy engine, measured at one transfer size.

    Args:
        d2h_bytes_per_second, h2d_bytes_per_second: one direction alone.
        bidirectional_bytes_per_second: both directions at once, in total
            (less than the sum of the two: PCIe and host memory are shared).
        overlaps_compute: whether copies run beside compute (an accelerator's
            side streams) or hold the compute thread (the CPU).
        nbytes: the transfer size measured.

    Raises:
        ValueError: a bandwidth is not a positive number.
    """

    d2h_bytes_per_second: float
    h2d_bytes_per_second: float
    bidirectional_bytes_per_second: float
    overlaps_compute: bool
    nbytes: int

    def __post_init__(self) -> None:
        for name in ("d2h_bytes_per_second", "h2d_bytes_per_second", "bidirectional_bytes_per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"CopyProfile: {name} must be a positive number of bytes per second, got {value!r}"
                )


@dataclass(frozen=True)
class DiskRates:
    """The disk tier's sequential rates (``over_budget="disk"``), as measured on its directory.

    Raises:
        ValueError: a rate is not a positive number.
    """

    read_bytes_per_second: float
    write_bytes_per_second: float

    def __post_init__(self) -> None:
        for name in ("read_bytes_per_second", "write_bytes_per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"DiskRates: {name} must be a positive number of bytes per second, got {value!r}"
                )


@dataclass(frozen=True)
class Profile:
    """Everything the planner needs: the layers in forward order, the copies, the token count.

    Args:
        layers: one entry per layer of the stack, in forward order.
        copies: the device's copy bandwidth.
        tokens: tokens per step the layers were measured at (batch x sequence).
        backward_per_forward: a layer's backward time over its forward time
            (measured by the profile step's backward clock; 2 for matmuls).
        recompute_per_forward: a checkpointed layer's recompute time over its
            forward time (measured likewise; at most 1).
        arguments: bytes of each argument storage the layers share, by id
            (Note [What a layer holds, by storage]).
        disk: the disk tier's rates, where host memory spills to one (None: no disk).
    """

    layers: tuple[LayerProfile, ...]
    copies: CopyProfile
    tokens: int
    backward_per_forward: float = 2.0
    recompute_per_forward: float = 1.0
    arguments: tuple[int, ...] = ()
    disk: DiskRates | None = None

    def scaled(self, tokens: int) -> Profile:
        """The profile predicted at ``tokens`` tokens per step, everything linear in tokens.

        Activation bytes and forward times grow at least linearly with tokens
        (attention scores and attention time faster), so scaling a profile
        *down* over-estimates both, which keeps a plan within its budget.
        """
        factor = tokens / self.tokens

        def scale(nbytes: int) -> int:
            return int(nbytes * factor + 0.5)

        layers = tuple(
            replace(
                layer,
                own_bytes=scale(layer.own_bytes),
                input_bytes=scale(layer.input_bytes),
                output_bytes=scale(layer.output_bytes),
                largest_saved_bytes=scale(layer.largest_saved_bytes),
                swap_bytes=scale(layer.swap_bytes),
                swap_resident_bytes=scale(layer.swap_resident_bytes),
                first_needed_swap_bytes=scale(layer.first_needed_swap_bytes),
                forward_seconds=layer.forward_seconds * factor,
            )
            for layer in self.layers
        )
        arguments = tuple(scale(nbytes) for nbytes in self.arguments)
        return replace(self, layers=layers, tokens=tokens, arguments=arguments)
