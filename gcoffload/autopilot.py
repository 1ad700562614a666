"""The memory-budget autopilot: applies a plan per input-shape bucket, and profiles a bucket's first step.

Given ``memory_budget=`` (:func:`gcoffload.wrap_layers`, :func:`gcoffload.patch_model`),
the checkpointer asks the :class:`Autopilot` how to run each layer call:
kept (plainly, all activations saved), checkpointed with the input on the
device, or checkpointed with the input offloaded. Its very first pass runs
every layer checkpointed and offloaded, unmeasured: it pays the one-time costs
of a model's first step (kernel loading, the caching allocator's growth, the
backward engine's threads), which would skew a profile. After it, the first forward
pass at a new input size is a *profile step*: every layer is checkpointed and
offloaded (the least memory; the last layer is kept, which costs no more) while
:class:`~gcoffload.profile.LayerMeter` measures it. When its last layer has been measured, a plan is made
(:func:`gcoffload.planner.plan`); when the next pass begins, the profile step's
backward pass has been timed too (:class:`~gcoffload.profile.BackwardClock`),
and the plan is made again with the measured backward time, logged once, and
used from that pass on. A budget too small for any plan raises at the end of
the profile step's forward pass; ``"auto"`` warns and runs in the least memory
instead, and is read again at every pass (Note [What "auto" leaves free] in
budget.py).

Note [Shape buckets]
~~~~~~~~~~~~~~~~~~~~
A plan is made for a bucket of token counts (batch x sequence), each bucket
spanning a factor of 2**(1/4) (about 19%), and for the bucket's largest
count: the measured profile is scaled up to it, linearly. A profile measured
at a larger count scales *down* safely (activations and time grow at least
linearly with tokens), so a new bucket below a measured one is planned at
once, without a profile step; a new bucket above every measured one gets its
own profile step. Within a bucket nothing is re-planned, and no step runs
outside a plan's budget or a profile step's least-memory modes. Attention
that saves scores (quadratic in the sequence) makes the upward scaling within
a bucket under-estimate by up to the bucket's 19% on that part.

Note [Which calls are a pass]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The autopilot sees layer calls in training mode with grad enabled, each with
its index in the stack. A call whose index is not above the previous call's
begins a new forward pass; the bucket is chosen at the first call of a pass.
Recomputes in backward do not come through the checkpointer, and evaluation
(``no_grad`` or ``eval()``) does not either.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .budget import MemoryBudget, gradient_bytes_to_come
from .engine import get_engine
from .planner import Mode, Plan, least_memory, plan
from .profile import BackwardClock, CopyProfile, LayerMeter, LayerProfile, Profile, measure_copies
from .saved_input import OffloadOptions, can_save

__all__ = ["Autopilot", "bucket_tokens"]

logger = logging.getLogger(__name__)

_BUCKETS_PER_DOUBLING = 4


def bucket_tokens(tokens: int) -> int:
    """The largest token count of ``tokens``' bucket (Note [Shape buckets])."""
    if tokens <= 1:
        return 1
    step = math.ceil(_BUCKETS_PER_DOUBLING * math.log2(tokens) - 1e-9)
    return max(tokens, math.ceil(2 ** (step / _BUCKETS_PER_DOUBLING) - 1e-9))


def _tokens(hidden: torch.Tensor) -> int:
    return hidden.numel() // hidden.shape[-1] if hidden.dim() >= 2 and hidden.shape[-1] else hidden.numel()


class _ProfilePass:
    """The measurements of one profile step."""

    def __init__(self, bucket: int, tokens: int, budget: int) -> None:
        self.bucket = bucket
        self.tokens = tokens
        self.budget = budget
        self.layers: dict[int, LayerProfile] = {}
        self.device: torch.device | None = None  # of the first offloadable input
        self.clock: BackwardClock | None = None
        self.profile: Profile | None = None  # once the forward pass is measured


