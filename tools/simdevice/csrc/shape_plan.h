#pragma once

#include "mirror.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <memory>
#include <vector>

namespace simdev {

// Note [Shape plans]
// ~~~~~~~~~~~~~~~~~~
// To queue an operator, simdev must know its results before running it:
// their sizes, strides and dtypes, and which of them are arguments (in-place,
// out=) or views of one. Running the operator on Meta mirrors answers that,
// but many Meta kernels are Python decompositions costing hundreds of
// microseconds, which would make the host slower than the simulated device
// and hide the very races simdev exists to show. The answer depends only on
// the arguments' metadata, so it is computed once per distinct call (operator,
// tensor geometries and aliasing, other argument values) and reused: a
// training loop repeats the same calls every step.

// One tensor result of an operator call.
struct PlannedTensor {
  enum class Kind {
    None, // a None result (Tensor?)
    Undefined,
    Argument, // the argument tensor in `slot` itself (in-place, out=)
    View, // a new tensor on the argument storage in `slot`
    Fresh, // a new tensor in new memory
  };
  Kind kind = Kind::Undefined;
  size_t slot = 0;
  Geometry geometry; // View and Fresh
};

// How one call of an operator behaves, from metadata alone.
struct Plan {
  // False when the results' shapes depend on the data (their Meta kernel
  // raises): the call runs on the host instead.
  bool queueable = false;
  // Argument tensors (by slot) whose geometry the call changes, and the
  // storage size they then need (out= arguments that get resized).
  struct Change {
    size_t slot;
    Geometry geometry;
    size_t storage_nbytes;
  };
  std::vector<Change> changes;
  // One entry per return value; a tensor-list return has `list` set.
  struct Result {
    bool list = false;
    std::vector<PlannedTensor> tensors;
  };
  std::vector<Result> results;
};

// The plan for calling `op` (which has a Meta kernel and returns tensors)
// with `arguments`, from the cache or computed on Meta mirrors.
std::shared_ptr<const Plan> plan_for(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    c10::DeviceIndex device);

} // namespace simdev
