#include "copy_engine.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>

namespace gcoffload {

// Note [Device-generic streams]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Nothing here names CUDA. Streams come from the device type's registered
// guard implementation (VirtualGuardImpl), events from c10::Event, pinned
// memory from at::getHostAllocator, and copies from Tensor::copy_ with
// non_blocking=true. A CPU-only torch compiles exactly the code a GPU runs,
// and any accelerator torch registers these pieces for (CUDA, ROCm, XPU)
// works unchanged. The CPU has no streams: `has_streams_` is false, copies
// are synchronous and every Fence is complete when made.
// The two side streams are asked for with `getNewStream` at high priority, so
// a backend that creates streams gives the engine streams of its own, which
// no other work can queue on. CUDA and XPU answer it from their pools of
// high-priority streams (a few per device, handed out round robin), which
// torch.cuda.Stream() and NCCL do not draw from by default; a backend without
// `getNewStream` is asked for a pool stream directly.

// Note [Source lifetime]
// ~~~~~~~~~~~~~~~~~~~~~~
// The D2H copy reads the source tensor on the D2H stream while the compute
// stream runs ahead. If the engine let go of the source at once, the caching
// allocator could hand its memory to the next allocation on the stream that
// owns it, and a kernel would overwrite it before the copy had read it. (The
// same holds for a prefetched tensor whose handle is dropped while the H2D
// copy still writes it: Note [Dropped handles].) `record_stream` on the copy
// stream would make the allocator wait, but for every copy it would hold the
// memory back until the allocator next polls its events, which inflates peak
// memory exactly when we are trying to lower it. Instead the engine keeps a
// reference in `pending_` together with the copy's fence and drops it once the
// fence is done (polled on every engine call). Only when more than
// `max_pending_` copies are outstanding does the oldest go to the allocator
// with `recordDataPtrOnStream` on its copy stream: the allocator then reuses
// the memory, on whichever stream owns it, only after the copy. A handle
// released before its offload copy is done (its autograd graph was dropped:
// an exception, a skipped step) hands its source to the allocator the same
// way at once, so the memory is not held until the next engine call.
// The reference kept is a detached alias of the source: its storage, never
// the caller's tensor. That tensor carries its autograd history (the
// previous layers' graph), which would keep the graph, its saved inputs and
// their host buffers alive until the next poll after a dropped graph. The
// engine
// cannot name the owning stream (the device-generic API does not say which
// stream a block was allocated on, and it need not be the caller's current
// stream), and it does not have to: the allocator knows. The compute stream
// never waits for a D2H copy.

// Note [Destination allocated on the compute stream]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A fetched tensor is used and freed by the compute stream, so it is
// allocated there: allocating on the H2D stream would tie the block to a
// stream that never frees it and fragment the caching allocator. The
// allocator may return memory that earlier compute-stream kernels still use
// (stream order makes that safe for the compute stream only), so the H2D
// stream first waits for a fence recorded on the compute stream right after
// the allocation. It also waits for the D2H copy that filled the host buffer.
// Finally `fetch` makes the compute stream wait for the H2D copy.

// Note [Offload copies plain bytes]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// What goes to the host must be the tensor's values as one linear run of
// bytes, with no work left for the host to do after the DMA is queued. So,
// on the compute stream and before the copy: non-contiguous tensors are
// compacted (`fetch` returns the contiguous layout), and lazy conjugate or
// negative views are materialised. Left lazy, `copy_` would queue the DMA
// and then fix up the host tensor in place at once, before the DMA had
// written it, and the fix-up would be lost. Copies run under NoGradGuard:
// a fetched tensor is plain data, with no autograd history.

// Note [Dropped handles]
// ~~~~~~~~~~~~~~~~~~~~~~
// A handle can die unfetched: the autograd graph was freed without a
// backward, or a layer raised. Its host buffer goes back to the pool behind
// the fence of the last copy touching it (Note [Host buffer reuse]). If it was
// prefetched, the H2D copy may still be writing the device tensor, which joins
// `pending_` like an offload source (Note [Source lifetime]).

// Note [Watched versions]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Autograd detects a saved tensor changed in place by comparing its version
// counter with the value it had when saved. An offloaded tensor is no longer
// referenced, so the handle keeps the counter alone (a small shared object,
// not the memory) and reports its value; the checkpoint compares it with the
// version it saved (gcoffload/saved_input.py).

// Note [Pageable copies off the compute thread]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Past the host budget with over_budget='pageable', copies go to ordinary
// host memory. A copy between the device and pageable memory blocks the host
// until it is done (the driver stages it), so issuing it from the caller would
// stall the training loop, with the GIL and the engine's lock held, for every
// layer. Instead the caller orders the copy's stream as for any copy (after
// the compute stream's work, or the allocation of the destination) and queues
// the copy on the engine's HostWorker: one thread that runs the blocking copy
// on the D2H or H2D stream, then signals a host fence. Both directions go
// through that one thread in order, so an H2D copy always follows the D2H copy
// of the same handle. `fetch` waits for the H2D fence on the host, with the GIL
// released (the bindings release it around every call that can wait); the
// copy is complete on the device by then. The job drops its references to the
// tensors before it signals, so the last reference is never the worker's:
// the engine's pending queue or the handle holds them until the fence is done.
// Pageable copies are not traced.

// Note [Traced stalls]
// ~~~~~~~~~~~~~~~~~~~~
// The compute stream waits for a copy in one place: `fetch` waits for the H2D
// copy. While tracing, that wait is bracketed by two timing fences on the
// compute stream. The first completes when the compute work queued before the
// wait is done, the second when the stream gets past the wait, so the gap
// between them is the time compute stood still for that copy: zero when the
// copy had already finished, the whole copy for an on-demand fetch. Summed
// over a step, it is the copy time that overlap did not hide.

namespace {

// See Note [Device-generic streams].
c10::Stream side_stream(c10::Device device) {
  if (device.is_cpu()) {
    return c10::Stream(c10::Stream::DEFAULT, device);
  }
  const c10::impl::VirtualGuardImpl guard(device.type());
  try {
    return guard.getNewStream(device, /*priority=*/-1);
  } catch (const c10::Error&) {
    return guard.getStreamFromGlobalPool(device, /*isHighPriority=*/true);
  }
}

// Makes `stream` current for a scope; the CPU has no streams to switch.
c10::OptionalStreamGuard run_on(bool has_streams, const c10::Stream& stream) {
  if (has_streams) {
    return c10::OptionalStreamGuard(stream);
  }
  return c10::OptionalStreamGuard();
}

// The dtypes torch declares but cannot copy (sub-byte integers).
bool is_shell_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::UInt1:
    case at::ScalarType::UInt2:
    case at::ScalarType::UInt3:
    case at::ScalarType::UInt4:
    case at::ScalarType::UInt5:
    case at::ScalarType::UInt6:
    case at::ScalarType::UInt7:
    case at::ScalarType::Int1:
    case at::ScalarType::Int2:
    case at::ScalarType::Int3:
    case at::ScalarType::Int4:
    case at::ScalarType::Int5:
    case at::ScalarType::Int6:
    case at::ScalarType::Int7:
      return true;
    default:
      return false;
  }
}

