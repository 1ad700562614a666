"""Plans per shape bucket, and the profiles they were made from.

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
"""

from __future__ import annotations

import math

import torch

from .planner import Plan
from .profile import Profile

__all__ = ["PlanCache", "bucket_tokens", "tokens_of"]

_BUCKETS_PER_DOUBLING = 4


def bucket_tokens(tokens: int) -> int:
    """The largest token count of ``tokens``' bucket (Note [Shape buckets])."""
    if tokens <= 1:
        return 1
    step = math.ceil(_BUCKETS_PER_DOUBLING * math.log2(tokens) - 1e-9)
    # A bound is rounded up to a whole token count, so the step below may already reach ``tokens``:
    # then that bucket is ``tokens``' own (and a bound is its own bucket's, as Autopilot.use needs).
    while step > 0 and _bound(step - 1) >= tokens:
        step -= 1
    return max(tokens, _bound(step))


def _bound(step: int) -> int:
    return math.ceil(2 ** (step / _BUCKETS_PER_DOUBLING) - 1e-9)


def tokens_of(hidden: torch.Tensor) -> int:
    """Tokens in a batch of hidden states ``(..., hidden)``: every dimension but the last."""
    return hidden.numel() // hidden.shape[-1] if hidden.dim() >= 2 and hidden.shape[-1] else hidden.numel()


class PlanCache:
    """The plan of each bucket, and the measured profiles by token count."""

    def __init__(self) -> None:
        self.plans: dict[int, Plan] = {}  # bucket -> plan
        self.profiles: dict[int, Profile] = {}  # measured token count -> profile
        self._planned_from: dict[int, Profile] = {}  # bucket -> the profile its plan was made from

    def plan(self, bucket: int) -> Plan | None:
        return self.plans.get(bucket)

    def profile_for(self, bucket: int) -> Profile | None:
        """The profile to plan ``bucket`` from: its plan's, else the smallest measured above it."""
        profile = self._planned_from.get(bucket)
        if profile is not None:
            return profile
        larger = [tokens for tokens in self.profiles if tokens >= bucket]
        return self.profiles[min(larger)] if larger else None

    def measured(self, profile: Profile) -> None:
        """Keeps a profile measured at ``profile.tokens`` (a later one at the same count replaces it)."""
        self.profiles[profile.tokens] = profile

    def store(self, bucket: int, chosen: Plan, profile: Profile | None) -> None:
        """Uses ``chosen`` for ``bucket``; ``profile`` is what it was planned from (None: the user's)."""
        self.plans[bucket] = chosen
        if profile is None:
            self._planned_from.pop(bucket, None)
        else:
            self._planned_from[bucket] = profile
