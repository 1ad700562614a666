"""The memory-budget autopilot: runs each layer call kept, swapped, checkpointed or offloaded, as planned.

Given ``memory_budget=`` (:func:`gcoffload.wrap_layers`, :func:`gcoffload.patch_model`),
the checkpointer hands each layer call to :meth:`Autopilot.run`, which runs it
kept (plainly, all activations saved), swapped (:mod:`gcoffload.swapping`),
checkpointed with the input on the device, or checkpointed with the input
offloaded. Its very first pass runs
every layer checkpointed and offloaded, unmeasured: it pays the one-time
costs of a model's first step (kernel loading, the caching allocator's
growth, the backward engine's threads), which would skew a profile. After it,
the first forward pass at a new input size is a *profile step*: every layer
is checkpointed and offloaded (the least memory; the last layer is kept,
which costs no more) while its real forward pass is measured
(:mod:`.measure`). When its last layer has been measured, a plan is made
(:func:`gcoffload.autopilot.planner.fastest_plan`); when the next pass begins, the
profile step's backward pass has been timed too, and the plan is made again
with the measured backward time, logged once, and used from that pass on. A
budget too small for any plan raises at the end of the profile step's
forward pass; ``"auto"`` warns and runs in the least memory instead, and is
read again at every pass (Note [What "auto" leaves free] in budget.py).

Note [The autopilot under torch.compile]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The autopilot's bookkeeping (pass tracking, shape buckets, plans, profile
steps) reads concrete sizes and keeps Python state across calls, which a
compiled graph cannot hold: :meth:`Autopilot._options_for` and
:meth:`Autopilot._ran` are left out of tracing (``torch.compiler.disable``),
so a compiled model runs them eagerly between its graphs, and the layer
itself is traced as usual.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

from ..checkpointing import counters
from ..checkpointing.dispatch import run_plainly
from ..checkpointing.layer_call import LayerCall
from ..checkpointing.options import OffloadOptions
from ..checkpointing.saved_input import can_save
from ..engine import get_engine, registry
from ..swapping import run_swapped
from .budget import MemoryBudget, gradient_bytes_to_come
from .measure import LayerMeter, measure_copies, measure_disk
from .mode_options import ModeOptions
from .passes import PassTracker
from .plan_cache import PlanCache, bucket_tokens, tokens_of
from .planner import Mode, Plan, fastest_plan, least_memory
from .profile import CopyProfile, DiskRates, LayerProfile, Profile
from .profile_step import ProfileStep

__all__ = ["Autopilot"]

logger = logging.getLogger(__name__)

Checkpoint = Callable[[LayerCall, OffloadOptions], Any]


class Autopilot:
    """Runs each layer call kept, swapped, checkpointed or offloaded, from a plan per shape bucket.

    Args:
        memory_budget: what :meth:`~gcoffload.autopilot.budget.MemoryBudget.parse` reads.
        options: the offload options the plan's modes start from; the
            autopilot keeps no residency window (``keep_resident`` is 0: an
            input to keep on the device is a ``checkpoint`` layer), and with
            ``offload=False`` it picks only keep or checkpoint.
        layer_count: layers in the stack.
        on_plan: called with the plan each time another one comes into force
            (patch_model sets ``model.gcoffload_plan``).
        parameters: the model's parameters, whose gradients still to come
            ``memory_budget="auto"`` leaves free (Note [What "auto" leaves free]
            in budget.py); None: none.

    Raises:
        TypeError: ``options`` is not an OffloadOptions, or a callable argument is not callable.
        ValueError: ``memory_budget`` is not a budget, or ``layer_count`` not a non-negative int.
    """

    def __init__(
        self,
        memory_budget: object,
        options: OffloadOptions,
        layer_count: int,
        on_plan: Callable[[Plan], None] | None = None,
        parameters: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(options, OffloadOptions):
            raise TypeError(f"Autopilot: options must be a gcoffload.OffloadOptions, got {options!r}")
        if not isinstance(layer_count, int) or isinstance(layer_count, bool) or layer_count < 0:
            raise ValueError(f"Autopilot: layer_count must be a non-negative int, got {layer_count!r}")
        for name, value in (("on_plan", on_plan), ("parameters", parameters)):
            if value is not None and not callable(value):
                raise TypeError(f"Autopilot: {name} must be callable or None, got {value!r}")
        self.budget = MemoryBudget.parse(memory_budget)
        self._parameters = parameters
        self.prefetch_depth = options.prefetch_depth
        self.layer_count = layer_count
        self.cache = PlanCache()
        self.plan_in_force: Plan | None = None  # the plan of the current pass
        self._on_plan = on_plan
        self._copies: dict[tuple[torch.device, int], CopyProfile] = {}
        self._disks: dict[str, DiskRates] = {}
        self._modes = ModeOptions(options)
        self._passes = PassTracker()
        self._profiling: ProfileStep | None = None
        self._timing_backward: ProfileStep | None = None  # measured forward, backward still to time
        self._warm = False  # a first pass has run: profile steps measure from now on
        self._force_profile = False

    @property
    def plans(self) -> dict[int, Plan]:
        """The plan of each shape bucket so far (Note [Shape buckets] in plan_cache.py)."""
        return self.cache.plans

    @property
    def profiles(self) -> dict[int, Profile]:
        """The profiles measured so far, by token count."""
        return self.cache.profiles

    def run(self, call: LayerCall, checkpointed: bool, checkpoint: Checkpoint) -> Any:
        """Runs a training-mode call of an indexed layer: plainly, kept, or ``checkpoint(call, options)``.

        Args:
            call: the layer call; its ``index`` and hidden states are set.
            checkpointed: whether the selective rule checkpoints the call
                (False: it runs plainly, whatever the plan).
            checkpoint: runs the call checkpointed with the options given.
        """
        mode, options, meter = self._options_for(call, checkpointed)
        if not checkpointed:
            return run_plainly(call)
        if meter is None:
            if mode is Mode.SWAP:
                return run_swapped(call, options, prefetched=self._modes.swap_prefetch)
            return call.run() if options is None else checkpoint(call, options)
        call.meter = meter
        if options is None:
            output = meter.run(call.function, call.args, call.kwargs, passthrough=True)
        else:
            output = checkpoint(call, options)
        self._ran(call.index, output)
        return output

    @torch.compiler.disable
    def _options_for(
        self, call: LayerCall, checkpointed: bool
    ) -> tuple[Mode, OffloadOptions | None, LayerMeter | None]:
        """The mode of ``call``, its options (None: keep it) and, in a profile step, its meter."""
        index, hidden = call.index, call.hidden
        self._begin_call(index, hidden)
        profiling = self._profiling
        if not checkpointed:
            if profiling is not None:
                profiling.plain(index, hidden)
                if index >= self.layer_count - 1:
                    self._finish_profile()
            return Mode.PLAIN, None, None
        if profiling is None:
            mode, options = self._modes.for_layer(index)
            if mode is Mode.KEEP:
                counters.count(hidden.device, "kept_layers")
            return mode, options, None
        counters.count(hidden.device, "profiled_layers")
        mode, least_memory = self._modes.least_memory
        meter = profiling.meter(call, can_save(hidden) and least_memory.offloads(hidden))
        if index == self.layer_count - 1:  # kept: see BackwardClock
            counters.count(hidden.device, "kept_layers")
            return Mode.KEEP, None, meter
        return mode, least_memory, meter

    @torch.compiler.disable
    def _ran(self, index: int, output: Any) -> None:
        """A profiled call has run: its output is timed in backward; the last one ends the profile."""
        profiling = self._profiling
        if profiling.clock is not None:
            profiling.clock.watch(index, output)
        profiling.ran(index)
        if index >= self.layer_count - 1:
            self._finish_profile()

    def profile(self, step: Callable[[], Any]) -> Plan:
        """Runs ``step()`` (one forward and backward pass) as a profile step; returns the new plan.

        Raises:
            RuntimeError: ``step`` ran no layer in training mode with grad enabled.
        """
        self._force_profile = True
        self._passes.restart()
        self.plan_in_force = None
        step()
        if self._profiling is not None:
            self._finish_profile()
        if self._timing_backward is not None:
            self._finish_backward()
        if self._force_profile or self.plan_in_force is None:
            self._force_profile = False
            raise RuntimeError(
                "Autopilot.profile: the step ran no layer of this stack in training mode with grad enabled"
            )
        return self.plan_in_force

    def use(self, chosen: Plan) -> None:
        """Uses ``chosen`` (from ``fastest_plan`` or ``predict``) for its shape bucket.

        Under ``memory_budget="auto"`` a pinned plan is re-planned like any
        other when free memory shrinks below it.

        Raises:
            TypeError: ``chosen`` is not a Plan.
            ValueError: it has another number of layers than the stack.
        """
        if not isinstance(chosen, Plan):
            raise TypeError(f"use: chosen must be a gcoffload Plan, got {type(chosen).__name__}")
        if len(chosen.layers) != self.layer_count:
            raise ValueError(f"use: the plan has {len(chosen.layers)} layers, the stack {self.layer_count}")
        if self._timing_backward is not None:
            self._finish_backward()
        self.cache.store(bucket_tokens(chosen.tokens), chosen, None)
        self._passes.restart()

    def _begin_call(self, index: int, hidden: torch.Tensor) -> None:
        """Notes layer ``index``'s call; the first call of a pass picks the plan, or a profile step."""
        if not self._passes.begins_pass(index):
            return
        if self._profiling is not None:
            self._finish_profile()
        if self._timing_backward is not None:
            self._finish_backward()
        tokens = tokens_of(hidden)
        bucket = bucket_tokens(tokens)
        if self._force_profile:
            self._force_profile, self._warm = False, True
            self._start_profile(bucket, tokens, hidden)
            return
        chosen = self.cache.plan(bucket)
        if chosen is None and self.cache.profile_for(bucket) is not None:
            chosen = self._adopt(bucket, self.cache.profile_for(bucket), self._budget_bytes(hidden.device))
        if chosen is None and not self._warm:
            # The first pass pays one-time costs (kernel loading, allocator growth, the backward engine's
            # threads) that would skew the measurements: it runs in the least memory, unmeasured.
            self._warm = True
            self.plan_in_force = None
            self._modes.follow(None)
        elif chosen is None:
            self._start_profile(bucket, tokens, hidden)
        else:
            if self.budget.auto:
                chosen = self._within_auto_budget(bucket, tokens, chosen, hidden)
            if chosen is not None and chosen is not self.plan_in_force:
                self._set_plan(chosen)

    def _within_auto_budget(
        self, bucket: int, tokens: int, chosen: Plan, hidden: torch.Tensor
    ) -> Plan | None:
        """``chosen``, or a new plan if ``"auto"`` has shrunk below it (Note [What "auto" leaves free]).

        A pinned plan (:meth:`use`) with no profile to plan its bucket from
        gets a profile step, which runs in the least memory (None).
        """
        budget = self._budget_bytes(hidden.device)
        if budget >= chosen.peak_bytes or budget >= chosen.budget_bytes:
            return chosen
        profile = self.cache.profile_for(bucket)
        if profile is None:
            warnings.warn(
                f"gcoffload autopilot: memory_budget='auto' has shrunk to {budget / 2**20:.2f} MiB, "
                "below the "
                f"{chosen.peak_bytes / 2**20:.2f} MiB of the plan pinned with Autopilot.use() for "
                f"{chosen.tokens} tokens, and no profile was measured to plan that size anew: this step is a "
                "profile step, in the least memory.",
                stacklevel=4,
            )
            self._start_profile(bucket, tokens, hidden)
            return None
        return self._adopt(bucket, profile, budget)

    def _budget_bytes(self, device: torch.device) -> int:
        still_to_come = 0
        if self.budget.auto and self._parameters is not None:
            still_to_come = gradient_bytes_to_come(self._parameters(), device)
        return self.budget.resolve(device, still_to_come)

    def _start_profile(self, bucket: int, tokens: int, hidden: torch.Tensor) -> None:
        self.plan_in_force = None
        self._modes.follow(None)
        self._profiling = ProfileStep(
            bucket,
            tokens,
            self._budget_bytes(hidden.device),
            self.layer_count,
            self._modes.least_memory[1].min_offload_bytes,
        )

    def _finish_profile(self) -> None:
        """The forward pass is measured: a first plan, with the usual backward time (raises if none fits)."""
        profiling, self._profiling = self._profiling, None
        profile = profiling.forward_profile(functools.partial(self._copy_profile, profiling.device))
        first = self._plan(profile.scaled(profiling.bucket), profiling.budget)
        self.cache.measured(profile)
        self.cache.store(profiling.bucket, first, profile)
        self._set_plan(first)
        self._timing_backward = profiling

    def _finish_backward(self) -> None:
        """The profile step's backward pass is timed: the plan again, with the measured backward time."""
        measured, self._timing_backward = self._timing_backward, None
        profile = measured.backward_profile(kept=self.layer_count - 1)
        self.cache.measured(profile)
        self._adopt(measured.bucket, profile, measured.budget)

    def _copy_profile(self, device: torch.device | None, layers: tuple[LayerProfile, ...]) -> CopyProfile:
        """The copy engine of ``device`` measured at the size of the largest offloadable input."""
        if device is None:  # nothing to offload: bandwidth does not matter
            return CopyProfile(1.0, 1.0, 1.0, False, 0)
        nbytes = max((layer.input_bytes for layer in layers if layer.offloadable), default=0)
        key = (device, nbytes)
        if key not in self._copies:
            self._copies[key] = measure_copies(get_engine(device), nbytes)
        return self._copies[key]

    def _disk_rates(self) -> DiskRates:
        """The disk tier's directory measured once (Note [The disk tier in the plan])."""
        directory = registry.settings()["disk_dir"]
        if directory not in self._disks:
            self._disks[directory] = measure_disk(directory)
        return self._disks[directory]

    def _adopt(self, bucket: int, profile: Profile, budget: int) -> Plan:
        new_plan = self._plan(profile.scaled(bucket), budget)
        self.cache.store(bucket, new_plan, profile)
        logger.info("%s", new_plan.summary())
        self._set_plan(new_plan)
        return new_plan

    def _plan(self, profile: Profile, budget: int) -> Plan:
        """The fastest plan within ``budget``; under ``"auto"``, the least memory if nothing fits.

        Raises:
            ValueError: a budget the user gave is below the least memory the layers take.
        """
        if registry.settings()["over_budget"] == "disk":
            profile = replace(profile, disk=self._disk_rates())
        try:
            return fastest_plan(
                profile,
                budget,
                prefetch_depth=self.prefetch_depth,
                swap=self._modes.moves,
                host_budget=registry.settings()["host_budget_bytes"],
            )
        except ValueError:
            if not self.budget.auto:
                raise
        least = least_memory(profile, budget, prefetch_depth=self.prefetch_depth)
        warnings.warn(
            f"gcoffload autopilot: memory_budget='auto' leaves {budget / 2**20:.2f} MiB of device memory "
            f"for activations at {profile.tokens} tokens per step, below the {least.peak_bytes / 2**20:.2f} "
            "MiB the layers need in the least memory they can take; they run in it (every input that can "
            "leave the device offloaded) and the step may run out of memory. Free device memory, or "
            "shorten the batch.",
            stacklevel=2,
        )
        return least

    def _set_plan(self, chosen: Plan) -> None:
        self.plan_in_force = chosen
        self._modes.follow(chosen)
        if self._on_plan is not None:
            self._on_plan(chosen)

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: budget, plans and profiles; a pass in progress starts afresh."""
        state = dict(self.__dict__)
        state.update(_profiling=None, _timing_backward=None, _passes=PassTracker())
        return state

    def __repr__(self) -> str:
        return f"Autopilot(memory_budget={self.budget}, {len(self.cache.plans)} plans)"
