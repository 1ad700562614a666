#include "copies.h"

#include "host_allocator.h"
#include "mirror.h"
#include "stream.h"

#include <ATen/ops/_neg_view.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <chrono>
#include <mutex>
#include <random>
#include <thread>

namespace simdev {

// Note [Copy semantics]
// ~~~~~~~~~~~~~~~~~~~~~
// Every copy is a job on a stream: the current stream of the simdev side
// (of the source device for simdev -> simdev, see below). Whether the host
// waits follows CUDA's cudaMemcpyAsync:
//   * device <-> pinned host, non_blocking=True: queued, returns at once. The
//     job sleeps for the transfer time, then moves the bytes, so the data is
//     not there until the stream gets past it. A marker is recorded on the
//     pinned block (see Note [Pinned block lifetime]).
//   * device -> pageable host, or any non_blocking=False copy: queued, then
//     the host waits for that job.
//   * pageable host -> device, non_blocking=True: the source is snapshotted at
//     call time (CUDA stages it), queued, returns at once.
//   * simdev -> simdev: queued, never waited for by the host. Across devices,
//     as on CUDA, the copy runs on the source device's current stream behind
//     a two-way barrier with the destination device's current stream.
// Each device has one DMA engine per direction: a host<->device transfer
// holds its engine while it sleeps and copies, so two streams copying in the
// same direction take turns, and the two directions overlap.

namespace {

enum Direction { kHostToDevice = 0, kDeviceToHost = 1 };

struct Timing {
  std::mutex mutex;
  CopyTiming config;
  std::mt19937_64 jitter{0};
};

Timing& timing() {
  static auto* state = new Timing();
  return *state;
}

std::mutex& dma_engine(c10::DeviceIndex device, Direction direction) {
  static auto* engines = new std::mutex[kDeviceCount * 2];
  return engines[device * 2 + direction];
}

std::chrono::nanoseconds transfer_time(Direction direction, size_t nbytes) {
  Timing& state = timing();
  std::lock_guard<std::mutex> lock(state.mutex);
  const CopyTiming& config = state.config;
  const double gbps = direction == kHostToDevice ? config.h2d_gbps : config.d2h_gbps;
  double seconds = config.latency_us * 1e-6 + static_cast<double>(nbytes) / (gbps * 1e9);
  if (config.jitter > 0) {
    seconds *= 1.0 + config.jitter * std::uniform_real_distribution<double>(0, 1)(state.jitter);
  }
  return std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9));
}

// A job moving `nbytes` from `source` into `destination` (borrowed CPU
// tensors) over `device`'s DMA engine for `direction`.
Job transfer(
    c10::DeviceIndex device,
    Direction direction,
    at::Tensor destination,
    at::Tensor source,
    size_t nbytes) {
  const auto duration = transfer_time(direction, nbytes);
  return [=]() mutable {
    std::lock_guard<std::mutex> engine(dma_engine(device, direction));
    std::this_thread::sleep_for(duration);
    destination.copy_(source);
  };
}

// `source`, borrowed and broadcast to `destination`'s shape: copy_ sends
// PrivateUse1 copies here before broadcasting.
at::Tensor borrow_as(const at::Tensor& source, const at::Tensor& destination) {
  return borrow(source).expand(destination.sizes());
}

bool is_pinned(const at::Tensor& host) {
  return host.has_storage() && HostAllocator::owns(host.storage().data_ptr());
}

void record_on_pinned(const at::Tensor& host, Stream& stream) {
  const c10::DataPtr& data = host.storage().data_ptr();
  host_allocator().record_event(data.get(), data.get_context(), stream.handle());
}

void copy_between_devices(const at::Tensor& source, const at::Tensor& destination) {
  Stream& stream = current_stream(source.device().index());
  Job job = [destination = borrow(destination), source = borrow_as(source, destination)]() mutable {
    destination.copy_(source);
  };
  if (source.device() == destination.device()) {
    stream.enqueue(std::move(job));
    return;
  }
  Stream& other = current_stream(destination.device().index());
  block(stream, record(other));
  stream.enqueue(std::move(job));
  block(other, record(stream));
}

