#include "fallback.h"

#include "device_allocator.h"
#include "mirror.h"
#include "shape_plan.h"
#include "stream.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace simdev {

// Note [Kernels on streams]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// A GPU kernel launch returns before the kernel runs: its outputs exist (the
// allocator handed out memory) but hold nothing yet. simdev does the same for
// every operator it can:
//   1. The operator's plan (Note [Shape plans]), from running it on Meta
//      mirrors of its arguments (Note [Mirrors]), gives the sizes, strides and
//      dtypes of its results, whether each is an argument (in-place, out=), a
//      view of one, or new, and how out= arguments are resized.
//   2. New results are allocated on the current stream; in-place results are
//      the arguments themselves; views share the argument's storage.
//   3. A job on the current stream runs the CPU kernel on CPU mirrors and
//      copies new results into place. The job holds no simdev tensor, only
//      borrowed pointers, so correctness comes from stream order alone.
// Random kernels take their randomness from the simdev generator at step 3's
// queueing time (Note [Philox-style RNG]).
// Operators that cannot be queued run on the host after the current stream
// is synchronised, like CUDA operators that copy a result to the host: those
// with no Meta kernel, results whose shape depends on the data (nonzero,
// unique, masked_select: their Meta kernels raise), or results that are not
// tensors (equal).

