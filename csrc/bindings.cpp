// Python bindings. The typed, documented API lives in gcoffload/engine.py;
// these are thin, and release the GIL around every call that can wait.

#include "copy_engine.h"
#include "disk_file.h"
#include "disk_tier.h"
#include "pinned_pool.h"

#include <torch/extension.h>

#include <string>

namespace py = pybind11;

namespace gcoffload {
namespace {

OverBudget parse_over_budget(const std::string& policy) {
  if (policy == "keep") {
    return OverBudget::Keep;
  }
  if (policy == "pageable") {
    return OverBudget::Pageable;
  }
  if (policy == "disk") {
    return OverBudget::Disk;
  }
  TORCH_CHECK(
      policy == "error",
      "over_budget must be 'keep', 'pageable', 'error' or 'disk', got '",
      policy,
      "'");
  return OverBudget::Error;
}

// A tensor's version counter without the tensor: what a swapped view's
// in-place check reads once its storage has left the device (Note [Watched
// versions] in copy_engine.cpp; gcoffload/swapping/swapped_storage.py).
struct VersionWatch {
  c10::VariableVersion counter;
  int64_t current() const {
    return static_cast<int64_t>(counter.current_version());
  }
};

const char* state_name(Handle::State state) {
  switch (state) {
    case Handle::State::Offloaded:
      return "offloaded";
    case Handle::State::Prefetched:
      return "prefetched";
    case Handle::State::Fetched:
      return "fetched";
    case Handle::State::Released:
      return "released";
  }
  return "unknown";
}

const char* placement_name(Handle::Placement placement) {
  switch (placement) {
    case Handle::Placement::Pool:
      return "pool";
    case Handle::Placement::Pageable:
      return "pageable";
    case Handle::Placement::Device:
      return "device";
    case Handle::Placement::Empty:
      return "empty";
    case Handle::Placement::Disk:
      return "disk";
  }
  return "unknown";
}

py::dict pool_stats(PinnedPool& pool) {
  const PoolStats stats = pool.stats();
  py::dict out;
  out["reserved_bytes"] = stats.reserved_bytes;
  out["in_use_bytes"] = stats.in_use_bytes;
  out["peak_in_use_bytes"] = stats.peak_in_use_bytes;
  out["host_alloc_calls"] = stats.host_alloc_calls;
  out["alloc_failures"] = stats.alloc_failures;
  out["reuse_hits"] = stats.reuse_hits;
  out["spills"] = stats.spills;
  out["slabs"] = stats.slabs;
  out["budget_bytes"] = stats.budget_bytes < 0 ? py::object(py::none())
                                                : py::object(py::int_(stats.budget_bytes));
  return out;
}

py::dict engine_stats(CopyEngine& engine) {
  const EngineStats stats = engine.stats();
  py::dict out;
  out["offloads"] = stats.offloads;
  out["offloaded_bytes"] = stats.offloaded_bytes;
  out["prefetches"] = stats.prefetches;
  out["fetches"] = stats.fetches;
  out["prefetch_hits"] = stats.prefetch_hits;
  out["on_demand_fetches"] = stats.on_demand_fetches;
  out["fetched_bytes"] = stats.fetched_bytes;
  out["kept_on_device"] = stats.kept_on_device;
  out["pageable_spills"] = stats.pageable_spills;
  out["disk_spills"] = stats.disk_spills;
  out["read_aheads"] = stats.read_aheads;
  out["pending_handoffs"] = stats.pending_handoffs;
  out["live_handles"] = stats.live_handles;
  return out;
}

py::dict disk_stats(DiskTier& tier) {
  const DiskStats stats = tier.stats();
  const PoolStats staging = tier.staging_pool().stats();
  py::dict out;
  out["dir"] = tier.dir();
  out["direct"] = tier.direct();
  out["file"] = tier.naming();
  out["checksums"] = tier.checksums();
  out["writes"] = stats.writes;
  out["written_bytes"] = stats.written_bytes;
  out["write_seconds"] = stats.write_seconds;
  out["reads"] = stats.reads;
  out["read_bytes"] = stats.read_bytes;
  out["read_seconds"] = stats.read_seconds;
  out["stall_seconds"] = stats.stall_seconds;
  out["refused"] = stats.refused;
  out["failed_writes"] = stats.failed_writes;
  out["bytes_on_disk"] = stats.bytes_on_disk;
  out["peak_bytes_on_disk"] = stats.peak_bytes_on_disk;
  out["file_bytes"] = stats.file_bytes;
  out["budget_bytes"] = stats.budget_bytes < 0 ? py::object(py::none())
                                                : py::object(py::int_(stats.budget_bytes));
  out["staging_in_use_bytes"] = staging.in_use_bytes;
  out["staging_peak_bytes"] = staging.peak_in_use_bytes;
  out["staging_limit_bytes"] = staging.budget_bytes;
  return out;
}

py::list trace_entries(CopyEngine& engine) {
  std::vector<TraceEntry> entries;
  {
    py::gil_scoped_release no_gil;
    entries = engine.stop_trace();
  }
  py::list out;
  for (const TraceEntry& entry : entries) {
    py::dict row;
    row["op"] = entry.op;
    row["stream"] = entry.stream;
    row["handle_id"] = entry.handle_id;
    row["nbytes"] = entry.nbytes;
    row["label"] = entry.label;
    row["start_ms"] = entry.start_ms;
    row["end_ms"] = entry.end_ms;
    out.append(std::move(row));
  }
  return out;
}

} // namespace
} // namespace gcoffload

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gcoffload;
  m.doc() = "gcoffload C++ core: pinned host pool and side-stream copy engine";

  py::class_<PinnedPool, std::shared_ptr<PinnedPool>>(m, "PinnedPool")
      .def(
          py::init([](const std::string& device_type) {
            return std::make_shared<PinnedPool>(
                c10::Device(device_type).type());
          }),
          py::arg("device_type"))
      .def_property_readonly(
          "device_type",
          [](const PinnedPool& pool) {
            return c10::DeviceTypeName(pool.device_type(), /*lower_case=*/true);
          })
      .def("reserve", &PinnedPool::reserve, py::arg("nbytes"))
      .def("trim", &PinnedPool::trim, py::call_guard<py::gil_scoped_release>())
      .def(
          "set_budget",
          [](PinnedPool& pool, std::optional<int64_t> nbytes) {
            TORCH_CHECK(
                !nbytes || *nbytes >= 0,
                "host_budget_bytes must be >= 0 or None, got ",
                *nbytes);
            pool.set_budget(
                nbytes ? static_cast<size_t>(*nbytes) : PinnedPool::kUnlimited);
          },
          py::arg("nbytes"),
          py::call_guard<py::gil_scoped_release>())
      .def("set_slab_bytes", &PinnedPool::set_slab_bytes, py::arg("nbytes"))
      .def("stats", &pool_stats)
      .def("reset_peak", &PinnedPool::reset_peak)
      .def(
          "_fail_allocation_after",
          &PinnedPool::fail_allocation_after,
          py::arg("successes"),
          py::arg("failures") = 1,
          "Test hook: lets `successes` host allocations through, then makes "
          "the next `failures` fail as an allocator out of memory does.");

  py::class_<DiskTier, std::shared_ptr<DiskTier>>(m, "DiskTier")
      .def(
          py::init([](const std::string& device_type,
                      const std::string& dir,
                      std::optional<int64_t> budget_bytes,
                      int64_t staging_bytes,
                      bool checksums,
                      std::shared_ptr<FaultInjector> faults) {
            return DiskTier::open(
                c10::Device(device_type).type(),
                dir,
                budget_bytes.value_or(-1),
                staging_bytes,
                checksums,
                std::move(faults));
          }),
          py::arg("device_type"),
          py::arg("dir"),
          py::arg("budget_bytes"),
          py::arg("staging_bytes"),
          py::arg("checksums") = false,
          py::arg("faults") = nullptr,
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("dir", &DiskTier::dir)
      .def_property_readonly("direct", &DiskTier::direct)
      .def_property_readonly("failure", &DiskTier::failure)
      .def("stats", &disk_stats)
      .def("reset_stats", &DiskTier::reset_stats)
      .def(
          "synchronize",
          &DiskTier::synchronize,
          py::call_guard<py::gil_scoped_release>())
      .def("trim", &DiskTier::trim, py::call_guard<py::gil_scoped_release>());

  py::class_<FaultInjector, std::shared_ptr<FaultInjector>>(m, "FaultInjector")
      .def(py::init<>())
      .def(
          "arm",
          &FaultInjector::arm,
          py::arg("op"),
          py::arg("error") = 0,
          py::arg("transfer_bytes") = 0,
          py::arg("skip") = 0,
          py::arg("times") = 1,
          "Test hook: the next `times` `op` calls ('open', 'write' or "
          "'read') after `skip` others fail with errno `error`, or, if it is "
          "0, move `transfer_bytes` bytes only.")
      .def("clear", &FaultInjector::clear);

  m.def(
      "measure_disk_bandwidth",
      [](const std::string& dir, int64_t nbytes, int64_t block_bytes) {
        TORCH_CHECK_VALUE(
            nbytes > 0 && block_bytes > 0,
            "measure_disk_bandwidth: nbytes and block_bytes must be positive");
        const Bandwidth measured = measure_bandwidth(
            dir, static_cast<size_t>(nbytes), static_cast<size_t>(block_bytes));
        py::dict out;
        out["write_bytes_per_second"] = measured.write_bytes_per_second;
        out["read_bytes_per_second"] = measured.read_bytes_per_second;
        out["direct"] = measured.direct;
        return out;
      },
      py::arg("dir"),
      py::arg("nbytes"),
      py::arg("block_bytes"));

  py::class_<VersionWatch>(m, "VersionWatch")
      .def_property_readonly("current", &VersionWatch::current);
  m.def(
      "watch_version",
      [](const at::Tensor& tensor) {
        TORCH_CHECK_VALUE(
            tensor.unsafeGetTensorImpl()->version_counter().enabled(),
            "watch_version: tensor has no version counter (an inference tensor); "
            "create it outside torch.inference_mode()");
        return VersionWatch{tensor.unsafeGetTensorImpl()->version_counter()};
      },
      py::arg("tensor"));

  py::class_<Handle, std::shared_ptr<Handle>>(m, "Handle")
      .def_property_readonly("id", &Handle::id)
      .def_property_readonly(
          "shape",
          [](const Handle& handle) { return py::tuple(py::cast(handle.sizes())); })
      .def_property_readonly(
          "dtype",
          [](const Handle& handle) { return handle.dtype(); })
      .def_property_readonly("nbytes", &Handle::nbytes)
      .def_property_readonly(
          "state",
          [](const Handle& handle) { return state_name(handle.state()); })
      .def_property_readonly(
          "placement",
          [](const Handle& handle) { return placement_name(handle.placement()); })
      .def_property_readonly("source_version", &Handle::source_version)
      .def("release", &Handle::release);

  py::class_<CopyEngine, std::shared_ptr<CopyEngine>>(m, "CopyEngine")
      .def(py::init(&CopyEngine::create), py::arg("device"), py::arg("pool"))
      .def_property_readonly("device", &CopyEngine::device)
      .def_property_readonly("pool", &CopyEngine::pool)
      // Wrapped so that the pool's warning reaches Python's warnings and
      // TORCH_CHECK_TYPE / _VALUE raise TypeError / ValueError.
      .def(
          "offload",
          torch::wrap_pybind_function_no_gil(
              [](CopyEngine& engine, const at::Tensor& tensor, bool to_disk) {
                return engine.offload(tensor, to_disk);
              }),
          py::arg("tensor"),
          py::arg("to_disk") = false)
      .def(
          "prefetch",
          &CopyEngine::prefetch,
          py::arg("handle"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "read_ahead",
          &CopyEngine::read_ahead,
          py::arg("handle"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "fetch",
          &CopyEngine::fetch,
          py::arg("handle"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "synchronize",
          &CopyEngine::synchronize,
          py::call_guard<py::gil_scoped_release>())
      .def(
          "set_over_budget",
          [](CopyEngine& engine, const std::string& policy) {
            engine.set_over_budget(parse_over_budget(policy));
          },
          py::arg("policy"))
      .def(
          "set_disk_tier",
          [](CopyEngine& engine,
             std::shared_ptr<DiskTier> tier,
             const std::string& fallback) {
            engine.set_disk_tier(std::move(tier), parse_over_budget(fallback));
          },
          py::arg("tier"),
          py::arg("fallback"))
      .def_property_readonly("disk_tier", &CopyEngine::disk_tier)
      .def("set_max_pending", &CopyEngine::set_max_pending, py::arg("max_pending"))
      .def("stats", &engine_stats)
      .def("reset_stats", &CopyEngine::reset_stats)
      .def("start_trace", &CopyEngine::start_trace)
      .def("stop_trace", &trace_entries)
      .def("mark", &CopyEngine::mark, py::arg("label"));
}
