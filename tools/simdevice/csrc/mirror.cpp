#include "mirror.h"

#include "generator.h"

#include <c10/core/Allocator.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace simdev {

namespace {

at::Tensor make_tensor(c10::Storage storage, c10::DispatchKey key, const Geometry& geometry) {
  auto tensor = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(key), geometry.dtype);
  auto* impl = tensor.unsafeGetTensorImpl();
  impl->set_sizes_and_strides(geometry.sizes, geometry.strides, geometry.offset);
  impl->_set_conj(geometry.conj);
  impl->_set_neg(geometry.neg);
  return tensor;
}

bool is_generator(const c10::Argument& argument) {
  c10::TypePtr type = argument.type();
  if (auto optional = type->cast<c10::OptionalType>()) {
    type = optional->getElementType();
  }
  return type->kind() == c10::TypeKind::GeneratorType;
}

c10::IValue mirror_value(const c10::IValue& value, Mirror& mirror, bool snapshot) {
  const auto convert = [&](const at::Tensor& tensor) {
    if (tensor.defined() && tensor.is_privateuseone()) {
      return mirror(tensor);
    }
    return snapshot && tensor.defined() ? tensor.clone() : tensor;
  };
  if (value.isTensor()) {
    return convert(value.toTensor());
  }
  if (value.isTensorList()) {
    c10::List<at::Tensor> converted;
    for (const at::Tensor& tensor : value.toTensorList()) {
      converted.push_back(convert(tensor));
    }
    return converted;
  }
  if (value.isList()) {
    const auto& items = value.toListRef();
    if (std::none_of(items.begin(), items.end(), [](const c10::IValue& item) { return item.isTensor(); })) {
      return value;
    }
    c10::impl::GenericList converted(value.toList().elementType());
    for (const c10::IValue& item : items) {
      converted.push_back(item.isTensor() ? c10::IValue(convert(item.toTensor())) : item);
    }
    return converted;
  }
  if (value.isDevice() && value.toDevice().is_privateuseone()) {
    return c10::Device(mirror.target());
  }
  return value;
}

} // namespace

Geometry Geometry::of(const at::Tensor& tensor) {
  return Geometry{
      tensor.dtype(),
      tensor.sizes().vec(),
      tensor.strides().vec(),
      tensor.storage_offset(),
      tensor.is_conj(),
      tensor.is_neg()};
}

c10::Storage Mirror::mirror_storage(const c10::Storage& storage) {
  for (size_t slot = 0; slot < storages_.size(); ++slot) {
    if (storages_[slot].unsafeGetStorageImpl() == storage.unsafeGetStorageImpl()) {
      return storage_mirrors_[slot];
    }
  }
  const size_t nbytes = storage.nbytes();
  c10::Storage mirrored;
  if (target_ == c10::DeviceType::Meta) {
    // Resizable, so that an out= argument can be resized by the meta kernel.
    c10::Allocator* meta = c10::GetAllocator(c10::DeviceType::Meta);
    mirrored = c10::Storage(
        c10::Storage::use_byte_size_t(), nbytes, meta->allocate(nbytes), meta, true);
  } else {
    void* data = storage.unsafeGetStorageImpl()->mutable_data();
    mirrored = c10::Storage(
        c10::Storage::use_byte_size_t(),
        nbytes,
        c10::DataPtr(data, c10::Device(c10::DeviceType::CPU)),
        /*allocator=*/nullptr,
        /*resizable=*/false);
  }
  storages_.push_back(storage);
  storage_mirrors_.push_back(mirrored);
  return mirrored;
}

at::Tensor Mirror::operator()(const at::Tensor& tensor) {
  if (!tensor.defined()) {
    return tensor;
  }
  TORCH_INTERNAL_ASSERT(
      tensor.is_privateuseone() || (tensor.is_cpu() && target_ == c10::DeviceType::CPU),
      "a ",
      target_,
      " mirror of a ",
      tensor.device(),
      " tensor");
  for (size_t slot = 0; slot < tensors_.size(); ++slot) {
    if (tensors_[slot].is_same(tensor)) {
      return tensor_mirrors_[slot];
    }
  }
  const c10::DispatchKey key =
      target_ == c10::DeviceType::Meta ? c10::DispatchKey::Meta : c10::DispatchKey::CPU;
  at::Tensor mirrored = make_tensor(mirror_storage(tensor.storage()), key, Geometry::of(tensor));
  tensors_.push_back(tensor);
  tensor_mirrors_.push_back(mirrored);
  return mirrored;
}

std::optional<size_t> Mirror::tensor_slot(const at::Tensor& mirrored) const {
  for (size_t slot = 0; slot < tensor_mirrors_.size(); ++slot) {
    if (tensor_mirrors_[slot].is_same(mirrored)) {
      return slot;
    }
  }
  return std::nullopt;
}

std::optional<size_t> Mirror::storage_slot(const at::Tensor& mirrored) const {
  if (!mirrored.has_storage()) {
    return std::nullopt;
  }
  const c10::StorageImpl* storage = mirrored.storage().unsafeGetStorageImpl();
  for (size_t slot = 0; slot < storage_mirrors_.size(); ++slot) {
    if (storage_mirrors_[slot].unsafeGetStorageImpl() == storage) {
      return slot;
    }
  }
  return std::nullopt;
}

torch::jit::Stack mirror_arguments(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    Mirror& mirror,
    c10::DeviceIndex device,
    bool snapshot) {
  const auto& schema = op.schema().arguments();
  torch::jit::Stack mirrored;
  mirrored.reserve(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (!is_generator(schema[i])) {
      mirrored.push_back(mirror_value(arguments[i], mirror, snapshot));
    } else if (mirror.target() == c10::DeviceType::Meta) {
      mirrored.push_back(c10::IValue()); // shapes need no randomness
    } else {
      const c10::IValue& given = arguments[i];
      mirrored.push_back(kernel_generator(
          given.isNone() ? std::nullopt : std::optional<at::Generator>(given.toGenerator()), device));
    }
  }
  return mirrored;
}

at::Tensor borrow(const at::Tensor& tensor) {
  return Mirror(c10::DeviceType::CPU)(tensor);
}

at::Tensor view_on(const c10::Storage& storage, const Geometry& geometry) {
  return make_tensor(storage, c10::DispatchKey::PrivateUse1, geometry);
}

} // namespace simdev
