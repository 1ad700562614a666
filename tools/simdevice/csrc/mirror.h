#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Storage.h>

#include <optional>
#include <vector>

namespace simdev {

// What a tensor is over its storage: dtype, sizes, strides, offset, and the
// lazy conjugate / negative bits.
struct Geometry {
  caffe2::TypeMeta dtype;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t offset = 0;
  bool conj = false;
  bool neg = false;

  static Geometry of(const at::Tensor& tensor);
  bool operator==(const Geometry& other) const = default;
};

// Note [Mirrors]
// ~~~~~~~~~~~~~~
// simdev memory is host memory, so a kernel "on the device" is a CPU kernel
// run on CPU tensors that alias it: same pointer, sizes, strides, offset and
// dtype. Those CPU tensors own nothing (their DataPtr has no deleter): a job
// that holds them does not keep the simdev memory alive, just as a CUDA
// kernel does not keep its arguments alive. Whether the memory still holds
// the data the job meant to read depends on stream order alone (see Note
// [Poison in stream order]).
//
// A Mirror makes such tensors, one mirrored storage per simdev storage, so
// views of one simdev storage stay views of one another, and one mirrored
// tensor per simdev tensor, so an in-place result can be mapped back to the
// tensor it came from. Both are numbered in the order they were first
// mirrored ("slots"). A Meta mirror has the same shapes and no data: running
// an operator on it gives the sizes, strides and aliasing of its results.
class Mirror {
 public:
  // `target` is CPU (tensors over the same memory) or Meta (shapes only).
  explicit Mirror(c10::DeviceType target) : target_(target) {}

  c10::DeviceType target() const {
    return target_;
  }

  // The mirror of a simdev tensor (undefined stays undefined). A CPU mirror
  // also borrows CPU tensors (pinned buffers a copy job reads or writes).
  at::Tensor operator()(const at::Tensor& tensor);

  // The slot of the simdev tensor whose mirror is `mirrored`.
  std::optional<size_t> tensor_slot(const at::Tensor& mirrored) const;
  // The slot of the simdev storage `mirrored` lives on.
  std::optional<size_t> storage_slot(const at::Tensor& mirrored) const;

  // The mirrored simdev tensors and storages, by slot, and the mirrors.
  const std::vector<at::Tensor>& tensors() const {
    return tensors_;
  }
  const std::vector<c10::Storage>& storages() const {
    return storages_;
  }
  const std::vector<at::Tensor>& mirrors() const {
    return tensor_mirrors_;
  }

 private:
  c10::Storage mirror_storage(const c10::Storage& storage);

  c10::DeviceType target_;
  std::vector<c10::Storage> storages_;
  std::vector<c10::Storage> storage_mirrors_;
  std::vector<at::Tensor> tensors_;
  std::vector<at::Tensor> tensor_mirrors_;
};

// The arguments of `op` as a kernel on `mirror`'s device sees them: simdev
// tensors mirrored (in argument order, which fixes the slots), simdev devices
// replaced by the target device, and generator arguments replaced by a CPU
// generator drawn from simdev's (or None for Meta). With `snapshot`, CPU
// tensors (scalars) are copied: a queued kernel reads them later, as a CUDA
// kernel reads the scalars it was launched with.
torch::jit::Stack mirror_arguments(
    const c10::OperatorHandle& op,
    const torch::jit::Stack& arguments,
    Mirror& mirror,
    c10::DeviceIndex device,
    bool snapshot);

// A CPU tensor over the memory of `tensor` (simdev or CPU) that owns nothing
// (see Note [Mirrors]).
at::Tensor borrow(const at::Tensor& tensor);

// A simdev tensor on `storage` with `geometry`.
at::Tensor view_on(const c10::Storage& storage, const Geometry& geometry);

} // namespace simdev
