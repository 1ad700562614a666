#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <optional>
#include <string>

namespace simdev {

// Runs any operator without a simdev kernel of its own: queued on the current
// stream when it can be, else on the host after a stream synchronisation.
// See Note [Kernels on streams].
void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack);

// Simulated time each queued kernel takes before it runs: for operator `op`
// ("aten::mul" or, for one overload, "aten::mul.Tensor"), or for every
// operator without a time of its own.
void set_kernel_time(std::chrono::nanoseconds time, const std::optional<std::string>& op);
// Back to no simulated kernel time for any operator.
void reset_kernel_times();

} // namespace simdev
