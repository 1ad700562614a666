#include "shape_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

namespace simdev {

namespace {

// Plans kept at most; a training loop needs a few thousand.
constexpr size_t kMaxPlans = 1 << 16;

// Writes the metadata of a call into a string key. Tensors get the slots a
// Mirror would give them (first appearance in argument order), so the key
// captures aliasing between arguments as well as their geometry.
class KeyWriter {
 public:
  explicit KeyWriter(const c10::OperatorHandle& op) {
    put(&op.schema());
  }

  // False if `value` holds something the key cannot describe.
  bool value(const c10::IValue& value) {
    if (value.isTensor()) {
      return tensor(value.toTensor());
    }
    if (value.isNone()) {
      key_ += 'n';
    } else if (value.isBool()) {
      key_ += 'b';
      put(value.toBool());
    } else if (value.isInt()) {
      key_ += 'i';
      put(value.toInt());
    } else if (value.isSymInt()) {
      const auto concrete = value.toSymInt().maybe_as_int();
      if (!concrete) {
        return false;
      }
      key_ += 'i';
      put(*concrete);
    } else if (value.isDouble()) {
      key_ += 'd';
      put(value.toDouble());
    } else if (value.isComplexDouble()) {
      key_ += 'c';
      put(value.toComplexDouble());
    } else if (value.isString()) {
      key_ += 's';
      const std::string& text = value.toStringRef();
      put(text.size());
      key_ += text;
    } else if (value.isDevice()) {
      key_ += 'D';
      put(value.toDevice().type());
      put(value.toDevice().index());
    } else if (value.isGenerator()) {
      key_ += 'g'; // Meta kernels get no generator
    } else if (value.isList()) {
      const auto& items = value.toListRef();
      key_ += 'L';
      put(items.size());
      return std::all_of(items.begin(), items.end(), [this](const c10::IValue& item) {
        return this->value(item);
      });
    } else {
      return false;
    }
    return true;
  }

  std::string take() {
    return std::move(key_);
  }

 private:
  template <typename T>
  void put(const T& value) {
    key_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }

  void put_geometry(const at::Tensor& tensor) {
    put(tensor.scalar_type());
    put(tensor.dim());
    for (int64_t size : tensor.sizes()) {
      put(size);
    }
    for (int64_t stride : tensor.strides()) {
      put(stride);
    }
    put(tensor.storage_offset());
    put(static_cast<char>(tensor.is_conj() | (tensor.is_neg() << 1)));
  }

  bool tensor(const at::Tensor& tensor) {
    if (!tensor.defined()) {
      key_ += 'U';
      return true;
    }
    if (tensor.is_cpu()) {
      // A CPU scalar: Meta kernels may read its value (it is on the host).
      if (tensor.numel() != 1) {
        return false;
      }
      key_ += 'C';
      put_geometry(tensor);
      key_.append(static_cast<const char*>(tensor.const_data_ptr()), tensor.itemsize());
      return true;
    }
    if (!tensor.is_privateuseone()) {
      return false;
    }
    const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    auto same = std::find(tensors_.begin(), tensors_.end(), impl);
    if (same != tensors_.end()) {
      key_ += 'R';
      put(same - tensors_.begin());
      return true;
    }
    tensors_.push_back(impl);
    const c10::StorageImpl* storage = tensor.storage().unsafeGetStorageImpl();
    auto shared = std::find(storages_.begin(), storages_.end(), storage);
    if (shared == storages_.end()) {
      storages_.push_back(storage);
      shared = storages_.end() - 1;
    }
    key_ += 'T';
    put(shared - storages_.begin());
    put(tensor.storage().nbytes());
    put_geometry(tensor);
    return true;
  }

  std::string key_;
  std::vector<const c10::TensorImpl*> tensors_;
  std::vector<const c10::StorageImpl*> storages_;
};

PlannedTensor planned(const Mirror& meta, const at::Tensor& shape) {
  PlannedTensor result;
  if (!shape.defined()) {
    result.kind = PlannedTensor::Kind::Undefined;
  } else if (auto slot = meta.tensor_slot(shape)) {
    result.kind = PlannedTensor::Kind::Argument;
    result.slot = *slot;
  } else if (auto storage = meta.storage_slot(shape)) {
    result.kind = PlannedTensor::Kind::View;
    result.slot = *storage;
    result.geometry = Geometry::of(shape);
  } else {
    result.kind = PlannedTensor::Kind::Fresh;
    result.geometry = Geometry::of(shape);
  }
  return result;
}

std::shared_ptr<const Plan> compute(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    c10::DeviceIndex device) {
  auto plan = std::make_shared<Plan>();
  Mirror meta(c10::DeviceType::Meta);
  torch::jit::Stack shapes = mirror_arguments(op, arguments, meta, device, /*snapshot=*/false);
  try {
    op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::Meta), &shapes);
  } catch (const std::exception&) {
    // Shapes that depend on the data raise here (see Note [Kernels on
    // streams]); a real error raises again from the CPU kernel on the host.
    return plan;
  }
  plan->queueable = true;
  for (size_t slot = 0; slot < meta.tensors().size(); ++slot) {
    const at::Tensor& source = meta.tensors()[slot];
    const at::Tensor& mirrored = meta.mirrors()[slot];
    const Geometry geometry = Geometry::of(mirrored);
    const size_t nbytes = mirrored.storage().nbytes();
    if (!(geometry == Geometry::of(source)) || nbytes > source.storage().nbytes()) {
      plan->changes.push_back(Plan::Change{slot, geometry, nbytes});
    }
  }
  for (const c10::IValue& shape : shapes) {
    Plan::Result result;
    if (shape.isTensorList()) {
      result.list = true;
      for (const at::Tensor& tensor : shape.toTensorList()) {
        result.tensors.push_back(planned(meta, tensor));
      }
    } else if (shape.isTensor()) {
      result.tensors.push_back(planned(meta, shape.toTensor()));
    } else {
      TORCH_INTERNAL_ASSERT(shape.isNone(), op.schema().name(), ": unexpected Meta result ", shape.tagKind());
      result.tensors.push_back(PlannedTensor{PlannedTensor::Kind::None});
    }
    plan->results.push_back(std::move(result));
  }
  return plan;
}

struct Cache {
  std::mutex mutex;
  std::unordered_map<std::string, std::shared_ptr<const Plan>> plans;
};

Cache& cache() {
  static auto* plans = new Cache();
  return *plans;
}

} // namespace

std::shared_ptr<const Plan> plan_for(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    c10::DeviceIndex device) {
  KeyWriter writer(op);
  for (const c10::IValue& argument : arguments) {
    if (!writer.value(argument)) {
      return compute(op, arguments, device);
    }
  }
  std::string key = writer.take();
  Cache& plans = cache();
  {
    std::lock_guard<std::mutex> lock(plans.mutex);
    auto hit = plans.plans.find(key);
    if (hit != plans.plans.end()) {
      return hit->second;
    }
  }
  auto plan = compute(op, arguments, device);
  std::lock_guard<std::mutex> lock(plans.mutex);
  if (plans.plans.size() >= kMaxPlans) {
    plans.plans.clear();
  }
  plans.plans.emplace(std::move(key), plan);
  return plan;
}

} // namespace simdev
