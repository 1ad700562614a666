// Python bindings: the functions tests/simdevice/__init__.py wraps.

#include "copies.h"
#include "device_allocator.h"
#include "fallback.h"
#include "generator.h"
#include "host_allocator.h"
#include "stream.h"

#include <ATen/core/CachingHostAllocator.h>
#include <torch/csrc/utils/pybind.h>

#include <chrono>
#include <mutex>

namespace py = pybind11;

namespace simdev {

namespace {

std::pair<int64_t, int64_t> stream_key(const Stream& stream) {
  return {stream.id(), stream.device_index()};
}

// Runs `use` on `device`'s default generator with its lock held.
template <typename Use>
auto with_generator(c10::DeviceIndex device, const Use& use) {
  at::Generator generator = default_generator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return use(*at::check_generator<Generator>(generator));
}

} // namespace

} // namespace simdev

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace simdev;
  using release_gil = py::call_guard<py::gil_scoped_release>;

  m.attr("DEVICE_TYPE") = static_cast<int>(c10::DeviceType::PrivateUse1);
  m.def("device_count", [] { return kDeviceCount; });
  m.def("current_device", &current_device);
  m.def("set_device", &set_device, py::arg("device"));
  m.def(
      "exchange_device",
      [](c10::DeviceIndex device) {
        const c10::DeviceIndex previous = current_device();
        if (device >= 0) {
          set_device(device);
        }
        return previous;
      },
      py::arg("device"));
  m.def("synchronize", &synchronize_device, py::arg("device"), release_gil());
  m.def(
      "current_stream",
      [](c10::DeviceIndex device) { return stream_key(current_stream(device)); },
      py::arg("device"));
  m.def(
      "pool_stream",
      [](c10::DeviceIndex device, bool high_priority) {
        return stream_key(pool_stream(device, high_priority));
      },
      py::arg("device"),
      py::arg("high_priority"));
  py::class_<Hold>(m, "Hold")
      .def("release", &Hold::release)
      .def_property_readonly("timed_out", &Hold::timed_out);
  m.def(
      "hold",
      [](int64_t stream_id,
         c10::DeviceIndex device,
         std::optional<double> timeout_s) {
        return std::make_unique<Hold>(stream_of(device, stream_id), timeout_s);
      },
      py::arg("stream_id"),
      py::arg("device"),
      py::arg("timeout_s") = py::none());
  m.def(
      "default_stream",
      [](c10::DeviceIndex device) { return stream_key(default_stream(device)); },
      py::arg("device"));

  m.def(
      "manual_seed",
      [](uint64_t seed, c10::DeviceIndex device) {
        with_generator(device, [&](Generator& g) {
          g.set_current_seed(seed);
          return 0;
        });
      },
      py::arg("seed"),
      py::arg("device"));
  m.def(
      "seed",
      [](c10::DeviceIndex device) { return with_generator(device, [](Generator& g) { return g.seed(); }); },
      py::arg("device"));
  m.def(
      "initial_seed",
      [](c10::DeviceIndex device) {
        return with_generator(device, [](Generator& g) { return g.current_seed(); });
      },
      py::arg("device"));
  m.def(
      "get_rng_state",
      [](c10::DeviceIndex device) {
        return with_generator(device, [](Generator& g) { return at::Tensor(g.get_state()); });
      },
      py::arg("device"));
  m.def(
      "set_rng_state",
      [](const at::Tensor& state, c10::DeviceIndex device) {
        with_generator(device, [&](Generator& g) {
          g.set_state(*state.unsafeGetTensorImpl());
          return 0;
        });
      },
      py::arg("state"),
      py::arg("device"));

  m.def(
      "memory_stats",
      [](c10::DeviceIndex device) {
        const auto stats = device_allocator().getDeviceStats(device);
        const auto& allocated = stats.allocated_bytes[kAggregateStat];
        const auto& reserved = stats.reserved_bytes[kAggregateStat];
        py::dict result;
        result["allocated_bytes"] = allocated.current;
        result["peak_allocated_bytes"] = allocated.peak;
        result["reserved_bytes"] = reserved.current;
        result["peak_reserved_bytes"] = reserved.peak;
        return result;
      },
      py::arg("device"));
  m.def(
      "reset_peak_memory_stats",
      [](c10::DeviceIndex device) { device_allocator().resetPeakStats(device); },
      py::arg("device"));
  m.def("empty_cache", [] { device_allocator().emptyCache(); }, release_gil());

  m.def(
      "set_copy_timing",
      [](double h2d_gbps, double d2h_gbps, double latency_us, double jitter, uint64_t seed) {
        set_copy_timing(CopyTiming{h2d_gbps, d2h_gbps, latency_us, jitter, seed});
      },
      py::arg("h2d_gbps"),
      py::arg("d2h_gbps"),
      py::arg("latency_us"),
      py::arg("jitter"),
      py::arg("seed"));
  m.def("copy_timing", [] {
    const CopyTiming timing = copy_timing();
    py::dict result;
    result["h2d_gbps"] = timing.h2d_gbps;
    result["d2h_gbps"] = timing.d2h_gbps;
    result["latency_us"] = timing.latency_us;
    result["jitter"] = timing.jitter;
    result["seed"] = timing.seed;
    return result;
  });
  m.def(
      "set_kernel_time_us",
      [](double us, std::optional<std::string> op) {
        set_kernel_time(std::chrono::nanoseconds(static_cast<int64_t>(us * 1e3)), op);
      },
      py::arg("us"),
      py::arg("op"));

  m.def("reset_kernel_times", &reset_kernel_times);

  m.def("host_allocator_registered", [] {
    return at::getHostAllocator(c10::DeviceType::PrivateUse1) == &host_allocator();
  });
  m.def("host_empty_cache_calls", [] { return host_allocator().empty_cache_calls(); });
  m.def("pinned_allocations", [] { return host_allocator().allocation_calls(); });
  m.def(
      "fail_pinned_allocation",
      [](int64_t nth) { host_allocator().fail_allocation(nth); },
      py::arg("n"));
  m.def(
      "set_pinned_limit",
      [](std::optional<int64_t> nbytes) { host_allocator().set_limit(nbytes); },
      py::arg("nbytes"));
  m.def("host_stats", [] {
    const at::HostStats stats = host_allocator().get_stats();
    py::dict result;
    result["allocated_bytes"] = stats.allocated_bytes.current;
    result["active_bytes"] = stats.active_bytes.current;
    result["active_requests"] = stats.active_requests.current;
    result["num_host_alloc"] = stats.num_host_alloc;
    result["num_host_free"] = stats.num_host_free;
    return result;
  });
}