class Autopilot:
    """Chooses keep, checkpoint or offload per layer call, from a plan per shape bucket.

    Args:
        memory_budget: what :class:`~gcoffload.budget.MemoryBudget.parse` reads.
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
    """

    def __init__(
        self,
        memory_budget: object,
        options: OffloadOptions,
        layer_count: int,
        on_plan: Callable[[Plan], None] | None = None,
        parameters: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        self.budget = MemoryBudget.parse(memory_budget)
        self._parameters = parameters
        self.prefetch_depth = options.prefetch_depth
        self.allow_offload = options.offload
        self.layer_count = layer_count
        self.plans: dict[int, Plan] = {}  # bucket -> plan
        self.profiles: dict[int, Profile] = {}  # measured token count -> profile
        self._planned_from: dict[int, Profile] = {}  # bucket -> the profile its plan was made from
        self.plan: Plan | None = None  # the plan of the current pass
        self._on_plan = on_plan
        self._copies: dict[tuple[torch.device, int], CopyProfile] = {}
        checkpoint = OffloadOptions(False, options.prefetch_depth, 0, options.min_offload_bytes)
        offload = OffloadOptions(True, options.prefetch_depth, 0, options.min_offload_bytes)
        # The first pass, profile steps, and layers a plan has no mode for (a plain layer checkpointed
        # after all, one the profile step never saw) take the least memory the options allow.
        self._least_memory = offload if options.offload else checkpoint
        # What options_for answers per mode: None keeps the layer.
        self._options = {Mode.KEEP: None, Mode.CHECKPOINT: checkpoint, Mode.OFFLOAD: offload}
        self._planned: tuple[OffloadOptions | None, ...] = ()  # per layer, from the plan in force
        self._profiling: _ProfilePass | None = None
        self._timing_backward: _ProfilePass | None = None  # measured forward, backward still to time
        self._last_index: int | None = None  # of the previous call, None before a pass
        self._warm = False  # a first pass has run: profile steps measure from now on
        self._force_profile = False

    def observe_plain(self, index: int, hidden: torch.Tensor) -> None:
        """A layer call the selective rule runs plainly: noted, so that a pass begins where it should."""
        self._begin_call(index, hidden)
        if self._profiling is not None:
            self._profiling.layers[index] = LayerProfile.plain(index, hidden.nbytes)
            self._finish_profile_if_last(index)

    def options_for(
        self,
        index: int,
        module: torch.nn.Module | None,
        function: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        hidden: torch.Tensor,
    ) -> OffloadOptions | None:
        """How to run a call the selective rule checkpoints: options, or None to keep the layer.

        In a profile step the layer is measured first (it runs once more, as
        if kept, keeping nothing) and then offloaded.
        """
        self._begin_call(index, hidden)
        profiling = self._profiling
        if profiling is None:
            return self._planned[index] if index < len(self._planned) else self._least_memory
        offloadable = can_save(hidden) and self._least_memory.offloads(hidden)
        profiling.layers[index] = LayerMeter(hidden.device).measure(
            index, module, function, args, kwargs, hidden, offloadable
        )
        if profiling.clock is None:
            profiling.clock = BackwardClock(hidden.device)
        if offloadable and profiling.device is None:
            profiling.device = hidden.device
        get_engine(hidden.device).count("profiled_layers")
        self._finish_profile_if_last(index)
        # The last layer is kept: see BackwardClock.
        return None if index == self.layer_count - 1 else self._least_memory

    def observe_output(self, index: int, output: Any) -> None:
        """The output of a layer call :meth:`options_for` answered; timed in backward if profiled."""
        for measured in (self._profiling, self._timing_backward):
            if measured is not None and measured.clock is not None and index in measured.layers:
                measured.clock.watch(index, output)
                return

    def profile(self, step: Callable[[], Any]) -> Plan:
        """Runs ``step()`` (one forward and backward pass) as a profile step; returns the new plan.

        Raises:
            RuntimeError: ``step`` ran no layer in training mode with grad enabled.
        """
        self._force_profile = True
        self._last_index = None
        self.plan = None
        step()
        if self._profiling is not None:
            self._finish_profile()
        if self._timing_backward is not None:
            self._finish_backward()
        if self._force_profile or self.plan is None:
            self._force_profile = False
            raise RuntimeError(
                "Autopilot.profile: the step ran no layer of this stack in training mode with grad enabled"
            )
        return self.plan

    def use(self, chosen: Plan) -> None:
        """Uses ``chosen`` (from :func:`gcoffload.plan` or :func:`gcoffload.predict`) for its shape bucket.

        Raises:
            ValueError: it has another number of layers than the stack.
        """
        if len(chosen.layers) != self.layer_count:
            raise ValueError(f"use: the plan has {len(chosen.layers)} layers, the stack {self.layer_count}")
        if self._timing_backward is not None:
            self._finish_backward()
        self.plans[bucket_tokens(chosen.tokens)] = chosen
        self._last_index = None

    def _begin_call(self, index: int, hidden: torch.Tensor) -> None:
        previous, self._last_index = self._last_index, index
        if previous is not None and index > previous:
            return
        if self._profiling is not None:
            self._finish_profile()
        if self._timing_backward is not None:
            self._finish_backward()
        tokens = _tokens(hidden)
        bucket = bucket_tokens(tokens)
        if self._force_profile:
            self._force_profile, self._warm = False, True
            self._start_profile(bucket, tokens, hidden)
            return
        chosen = self.plans.get(bucket) or self._plan_from_larger_profile(bucket, hidden)
        if chosen is None and not self._warm:
            # The first pass pays one-time costs (kernel loading, allocator growth, the backward engine's
            # threads) that would skew the measurements: it runs in the least memory, unmeasured.
            self._warm = True
            self.plan, self._planned = None, ()
        elif chosen is None:
            self._start_profile(bucket, tokens, hidden)
        else:
            if self.budget.auto:
                chosen = self._within_auto_budget(bucket, chosen, hidden.device)
            if chosen is not self.plan:
                self._set_plan(chosen)

    def _within_auto_budget(self, bucket: int, chosen: Plan, device: torch.device) -> Plan:
        """``chosen``, or a new plan if ``"auto"`` has shrunk below it (Note [What "auto" leaves free])."""
        budget = self._budget_bytes(device)
        if budget >= chosen.peak_bytes or budget >= chosen.budget_bytes:
            return chosen
        return self._adopt(bucket, self._planned_from[bucket], budget)

    def _budget_bytes(self, device: torch.device) -> int:
        still_to_come = 0
        if self.budget.auto and self._parameters is not None:
            still_to_come = gradient_bytes_to_come(self._parameters(), device)
        return self.budget.resolve(device, still_to_come)

    def _start_profile(self, bucket: int, tokens: int, hidden: torch.Tensor) -> None:
        self.plan = None
        self._planned = ()
        self._profiling = _ProfilePass(bucket, tokens, self._budget_bytes(hidden.device))

    def _plan_from_larger_profile(self, bucket: int, hidden: torch.Tensor) -> Plan | None:
        larger = [tokens for tokens in self.profiles if tokens >= bucket]
        if not larger:
            return None
        return self._adopt(bucket, self.profiles[min(larger)], self._budget_bytes(hidden.device))

    def _finish_profile_if_last(self, index: int) -> None:
        if index >= self.layer_count - 1:
            self._finish_profile()

    def _finish_profile(self) -> None:
        """The forward pass is measured: a first plan, with the usual backward time (raises if none fits)."""
        profiling, self._profiling = self._profiling, None
        layers = tuple(
            profiling.layers.get(index) or LayerProfile.plain(index) for index in range(self.layer_count)
        )
        profiling.profile = Profile(layers, self._copy_profile(profiling.device, layers), profiling.tokens)
        first = self._plan(profiling.profile.scaled(profiling.bucket), profiling.budget)
        self.profiles[profiling.tokens] = profiling.profile
        self._planned_from[profiling.bucket] = profiling.profile
        self.plans[profiling.bucket] = first
        self._set_plan(first)
        self._timing_backward = profiling

    def _finish_backward(self) -> None:
        """The profile step's backward pass is timed: the plan again, with the measured backward time."""
        measured, self._timing_backward = self._timing_backward, None
        profile = measured.profile
        if measured.clock is not None:
            profile = measured.clock.calibrate(profile, kept=self.layer_count - 1)
        self.profiles[profile.tokens] = profile
        self._adopt(measured.bucket, profile, measured.budget)

    def _copy_profile(self, device: torch.device | None, layers: tuple[LayerProfile, ...]) -> CopyProfile:
        nbytes = max((layer.input_bytes for layer in layers if layer.offloadable), default=0)
        if device is None:  # nothing to offload: bandwidth does not matter
            return CopyProfile(1.0, 1.0, 1.0, False, 0)
        key = (device, nbytes)
        if key not in self._copies:
            self._copies[key] = measure_copies(get_engine(device), nbytes)
        return self._copies[key]

    def _adopt(self, bucket: int, profile: Profile, budget: int) -> Plan:
        new_plan = self._plan(profile.scaled(bucket), budget)
        self._planned_from[bucket] = profile
        self.plans[bucket] = new_plan
        logger.info("%s", new_plan.summary())
        self._set_plan(new_plan)
        return new_plan

    def _plan(self, profile: Profile, budget: int) -> Plan:
        """The fastest plan within ``budget``; under ``"auto"``, the least memory if nothing fits.

        Raises:
            ValueError: a budget the user gave is below the least memory the layers take.
        """
        try:
            return plan(profile, budget, prefetch_depth=self.prefetch_depth)
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
        self.plan = chosen
        self._planned = tuple(self._options.get(mode, self._least_memory) for mode in chosen.modes)
        if self._on_plan is not None:
            self._on_plan(chosen)

    def __repr__(self) -> str:
        return f"Autopilot(memory_budget={self.budget}, {len(self.plans)} plans)"
