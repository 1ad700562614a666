"""A model's trace at any sequence length, from three traces: every count is a quadratic in the length.

Note [Why three traces are exact]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
At a fixed batch, every byte count and FLOP count of a trace is a polynomial
of degree at most two in the sequence length ``s``: activations grow with
``s``, attention scores, masks and attention FLOPs with ``s * s``. Three
traces (at ``p``, ``2p`` and ``3p`` tokens) determine each polynomial; the
curve checks it against a fourth trace (at ``4p``) and, if any count is off
(a model whose saves are no such polynomial, or whose structure changes with
the length: which storages are shared, which inputs may be offloaded), it
traces every length it is asked for instead. Interpolated counts are exact
integers or the curve falls back likewise. Lengths below ``p`` are traced.
"""

from __future__ import annotations

from dataclasses import fields, replace
from fractions import Fraction

from ..autopilot.profile import LayerProfile
from ..checkpointing.options import OffloadOptions
from .trace import MetaModel, ModelTrace

__all__ = ["TraceCurve"]

_LAYER_COUNTS = (
    "own_bytes",
    "input_bytes",
    "output_bytes",
    "largest_saved_bytes",
    "swap_bytes",
    "swap_resident_bytes",
    "first_needed_swap_bytes",
)
_TRACE_COUNTS = ("other_flops", "other_bytes", "largest_other_bytes", "returned_bytes")


def _counts(trace: ModelTrace) -> list[int]:
    counts = [getattr(layer, name) for layer in trace.profile.layers for name in _LAYER_COUNTS]
    counts += list(trace.profile.arguments) + list(trace.layer_flops)
    return counts + [getattr(trace, name) for name in _TRACE_COUNTS]


def _structure(trace: ModelTrace) -> tuple:
    """Everything of a trace but its counts and lengths."""
    counted = {*_LAYER_COUNTS, "forward_seconds"}
    layers = tuple(
        tuple(getattr(layer, field.name) for field in fields(LayerProfile) if field.name not in counted)
        for layer in trace.profile.layers
    )
    return layers, len(trace.profile.arguments), trace.other_saves_stack_input, trace.other_saves_stack_output


def _with_counts(template: ModelTrace, seq: int, counts: list[int]) -> ModelTrace:
    values = iter(counts)
    layers = tuple(
        replace(layer, **{name: next(values) for name in _LAYER_COUNTS}) for layer in template.profile.layers
    )
    arguments = tuple(next(values) for _ in template.profile.arguments)
    layer_flops = tuple(next(values) for _ in template.layer_flops)
    rest = {name: next(values) for name in _TRACE_COUNTS}
    profile = replace(template.profile, layers=layers, arguments=arguments, tokens=template.batch * seq)
    return replace(template, seq=seq, profile=profile, layer_flops=layer_flops, **rest)


class TraceCurve:
    """Traces of ``model`` at ``batch`` x any sequence length (Note [Why three traces are exact]).

    Args:
        model: the model to trace.
        batch: sequences per step.
        probe: ``p``, the shortest length interpolated.
        options: which inputs may be offloaded (``min_offload_bytes``).
    """

    def __init__(
        self, model: MetaModel, batch: int, probe: int = 1024, options: OffloadOptions | None = None
    ) -> None:
        self.model = model
        self.batch = batch
        self.probe = probe
        self.options = options or OffloadOptions()
        self._traced: dict[int, ModelTrace] = {}
        probes = [self.traced(probe * multiple) for multiple in (1, 2, 3)]
        self._template = probes[0]
        self._probes = [_counts(trace) for trace in probes]
        self.exact = all(_structure(trace) == _structure(self._template) for trace in probes)
        if self.exact:
            check = self.traced(4 * probe)
            self.exact = (
                _structure(check) == _structure(self._template) and self._interpolated(4 * probe) == check
            )

    def traced(self, seq: int) -> ModelTrace:
        """The trace at ``seq`` tokens per sequence, run (once per length)."""
        if seq not in self._traced:
            self._traced[seq] = self.model.trace(self.batch, seq, self.options)
        return self._traced[seq]

    def at(self, seq: int) -> ModelTrace:
        """The trace at ``seq``: interpolated where that is exact, traced otherwise."""
        if seq in self._traced or not self.exact or seq < self.probe:
            return self.traced(seq)
        return self._interpolated(seq) or self.traced(seq)

    def _interpolated(self, seq: int) -> ModelTrace | None:
        points = [self.probe * multiple for multiple in (1, 2, 3)]
        weights = []
        for index, point in enumerate(points):
            weight = Fraction(1)
            for other_index, other in enumerate(points):
                if other_index != index:
                    weight *= Fraction(seq - other, point - other)
            weights.append(weight)
        counts = []
        for values in zip(*self._probes, strict=True):
            value = sum(weight * count for weight, count in zip(weights, values, strict=True))
            if value.denominator != 1 or value < 0:
                return None
            counts.append(int(value))
        return _with_counts(self._template, seq, counts)
