#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace simdev {

// How long a simulated host<->device transfer takes: latency plus bytes over
// bandwidth for its direction, times (1 + jitter * u) with u uniform in
// [0, 1) drawn from a generator seeded with `seed`.
struct CopyTiming {
  double h2d_gbps = 4.0;
  double d2h_gbps = 4.0;
  double latency_us = 200.0;
  double jitter = 0.0;
  uint64_t seed = 0;
};

void set_copy_timing(const CopyTiming& timing);
CopyTiming copy_timing();

// aten::_copy_from: `self` into `dst`, where at least one is on simdev.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking);
// aten::_copy_from_and_resize: resizes `dst` to `self`'s shape, then copies.
at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst);

} // namespace simdev