constexpr const char* kSupported =
    "; offload takes a plain dense (strided) tensor with its own storage, of "
    "any dtype but quantized and sub-byte ones";

int64_t byte_size(const at::Tensor& tensor) {
  return static_cast<int64_t>(tensor.numel()) *
      static_cast<int64_t>(tensor.element_size());
}

} // namespace

Handle::Handle(
    std::shared_ptr<CopyEngine> engine,
    int64_t id,
    const at::Tensor& like)
    : engine_(std::move(engine)),
      id_(id),
      sizes_(like.sizes().vec()),
      dtype_(like.scalar_type()),
      nbytes_(byte_size(like)) {}

Handle::~Handle() {
  try {
    engine_->release(*this);
  } catch (const std::exception& error) {
    TORCH_WARN("gcoffload: releasing handle ", id_, " failed: ", error.what());
  }
}

void Handle::release() {
  engine_->release(*this);
}

std::shared_ptr<CopyEngine> CopyEngine::create(
    c10::Device device,
    std::shared_ptr<PinnedPool> pool) {
  TORCH_CHECK(
      device.is_cpu() || device.has_index(),
      "CopyEngine: device must name an index (e.g. cuda:0), got ",
      device);
  TORCH_CHECK(pool != nullptr, "CopyEngine: pool must not be None");
  TORCH_CHECK(
      pool->device_type() == device.type(),
      "CopyEngine: pool serves ",
      pool->device_type(),
      " but device is ",
      device);
  return std::shared_ptr<CopyEngine>(new CopyEngine(device, std::move(pool)));
}