void copy_to_host(const at::Tensor& source, const at::Tensor& destination, bool non_blocking) {
  Stream& stream = current_stream(source.device().index());
  const uint64_t seq = stream.enqueue(transfer(
      stream.device_index(),
      kDeviceToHost,
      borrow(destination),
      borrow_as(source, destination),
      source.nbytes()));
  if (non_blocking && is_pinned(destination)) {
    record_on_pinned(destination, stream);
    return;
  }
  stream.wait(seq);
  raise_async_error(stream.device_index());
}

void copy_to_device(const at::Tensor& source, const at::Tensor& destination, bool non_blocking) {
  Stream& stream = current_stream(destination.device().index());
  const bool pinned = is_pinned(source);
  // See Note [Copy semantics]: a pageable source is staged at call time, and
  // the job owns the staged copy.
  const at::Tensor staged = non_blocking && !pinned
      ? source.clone().expand(destination.sizes())
      : borrow_as(source, destination);
  const uint64_t seq = stream.enqueue(transfer(
      stream.device_index(), kHostToDevice, borrow(destination), staged, source.nbytes()));
  if (!non_blocking) {
    stream.wait(seq);
    raise_async_error(stream.device_index());
  } else if (pinned) {
    record_on_pinned(source, stream);
  }
}

} // namespace

void set_copy_timing(const CopyTiming& config) {
  TORCH_CHECK(
      config.h2d_gbps > 0 && config.d2h_gbps > 0,
      "set_copy_timing: bandwidths must be positive, got h2d_gbps=",
      config.h2d_gbps,
      " d2h_gbps=",
      config.d2h_gbps);
  TORCH_CHECK(config.latency_us >= 0, "set_copy_timing: latency_us must be >= 0, got ", config.latency_us);
  TORCH_CHECK(config.jitter >= 0, "set_copy_timing: jitter must be >= 0, got ", config.jitter);
  Timing& state = timing();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.config = config;
  state.jitter.seed(config.seed);
}

CopyTiming copy_timing() {
  Timing& state = timing();
  std::lock_guard<std::mutex> lock(state.mutex);
  return state.config;
}

// Note [Lazy conjugate and negative views]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// torch's copy_ resolves a source's conjugate or negative bit itself only for
// the devices it knows; for others it calls _copy_from with the bit still
// set. The Conjugate and Negative keys' fallback would materialise the source
// with clone(), which calls copy_, which calls _copy_from again, forever. So
// _copy_from falls through those keys to the kernel below, which copies the
// plain bytes and then fixes the destination up in place, as torch does for
// CUDA. The copy is blocking, so that a host destination is fixed up only
// after its bytes arrived.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  TORCH_CHECK(self.defined() && dst.defined(), "simdev: _copy_from needs defined tensors");
  TORCH_CHECK(
      !dst.is_conj() && !dst.is_neg(),
      "simdev: copying into a lazy conjugate or negative view is not supported");
  if (dst.numel() == 0) {
    return dst;
  }
  if (self.is_conj() || self.is_neg()) {
    const at::Tensor plain = self.is_conj() ? self.conj() : self;
    copy_from(plain.is_neg() ? at::_neg_view(plain) : plain, dst, /*non_blocking=*/false);
    if (self.is_conj()) {
      dst.copy_(dst.conj_physical());
    }
    if (self.is_neg()) {
      dst.copy_(dst.neg());
    }
    return dst;
  }
  if (self.is_privateuseone() && dst.is_privateuseone()) {
    copy_between_devices(self, dst);
  } else if (self.is_privateuseone() && dst.is_cpu()) {
    copy_to_host(self, dst, non_blocking);
  } else if (self.is_cpu() && dst.is_privateuseone()) {
    copy_to_device(self, dst, non_blocking);
  } else {
    TORCH_CHECK(false, "simdev: cannot copy from ", self.device(), " to ", dst.device());
  }
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  dst.resize_(self.sizes());
  return copy_from(self, dst, /*non_blocking=*/false);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
}

// See Note [Lazy conjugate and negative views].
TORCH_LIBRARY_IMPL(aten, Conjugate, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, Negative, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
}

} // namespace simdev
