"""One profile step: its layers' meters, the storages they share, and the profile they add up to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ..checkpointing.layer_call import LayerCall
from ..checkpointing.options import DEFAULT_MIN_OFFLOAD_BYTES
from .measure import BackwardClock, LayerMeter
from .profile import CopyProfile, LayerProfile, Profile

__all__ = ["ProfileStep"]


class ProfileStep:
    """The measurements of one profile step, from its first layer call to the end of its backward pass.

    Args:
        bucket: the shape bucket it measures (Note [Shape buckets] in plan_cache.py).
        tokens: tokens per step it runs at.
        budget: the memory budget in bytes when it began.
        layer_count: layers in the stack.
        min_offload_bytes: the threshold under which swap leaves a storage on the device.
    """

    def __init__(
        self,
        bucket: int,
        tokens: int,
        budget: int,
        layer_count: int,
        min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    ) -> None:
        self.bucket = bucket
        self.min_offload_bytes = min_offload_bytes
        self.tokens = tokens
        self.budget = budget
        self.layer_count = layer_count
        self.device: torch.device | None = None  # of the first offloadable input
        self.clock: BackwardClock | None = None
        self.profile: Profile | None = None  # once the forward pass is measured
        self._layers: dict[int, LayerProfile | tuple[LayerMeter, bool, bool]] = {}
        self._argument_ids: dict[int, int] = {}  # storage key -> id
        self._arguments: list[tuple[StorageWeakRef, int]] = []  # by id: the storage, its bytes
        self._previous_output: StorageWeakRef | None = None

    def plain(self, index: int, hidden: torch.Tensor) -> None:
        """A layer call the selective rule runs plainly."""
        self._layers[index] = LayerProfile.plain(index, hidden.untyped_storage().nbytes())
        self._previous_output = None

    def meter(self, call: LayerCall, offloadable: bool) -> LayerMeter:
        """A meter for a planned layer call, which the call's real forward pass runs through."""
        hidden = call.hidden
        if self.clock is None:
            self.clock = BackwardClock(hidden.device)
        if offloadable and self.device is None:
            self.device = hidden.device
        previous = self._previous_output
        chained = (
            previous is not None
            and not previous.expired()
            and previous.cdata == StorageWeakRef(hidden.untyped_storage()).cdata
        )
        meter = LayerMeter(call, self.min_offload_bytes)
        for key, argument in meter.arguments.items():
            if key not in self._argument_ids:
                self._argument_ids[key] = len(self._arguments)
                self._arguments.append(argument)
        self._layers[call.index] = (meter, offloadable, chained)
        return meter

    def ran(self, index: int) -> None:
        """Layer ``index``'s real forward pass has run through its meter."""
        entry = self._layers.get(index)
        if isinstance(entry, tuple):
            self._previous_output = entry[0].output_storage

    def forward_profile(self, copies: Callable[[tuple[LayerProfile, ...]], CopyProfile]) -> Profile:
        """The profile the forward pass measured (layers it never saw are plain).

        ``copies`` measures the copy engine for these layers.
        """
        layers = []
        for index in range(self.layer_count):
            entry = self._layers.get(index)
            if isinstance(entry, tuple):
                meter, offloadable, chained = entry
                entry = meter.profile(index, offloadable, chained, self._argument_ids)
            layers.append(entry or LayerProfile.plain(index))
        arguments = tuple(nbytes for _, nbytes in self._arguments)
        self.profile = Profile(tuple(layers), copies(tuple(layers)), self.tokens, arguments=arguments)
        return self.profile

    def backward_profile(self, kept: int) -> Profile:
        """The forward profile with the backward pass's times, and only the arguments the pass made.

        Called when the next pass begins: an argument storage still alive then
        is held by the model or the caller, not by the step's graph
        (Note [What a layer holds, by storage] in profile.py).
        """
        profile = self.profile
        if self.clock is not None:
            profile = self.clock.calibrate(profile, kept=kept)
        arguments = tuple(nbytes if storage.expired() else 0 for storage, nbytes in self._arguments)
        return replace(profile, arguments=arguments)