namespace {

struct KernelTimes {
  std::mutex mutex;
  std::chrono::nanoseconds fallback{0};
  std::unordered_map<std::string, std::chrono::nanoseconds> per_op;
};

KernelTimes& kernel_times() {
  static auto* times = new KernelTimes();
  return *times;
}

// The time set for "aten::name.overload", else for "aten::name", else the default.
std::chrono::nanoseconds kernel_time(const c10::OperatorName& op) {
  KernelTimes& times = kernel_times();
  std::lock_guard<std::mutex> lock(times.mutex);
  if (times.per_op.empty()) {
    return times.fallback;
  }
  const std::string overload = op.overload_name.empty() ? op.name : op.name + "." + op.overload_name;
  for (const std::string& name : {overload, op.name}) {
    auto it = times.per_op.find(name);
    if (it != times.per_op.end()) {
      return it->second;
    }
  }
  return times.fallback;
}

bool returns_tensors(const c10::FunctionSchema& schema) {
  for (const c10::Argument& result : schema.returns()) {
    const c10::TypePtr& type = result.type();
    if (!type->isSubtypeOf(*c10::TensorType::get()) &&
        !type->isSubtypeOf(*c10::ListType::ofTensors()) &&
        !type->isSubtypeOf(*c10::OptionalType::ofTensor())) {
      return false;
    }
  }
  return true;
}

template <typename Visit>
void for_each_tensor(const c10::IValue& value, const Visit& visit) {
  if (value.isTensor()) {
    visit(value.toTensor());
  } else if (value.isList()) {
    for (const c10::IValue& item : value.toListRef()) {
      if (item.isTensor()) {
        visit(item.toTensor());
      }
    }
  }
}

// The simdev device an operator call runs on.
c10::DeviceIndex device_of(const c10::OperatorHandle& op, const torch::jit::Stack& arguments) {
  std::optional<c10::DeviceIndex> found;
  for (const c10::IValue& argument : arguments) {
    for_each_tensor(argument, [&](const at::Tensor& tensor) {
      if (!tensor.defined() || !tensor.is_privateuseone()) {
        return;
      }
      TORCH_CHECK(
          !found || *found == tensor.device().index(),
          op.schema().name(),
          ": expected all tensors to be on the same device, but found at least two devices, simdev:",
          static_cast<int>(*found),
          " and ",
          tensor.device());
      found = tensor.device().index();
    });
    if (!found && argument.isDevice() && argument.toDevice().is_privateuseone()) {
      found = resolve(argument.toDevice().has_index() ? argument.toDevice().index() : -1);
    }
  }
  return found.value_or(current_device());
}

// The distinct simdev tensors among `arguments`, by slot (see Note [Mirrors]).
std::vector<at::Tensor> simdev_tensors(const torch::jit::Stack& arguments) {
  std::vector<at::Tensor> tensors;
  for (const c10::IValue& argument : arguments) {
    for_each_tensor(argument, [&](const at::Tensor& tensor) {
      const bool seen = std::any_of(tensors.begin(), tensors.end(), [&](const at::Tensor& other) {
        return other.is_same(tensor);
      });
      if (tensor.defined() && tensor.is_privateuseone() && !seen) {
        tensors.push_back(tensor);
      }
    });
  }
  return tensors;
}

// A new simdev tensor with `geometry`, allocated on the current stream of `device`.
at::Tensor fresh(const Geometry& geometry, c10::DeviceIndex device) {
  const c10::DeviceGuard guard(c10::Device(c10::DeviceType::PrivateUse1, device));
  const size_t nbytes = at::detail::computeStorageNbytes(
      geometry.sizes, geometry.strides, geometry.dtype.itemsize(), geometry.offset);
  c10::Storage storage(
      c10::Storage::use_byte_size_t(),
      nbytes,
      device_allocator().allocate(nbytes),
      &device_allocator(),
      /*resizable=*/true);
  return view_on(storage, geometry);
}

// Where the CPU kernel's result for one new output goes.
struct Output {
  size_t index; // in the kernel's results
  int64_t item; // in a tensor-list result; -1 for a single tensor
  at::Tensor destination; // borrowed CPU view of the new simdev tensor
};

void run_queued(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    const Plan& plan,
    c10::DeviceIndex device,
    torch::jit::Stack* stack) {
  if (!plan.changes.empty()) {
    const std::vector<at::Tensor> slots = simdev_tensors(arguments);
    for (const Plan::Change& change : plan.changes) {
      const at::Tensor& argument = slots[change.slot];
      if (change.storage_nbytes > argument.storage().nbytes()) {
        resize_storage(argument.storage(), change.storage_nbytes);
      }
      argument.unsafeGetTensorImpl()->set_sizes_and_strides(
          change.geometry.sizes, change.geometry.strides, change.geometry.offset);
    }
  }
  // Made after out= arguments took their new geometry; its slots are the plan's.
  Mirror cpu(c10::DeviceType::CPU);
  torch::jit::Stack kernel_stack = mirror_arguments(op, arguments, cpu, device, /*snapshot=*/true);

  std::vector<Output> outputs;
  const auto realize = [&](const PlannedTensor& planned, size_t index, int64_t item) -> c10::IValue {
    switch (planned.kind) {
      case PlannedTensor::Kind::None:
        return c10::IValue();
      case PlannedTensor::Kind::Undefined:
        return at::Tensor();
      case PlannedTensor::Kind::Argument:
        return cpu.tensors()[planned.slot];
      case PlannedTensor::Kind::View:
        return view_on(cpu.storages()[planned.slot], planned.geometry);
      case PlannedTensor::Kind::Fresh:
        break;
    }
    at::Tensor result = fresh(planned.geometry, device);
    outputs.push_back(Output{index, item, borrow(result)});
    return result;
  };
  for (size_t index = 0; index < plan.results.size(); ++index) {
    const Plan::Result& result = plan.results[index];
    if (result.list) {
      c10::List<at::Tensor> tensors;
      for (size_t item = 0; item < result.tensors.size(); ++item) {
        tensors.push_back(realize(result.tensors[item], index, static_cast<int64_t>(item)).toTensor());
      }
      stack->push_back(std::move(tensors));
    } else {
      stack->push_back(realize(result.tensors.front(), index, -1));
    }
  }

  const auto time = kernel_time(op.operator_name());
  current_stream(device).enqueue(
      [op, kernel_stack = std::move(kernel_stack), outputs = std::move(outputs), time]() mutable {
        std::this_thread::sleep_for(time);
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &kernel_stack);
        for (Output& output : outputs) {
          const c10::IValue& value = kernel_stack[output.index];
          const at::Tensor result =
              output.item < 0 ? value.toTensor() : value.toTensorList().get(output.item);
          TORCH_CHECK(
              result.sizes() == output.destination.sizes(),
              op.schema().name(),
              ": the CPU kernel returned shape ",
              result.sizes(),
              " where the Meta kernel promised ",
              output.destination.sizes());
          output.destination.copy_(result);
        }
      });
}