CopyEngine::CopyEngine(c10::Device device, std::shared_ptr<PinnedPool> pool)
    : device_(device),
      has_streams_(!device.is_cpu()),
      d2h_stream_(side_stream(device)),
      h2d_stream_(side_stream(device)),
      pool_(std::move(pool)) {}

void CopyEngine::check_offloadable(const at::Tensor& tensor) const {
  // Everything offload cannot copy is refused here, before any buffer or
  // handle exists, so a refusal leaks nothing.
  TORCH_CHECK_VALUE(tensor.defined(), "offload: tensor is undefined", kSupported);
  TORCH_CHECK_TYPE(
      !tensor.is_nested(), "offload: tensor is a nested tensor", kSupported);
  TORCH_CHECK_TYPE(
      tensor.layout() == at::kStrided,
      "offload: tensor must be dense (strided), got layout ",
      tensor.layout(),
      kSupported,
      " (convert it with .to_dense())");
  TORCH_CHECK_TYPE(
      !tensor.is_quantized(),
      "offload: tensor is quantized (",
      tensor.scalar_type(),
      ")",
      kSupported,
      " (call .dequantize() first)");
  TORCH_CHECK_TYPE(
      !tensor.key_set().has_any(c10::DispatchKeySet(
          {c10::DispatchKey::Python, c10::DispatchKey::Functionalize})),
      "offload: tensor is a tensor subclass, fake or functional tensor (",
      tensor.key_set(),
      ") whose data the engine cannot copy",
      kSupported);
  TORCH_CHECK_TYPE(
      tensor.has_storage(), "offload: tensor has no storage", kSupported);
  TORCH_CHECK(
      tensor.device() == device_,
      "offload: tensor is on ",
      tensor.device(),
      " but this engine serves ",
      device_,
      "; use gcoffload.get_engine(tensor.device)");
  TORCH_CHECK_TYPE(
      !is_shell_dtype(tensor.scalar_type()),
      "offload: tensor has dtype ",
      tensor.scalar_type(),
      ", which torch cannot copy",
      kSupported);
}

c10::Stream CopyEngine::compute_stream() const {
  if (!has_streams_) {
    return c10::Stream(c10::Stream::DEFAULT, device_);
  }
  return c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
}

std::shared_ptr<Handle> CopyEngine::offload(
    const at::Tensor& tensor,
    bool to_disk) {
  check_offloadable(tensor);
  // See Note [Offload copies plain bytes].
  at::NoGradGuard no_grad;
  at::Tensor source = tensor.resolve_conj().resolve_neg().contiguous();
  std::shared_ptr<Handle> handle;
  std::vector<at::Tensor> dropped;
  std::unique_lock<std::mutex> lock(mutex_);
  handle.reset(new Handle(shared_from_this(), next_id_++, source));
  if (!tensor.is_inference()) {
    // See Note [Watched versions].
    handle->source_version_ = tensor.unsafeGetTensorImpl()->version_counter();
  }
  stats_.live_handles += 1;
  poll_pending(dropped);
  if (handle->nbytes_ == 0) {
    handle->placement_ = Handle::Placement::Empty;
    return handle;
  }

  // The handle owns the buffer from here on: whatever throws below, the
  // buffer goes back to the pool when the handle dies.
  place(*handle, source, to_disk, lock);
  if (handle->placement_ == Handle::Placement::Device) {
    return handle;
  }

  Fence::record(compute_stream()).block(d2h_stream_);
  if (has_streams_ && handle->placement_ == Handle::Placement::Pageable) {
    handle->d2h_done_ =
        copy_on_worker(d2h_stream_, handle->host_, source.detach());
  } else {
    const Fence start = tracing_ ? Fence::record(d2h_stream_, true) : Fence();
    {
      auto guard = run_on(has_streams_, d2h_stream_);
      handle->host_.copy_(source, /*non_blocking=*/has_streams_);
    }
    handle->d2h_done_ = Fence::record(d2h_stream_, tracing_);
    trace("offload", "d2h", handle.get(), start, handle->d2h_done_);
  }
  if (handle->placement_ == Handle::Placement::Disk) {
    // See Note [The disk tier] in disk_tier.cpp.
    const std::weak_ptr<CopyEngine> engine = shared_from_this();
    const std::weak_ptr<Handle> written = handle;
    handle->disk_->tier->write(
        handle->disk_,
        handle->host_,
        handle->d2h_done_,
        [engine, written](const std::string& error) {
          if (const auto alive = engine.lock()) {
            alive->on_written(written, error);
          }
        });
    stats_.disk_spills += 1;
  }
  keep_until_done(source, handle->d2h_done_, d2h_stream_, handle->id_, dropped);
  stats_.offloads += 1;
  stats_.offloaded_bytes += handle->nbytes_;
  return handle;
}

