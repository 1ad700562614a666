// simdev's own kernels: tensor creation, views and storage changes (metadata
// only, no job), `.item()`, record_stream, and dropout.

#include "device_allocator.h"
#include "mirror.h"
#include "stream.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/_local_scalar_dense.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace simdev {

namespace {

constexpr c10::DispatchKeySet kSimdevKeys{c10::DispatchKey::PrivateUse1};

void check_options(
    const c10::Device& device,
    std::optional<c10::Layout> layout,
    std::optional<bool> pin_memory) {
  TORCH_CHECK(device.is_privateuseone(), "simdev: cannot make a tensor on ", device, " here");
  TORCH_CHECK(
      c10::layout_or_default(layout) == c10::Layout::Strided,
      "simdev: only strided tensors are supported, got layout ",
      c10::layout_or_default(layout));
  TORCH_CHECK(
      !c10::pinned_memory_or_default(pin_memory),
      "simdev: only CPU tensors can be pinned");
}

at::Tensor empty_memory_format(
    c10::IntArrayRef size,
    std::optional<c10::ScalarType> dtype,
    std::optional<c10::Layout> layout,
    std::optional<c10::Device> device,
    std::optional<bool> pin_memory,
    std::optional<c10::MemoryFormat> memory_format) {
  const c10::Device where = c10::device_or_default(device);
  check_options(where, layout, pin_memory);
  const c10::DeviceGuard guard(where); // the allocator serves the current device
  return at::detail::empty_generic(
      size, &device_allocator(), kSimdevKeys, c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(
    c10::IntArrayRef size,
    c10::IntArrayRef stride,
    std::optional<c10::ScalarType> dtype,
    std::optional<c10::Layout> layout,
    std::optional<c10::Device> device,
    std::optional<bool> pin_memory) {
  const c10::Device where = c10::device_or_default(device);
  check_options(where, layout, pin_memory);
  const c10::DeviceGuard guard(where);
  return at::detail::empty_strided_generic(
      size, stride, &device_allocator(), kSimdevKeys, c10::dtype_or_default(dtype));
}

at::Tensor as_strided(
    const at::Tensor& self,
    c10::IntArrayRef size,
    c10::IntArrayRef stride,
    std::optional<int64_t> storage_offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, storage_offset);
}

at::Tensor view(const at::Tensor& self, c10::IntArrayRef size) {
  return at::native::view(self, size);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::_reshape_alias(self, size, stride);
}

std::vector<int64_t> contiguous_strides(c10::IntArrayRef size) {
  std::vector<int64_t> strides(size.size());
  int64_t stride = 1;
  for (size_t i = size.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(size[i], 1);
  }
  return strides;
}

// Points `self` at `source` with the given geometry, growing the storage (on
// the current stream) if the geometry reaches past its end.
at::Tensor& set_storage(
    at::Tensor& self,
    const c10::Storage& source,
    int64_t storage_offset,
    c10::IntArrayRef size,
    c10::IntArrayRef stride) {
  TORCH_CHECK(
      source.device().is_privateuseone(),
      "simdev: set_ expects a simdev storage, got one on ",
      source.device());
  const std::vector<int64_t> strides = stride.empty() ? contiguous_strides(size) : stride.vec();
  const size_t needed =
      at::detail::computeStorageNbytes(size, strides, self.itemsize(), storage_offset);
  if (needed > source.nbytes()) {
    resize_storage(source, needed);
  }
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(source);
  impl->set_sizes_and_strides(size, strides, storage_offset);
  return self;
}

at::Tensor& set_source_storage_offset(
    at::Tensor& self,
    c10::Storage source,
    int64_t storage_offset,
    c10::IntArrayRef size,
    c10::IntArrayRef stride) {
  return set_storage(self, source, storage_offset, size, stride);
}

at::Tensor& set_source_storage(at::Tensor& self, c10::Storage source) {
  const int64_t numel = static_cast<int64_t>(source.nbytes() / self.itemsize());
  return set_storage(self, source, 0, {numel}, {});
}

at::Tensor& set_source_tensor(at::Tensor& self, const at::Tensor& source) {
  if (self.is_same(source)) {
    return self;
  }
  return set_storage(self, source.storage(), source.storage_offset(), source.sizes(), source.strides());
}

at::Tensor& set_empty(at::Tensor& self) {
  const c10::DeviceGuard guard(self.device());
  c10::Storage empty(
      c10::Storage::use_byte_size_t(), 0, device_allocator().allocate(0), &device_allocator(), true);
  return set_storage(self, empty, 0, {0}, {});
}

const at::Tensor& resize(
    const at::Tensor& self,
    c10::IntArrayRef size,
    std::optional<c10::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  if (self.sizes() != size || memory_format.has_value()) {
    impl->set_sizes_contiguous(size);
    if (memory_format.has_value()) {
      TORCH_CHECK(
          *memory_format != c10::MemoryFormat::Preserve,
          "simdev: resize_ does not support memory_format=torch.preserve_format");
      impl->empty_tensor_restride(*memory_format);
    }
  }
  const size_t needed = at::detail::computeStorageNbytes(
      self.sizes(), self.strides(), self.itemsize(), self.storage_offset());
  if (needed > self.storage().nbytes()) {
    resize_storage(self.storage(), needed);
  }
  return self;
}

// Like CUDA's: a copy to the host on the current stream, which the host waits for.
at::Scalar local_scalar_dense(const at::Tensor& self) {
  synchronize_stream(current_stream(self.device().index()));
  return at::_local_scalar_dense(borrow(self));
}

void record_stream(at::Tensor& self, c10::Stream stream) {
  device_allocator().recordStream(self.storage().data_ptr(), stream);
}

// aten::native_dropout takes no generator argument, so the fallback could not
// give its CPU kernel simdev randomness: built here from bernoulli_, which
// takes one. Same contract as the CPU kernel (boolean mask, kept values
// scaled by 1 / (1 - p)), different random stream.
std::tuple<at::Tensor, at::Tensor> native_dropout(
    const at::Tensor& input,
    double p,
    std::optional<bool> train) {
  if (train.has_value() && !*train) {
    return {input.clone(), at::ones_like(input, input.options().dtype(at::kBool))};
  }
  const double keep = 1.0 - p;
  const double scale = keep == 0.0 ? 0.0 : 1.0 / keep;
  at::Tensor mask = at::empty_like(
      input, input.options().dtype(at::kBool), at::MemoryFormat::Contiguous);
  mask.bernoulli_(keep);
  return {input.mul(mask).mul_(scale), mask};
}

// scaled_dot_product_attention asks this stub, not the operator, which
// backend to use, and takes the unfused math path for a device without one.
// simdev picks what the CPU would, so attention runs the CPU's kernels.
int64_t fused_sdp_choice(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask,
    double dropout_p,
    bool is_causal,
    std::optional<double> scale,
    bool enable_gqa) {
  const std::optional<at::Tensor> mask =
      attn_mask.has_value() ? std::optional<at::Tensor>(borrow(*attn_mask)) : std::nullopt;
  return at::_fused_sdp_choice(
      borrow(query), borrow(key), borrow(value), mask, dropout_p, is_causal, scale, enable_gqa);
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("set_.source_Storage_storage_offset", set_source_storage_offset);
  m.impl("set_.source_Storage", set_source_storage);
  m.impl("set_.source_Tensor", set_source_tensor);
  m.impl("set_", set_empty);
  m.impl("resize_", resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("record_stream", record_stream);
  m.impl("native_dropout", native_dropout);
}

} // namespace simdev

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &simdev::fused_sdp_choice)
} // namespace at::native