void run_on_host(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    c10::DeviceIndex device,
    torch::jit::Stack* stack) {
  Stream& stream = current_stream(device);
  synchronize_stream(stream);
  Mirror cpu(c10::DeviceType::CPU);
  torch::jit::Stack kernel_stack = mirror_arguments(op, arguments, cpu, device, /*snapshot=*/false);
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &kernel_stack);
  }
  const auto to_simdev = [&](const at::Tensor& result) {
    if (!result.defined() || !result.is_cpu()) {
      return result;
    }
    if (auto slot = cpu.tensor_slot(result)) {
      return cpu.tensors()[*slot];
    }
    if (auto slot = cpu.storage_slot(result)) {
      return view_on(cpu.storages()[*slot], Geometry::of(result));
    }
    // A new host result: the stream writes it into a new simdev tensor.
    const at::Tensor dense = result.is_non_overlapping_and_dense() ? result : result.contiguous();
    at::Tensor moved = fresh(Geometry::of(dense), device);
    stream.enqueue([destination = borrow(moved), dense]() mutable { destination.copy_(dense); });
    return moved;
  };
  for (const c10::IValue& value : kernel_stack) {
    if (value.isTensor()) {
      stack->push_back(to_simdev(value.toTensor()));
    } else if (value.isTensorList()) {
      c10::List<at::Tensor> results;
      for (const at::Tensor& tensor : value.toTensorList()) {
        results.push_back(to_simdev(tensor));
      }
      stack->push_back(std::move(results));
    } else {
      stack->push_back(value);
    }
  }
}

} // namespace

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  TORCH_CHECK(
      op.hasKernelForDispatchKey(c10::DispatchKey::CPU),
      "simdev: ",
      schema.name(),
      " has no CPU kernel, so simdev cannot run it");
  const size_t count = schema.arguments().size();
  torch::jit::Stack arguments(stack->end() - static_cast<std::ptrdiff_t>(count), stack->end());
  stack->erase(stack->end() - static_cast<std::ptrdiff_t>(count), stack->end());
  const c10::DeviceIndex device = device_of(op, arguments);

  if (op.hasKernelForDispatchKey(c10::DispatchKey::Meta) && returns_tensors(schema)) {
    const auto plan = plan_for(op, arguments, device);
    if (plan->queueable) {
      run_queued(op, arguments, *plan, device, stack);
      return;
    }
  }
  run_on_host(op, arguments, device, stack);
}

void set_kernel_time(std::chrono::nanoseconds time, const std::optional<std::string>& op) {
  TORCH_CHECK(time.count() >= 0, "set_kernel_time_us: time must be >= 0");
  KernelTimes& times = kernel_times();
  std::lock_guard<std::mutex> lock(times.mutex);
  if (op) {
    times.per_op[*op] = time;
  } else {
    times.fallback = time;
  }
}

void reset_kernel_times() {
  KernelTimes& times = kernel_times();
  std::lock_guard<std::mutex> lock(times.mutex);
  times.fallback = std::chrono::nanoseconds(0);
  times.per_op.clear();
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// These have CompositeExplicitAutograd kernels, which PrivateUse1 would use
// before the fallback; the CPU kernels give results equal to the CPU's.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("native_layer_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_group_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

} // namespace simdev