void CopyEngine::place(
    Handle& handle,
    at::Tensor& source,
    bool to_disk,
    std::unique_lock<std::mutex>& lock) {
  if (to_disk && over_budget_ == OverBudget::Disk &&
      spill_to_disk(handle, lock).empty()) {
    return;
  }
  handle.block_ = pool_->acquire(static_cast<size_t>(handle.nbytes_));
  if (handle.block_) {
    handle.placement_ = Handle::Placement::Pool;
    handle.host_ = handle.block_->view(source.scalar_type(), source.sizes());
    return;
  }
  OverBudget policy = over_budget_;
  std::string refusal;
  if (policy == OverBudget::Disk) {
    refusal = spill_to_disk(handle, lock);
    policy = refusal.empty() ? OverBudget::Disk : disk_fallback_;
  }
  TORCH_CHECK(
      policy != OverBudget::Error || refusal.empty(),
      "offload: the disk tier cannot take this tensor (",
      handle.nbytes_,
      " bytes): ",
      refusal,
      " (disk_fallback='error'; 'keep' or 'pageable' would go on without "
      "the disk)");
  TORCH_CHECK(
      policy != OverBudget::Error,
      "offload: no host buffer for tensor (",
      handle.nbytes_,
      " bytes): the host budget is exhausted or the host refused pinned "
      "memory (over_budget='error'). Raise the budget with "
      "gcoffload.configure(host_budget_bytes=...), raise the host's pinned "
      "memory cap (`ulimit -l`), or pick over_budget='keep', 'pageable' or "
      "'disk'.");
  if (policy == OverBudget::Keep) {
    handle.device_ = std::move(source);
    handle.placement_ = Handle::Placement::Device;
    stats_.kept_on_device += 1;
  } else if (policy == OverBudget::Pageable) {
    handle.host_ = at::empty(
        source.sizes(), source.options().device(at::kCPU).pinned_memory(false));
    handle.placement_ = Handle::Placement::Pageable;
    stats_.pageable_spills += 1;
  }
}

std::string CopyEngine::spill_to_disk(
    Handle& handle,
    std::unique_lock<std::mutex>& lock) {
  const std::shared_ptr<DiskTier> tier = disk_tier_;
  if (!tier) {
    return "no disk tier is configured; set disk_dir (or GCOFFLOAD_DISK_DIR)";
  }
  const std::string failure = tier->failure();
  if (!failure.empty()) {
    return "an earlier write failed: " + failure;
  }
  std::shared_ptr<DiskCopy> place = tier->allocate(static_cast<size_t>(handle.nbytes_));
  if (!place) {
    return "its budget is full (disk_budget_bytes=" +
        std::to_string(tier->stats().budget_bytes) +
        "); raise disk_budget_bytes, or lower the memory the step needs";
  }
  // See Note [Staging buffers] in disk_tier.cpp: waiting for writes needs
  // the engine, whose writer reports to it.
  lock.unlock();
  std::optional<Staging> staging;
  try {
    staging = tier->acquire_staging(
        static_cast<size_t>(handle.nbytes_), DiskTier::Wait::ForWrites);
  } catch (...) {
    lock.lock();
    throw;
  }
  lock.lock();
  handle.disk_ = std::move(place);
  stage(handle, *staging);
  handle.placement_ = Handle::Placement::Disk;
  return "";
}

void CopyEngine::on_written(
    const std::weak_ptr<Handle>& written,
    const std::string& error) {
  // Declared before the lock: the last reference to the handle, or to the
  // staging buffer's view, may go after it is released.
  const std::shared_ptr<Handle> handle = written.lock();
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  if (!handle || !error.empty() || !handle->block_ ||
      handle->state_ != Handle::State::Offloaded) {
    // Gone, kept in staging after a failed write, or already on its way
    // back from staging: the buffer stays with the handle.
    return;
  }
  release_block(*handle, Fence());
  dropped.push_back(std::move(handle->host_));
}

bool CopyEngine::read_ahead(Handle& handle) {
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  poll_pending(dropped);
  if (handle.placement_ != Handle::Placement::Disk || handle.block_ ||
      handle.state_ != Handle::State::Offloaded) {
    return false;
  }
  if (!start_read(handle, DiskTier::Wait::Never)) {
    return false;
  }
  stats_.read_aheads += 1;
  return true;
}

bool CopyEngine::start_read(Handle& handle, DiskTier::Wait wait) {
  std::optional<Staging> staging = handle.disk_->tier->acquire_staging(
      static_cast<size_t>(handle.nbytes_), wait);
  if (!staging) {
    return false;
  }
  stage(handle, *staging);
  handle.d2h_done_ = handle.disk_->tier->read(handle.disk_, staging->bytes);
  return true;
}

void CopyEngine::stage(Handle& handle, const Staging& staging) {
  handle.block_ = staging.block;
  handle.host_ = staging.bytes.narrow(0, 0, handle.nbytes_)
                     .view(handle.dtype_)
                     .view(handle.sizes_);
}

void CopyEngine::release_block(Handle& handle, Fence last_use) {
  PinnedPool& pool =
      handle.disk_ ? handle.disk_->tier->staging_pool() : *pool_;
  pool.release(std::move(*handle.block_), std::move(last_use));
  handle.block_.reset();
}

bool CopyEngine::prefetch(Handle& handle) {
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  poll_pending(dropped);
  const bool copies = handle.placement_ == Handle::Placement::Pool ||
      handle.placement_ == Handle::Placement::Pageable ||
      handle.placement_ == Handle::Placement::Disk;
  if (!copies || handle.state_ != Handle::State::Offloaded) {
    return false;
  }
  copy_to_device(handle);
  stats_.prefetches += 1;
  return true;
}

at::Tensor CopyEngine::fetch(Handle& handle) {
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  const Handle::State state = handle.state_;
  TORCH_CHECK(
      state == Handle::State::Offloaded || state == Handle::State::Prefetched,
      "fetch: handle ",
      handle.id_,
      " was already ",
      state == Handle::State::Fetched ? "fetched" : "released",
      "; an offloaded tensor can be fetched once");
  poll_pending(dropped);
  stats_.fetches += 1;

  switch (handle.placement_) {
    case Handle::Placement::Empty:
      handle.state_ = Handle::State::Fetched;
      return at::empty(
          handle.sizes_, at::TensorOptions().dtype(handle.dtype_).device(device_));
    case Handle::Placement::Device:
      handle.state_ = Handle::State::Fetched;
      return std::move(handle.device_);
    case Handle::Placement::Pool:
    case Handle::Placement::Pageable:
    case Handle::Placement::Disk:
      break;
  }

  if (state == Handle::State::Offloaded) {
    copy_to_device(handle);
    stats_.on_demand_fetches += 1;
  } else {
    stats_.prefetch_hits += 1;
  }
  const bool on_demand = state == Handle::State::Offloaded;
  // The compute thread itself waits only for a copy behind a disk read.
  const bool waits_for_disk =
      handle.h2d_done_.is_host_signal() && handle.disk_ && !handle.h2d_done_.done();
  const auto start = std::chrono::steady_clock::now();
  wait_on_compute(
      handle.h2d_done_, "fetch", &handle, on_demand ? "on_demand" : "prefetched");
  if (waits_for_disk) {
    handle.disk_->tier->add_stall(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count());
  }
  if (handle.block_) {
    release_block(handle, handle.h2d_done_);
  }
  dropped.push_back(std::move(handle.host_));
  handle.disk_.reset();
  handle.state_ = Handle::State::Fetched;
  return std::move(handle.device_);
}

void CopyEngine::copy_to_device(Handle& handle) {
  // See Note [Destination allocated on the compute stream].
  at::NoGradGuard no_grad;
  if (handle.placement_ == Handle::Placement::Disk && !handle.block_) {
    start_read(handle, DiskTier::Wait::Grow);
  }
  at::Tensor destination = at::empty(
      handle.sizes_, at::TensorOptions().dtype(handle.dtype_).device(device_));
  Fence::record(compute_stream()).block(h2d_stream_);
  if (has_streams_ && handle.placement_ == Handle::Placement::Pageable) {
    // After the handle's D2H copy: the worker runs jobs in order.
    handle.h2d_done_ = copy_on_worker(h2d_stream_, destination, handle.host_);
  } else if (handle.d2h_done_.is_host_signal() && !handle.d2h_done_.done()) {
    // A disk read still runs: the worker copies once that read alone is done
    // (not behind the reads queued after it).
    handle.h2d_done_ =
        copy_on_worker(h2d_stream_, destination, handle.host_, handle.d2h_done_);
  } else {
    handle.d2h_done_.block(h2d_stream_);
    const Fence start = tracing_ ? Fence::record(h2d_stream_, true) : Fence();
    {
      auto guard = run_on(has_streams_, h2d_stream_);
      destination.copy_(handle.host_, /*non_blocking=*/has_streams_);
    }
    handle.h2d_done_ = Fence::record(h2d_stream_, tracing_);
    trace("prefetch", "h2d", &handle, start, handle.h2d_done_);
  }
  handle.device_ = std::move(destination);
  handle.state_ = Handle::State::Prefetched;
  stats_.fetched_bytes += handle.nbytes_;
}

Fence CopyEngine::copy_on_worker(
    const c10::Stream& stream,
    at::Tensor destination,
    at::Tensor source,
    Fence after) {
  // See Note [Pageable copies off the compute thread].
  Fence done = Fence::host_signal();
  worker_.submit(
      [stream, destination, source, after, done]() mutable {
        std::string error;
        try {
          after.synchronize();
          c10::StreamGuard guard(stream);
          at::NoGradGuard no_grad;
          destination.copy_(source, /*non_blocking=*/false);
        } catch (const std::exception& failure) {
          const auto* c10_error = dynamic_cast<const c10::Error*>(&failure);
          error = c10_error ? c10_error->what_without_backtrace() : failure.what();
        }
        destination = at::Tensor();
        source = at::Tensor();
        done.signal(std::move(error));
      },
      done);
  return done;
}

void CopyEngine::release(Handle& handle) {
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  release_locked(handle, dropped);
}

void CopyEngine::release_locked(
    Handle& handle,
    std::vector<at::Tensor>& dropped) {
  // See Note [Dropped handles].
  const Handle::State state = handle.state_;
  if (state == Handle::State::Released) {
    return;
  }
  handle.state_ = Handle::State::Released;
  stats_.live_handles -= 1;
  if (state == Handle::State::Prefetched) {
    keep_until_done(
        handle.device_, handle.h2d_done_, h2d_stream_, handle.id_, dropped);
  } else if (state == Handle::State::Offloaded) {
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->handle_id == handle.id_ && !it->fence.is_host_signal()) {
        hand_off(*it, dropped);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (handle.block_) {
    release_block(
        handle,
        state == Handle::State::Prefetched ? handle.h2d_done_
                                           : handle.d2h_done_);
  }
  dropped.push_back(std::move(handle.host_));
  dropped.push_back(std::move(handle.device_));
  handle.disk_.reset();
}

void CopyEngine::keep_until_done(
    const at::Tensor& tensor,
    Fence fence,
    const c10::Stream& copy_stream,
    int64_t handle_id,
    std::vector<at::Tensor>& dropped) {
  // See Note [Source lifetime].
  if (fence.done()) {
    return;
  }
  pending_.push_back(
      Pending{tensor.detach(), std::move(fence), copy_stream, handle_id});
  while (pending_.size() > max_pending_) {
    Pending& oldest = pending_.front();
    if (oldest.fence.is_host_signal()) {
      // A pageable copy the worker may not even have issued yet.
      oldest.fence.synchronize();
      dropped.push_back(std::move(oldest.tensor));
    } else {
      hand_off(oldest, dropped);
    }
    pending_.pop_front();
  }
}

void CopyEngine::hand_off(Pending& entry, std::vector<at::Tensor>& dropped) {
  c10::impl::VirtualGuardImpl(device_.type())
      .recordDataPtrOnStream(entry.tensor.storage().data_ptr(), entry.copy_stream);
  dropped.push_back(std::move(entry.tensor));
  stats_.pending_handoffs += 1;
}

void CopyEngine::poll_pending(std::vector<at::Tensor>& dropped) {
  auto still_busy = std::stable_partition(
      pending_.begin(), pending_.end(), [](const Pending& entry) {
        return !entry.fence.done();
      });
  for (auto it = still_busy; it != pending_.end(); ++it) {
    dropped.push_back(std::move(it->tensor));
  }
  pending_.erase(still_busy, pending_.end());
}

void CopyEngine::synchronize() {
  std::vector<Fence> fences;
  std::shared_ptr<DiskTier> tier;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fences.push_back(worker_.drained());
    fences.push_back(Fence::record(d2h_stream_));
    fences.push_back(Fence::record(h2d_stream_));
    tier = disk_tier_;
  }
  for (const Fence& fence : fences) {
    fence.synchronize();
  }
  if (tier) {
    // After the copies: a write waits for its D2H copy. Not under the lock:
    // the writer reports to the engine.
    tier->synchronize();
  }
  std::vector<at::Tensor> dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  poll_pending(dropped);
}

void CopyEngine::set_over_budget(OverBudget policy) {
  std::lock_guard<std::mutex> lock(mutex_);
  over_budget_ = policy;
}

void CopyEngine::set_disk_tier(
    std::shared_ptr<DiskTier> tier,
    OverBudget fallback) {
  TORCH_CHECK(
      fallback != OverBudget::Disk,
      "disk_fallback must be 'keep', 'pageable' or 'error'");
  std::lock_guard<std::mutex> lock(mutex_);
  disk_tier_ = std::move(tier);
  disk_fallback_ = fallback;
}

std::shared_ptr<DiskTier> CopyEngine::disk_tier() {
  std::lock_guard<std::mutex> lock(mutex_);
  return disk_tier_;
}

void CopyEngine::set_max_pending(int64_t max_pending) {
  TORCH_CHECK(
      max_pending >= 1, "max_pending must be at least 1, got ", max_pending);
  std::lock_guard<std::mutex> lock(mutex_);
  max_pending_ = static_cast<size_t>(max_pending);
}

EngineStats CopyEngine::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void CopyEngine::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t live_handles = stats_.live_handles;
  stats_ = EngineStats();
  stats_.live_handles = live_handles;
}

void CopyEngine::start_trace() {
  std::lock_guard<std::mutex> lock(mutex_);
  trace_.clear();
  tracing_ = true;
  trace_origin_ = Fence::record(compute_stream(), true);
}

void CopyEngine::mark(const std::string& label) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (tracing_) {
    const Fence now = Fence::record(compute_stream(), true);
    trace("mark", "compute", nullptr, now, now, label);
  }
}

std::vector<TraceEntry> CopyEngine::stop_trace() {
  std::vector<TraceRecord> records;
  Fence origin;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tracing_ = false;
    records.swap(trace_);
    origin = trace_origin_;
  }
  origin.synchronize();
  std::vector<TraceEntry> entries;
  entries.reserve(records.size());
  for (TraceRecord& record : records) {
    record.end.synchronize();
    record.entry.start_ms = record.start.elapsed_ms(origin);
    record.entry.end_ms = record.end.elapsed_ms(origin);
    entries.push_back(std::move(record.entry));
  }
  return entries;
}

void CopyEngine::wait_on_compute(
    const Fence& fence,
    const char* op,
    const Handle* handle,
    std::string label) {
  // See Note [Traced stalls].
  const c10::Stream compute = compute_stream();
  const Fence before = tracing_ ? Fence::record(compute, true) : Fence();
  fence.block(compute);
  if (tracing_) {
    trace(op, "compute", handle, before, Fence::record(compute, true), std::move(label));
  }
}

void CopyEngine::trace(
    const char* op,
    const char* stream,
    const Handle* handle,
    const Fence& start,
    const Fence& end,
    std::string label) {
  if (!tracing_) {
    return;
  }
  TraceEntry entry;
  entry.op = op;
  entry.stream = stream;
  entry.handle_id = handle ? handle->id_ : -1;
  entry.nbytes = handle ? handle->nbytes_ : 0;
  entry.label = std::move(label);
  trace_.push_back(TraceRecord{std::move(entry), start, end});
}

} // namespace gcoffload
