#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace gcoffload {

// Faults the tests make the disk tier's file operations report, so that
// every failure path runs on a healthy disk (DiskTier._inject_fault).
class FaultInjector {
 public:
  struct Fault {
    int error = 0; // the errno the operation fails with; 0: a short transfer
    int64_t transfer_bytes = 0; // for a short transfer: bytes it moves
  };

  // The next `times` `op` calls ("open", "write" or "read") after `skip`
  // others fail with `error`, or, if `error` is 0, move `transfer_bytes`
  // bytes only.
  void arm(
      const std::string& op,
      int error,
      int64_t transfer_bytes,
      int64_t skip,
      int64_t times);
  std::optional<Fault> next(const char* op);
  // Forgets every armed fault.
  void clear();

 private:
  struct Armed {
    std::string op;
    Fault fault;
    int64_t skip;
    int64_t times;
  };
  std::mutex mutex_;
  std::vector<Armed> armed_;
};

// One unnamed file in a directory that blocks are written to and read from
// at given offsets; see Note [The disk tier's file] in disk_file.cpp.
//
// Errors are thrown as c10::Error whose message names the directory as
// `disk_dir` and says what to do. Thread-safe for calls on disjoint ranges.
class DiskFile {
 public:
  // Offsets, lengths and buffer addresses must be multiples of this.
  static constexpr size_t kAlignment = 4096;

  DiskFile(std::string dir, FaultInjector& faults);
  ~DiskFile();
  DiskFile(const DiskFile&) = delete;
  DiskFile& operator=(const DiskFile&) = delete;

  void write(const void* data, size_t nbytes, uint64_t offset);
  void read(void* data, size_t nbytes, uint64_t offset);
  // Shrinks (or grows) the file to `nbytes`, giving its blocks back.
  void truncate(uint64_t nbytes);

  const std::string& dir() const {
    return dir_;
  }
  // Whether transfers bypass the page cache (O_DIRECT).
  bool direct() const {
    return direct_;
  }
  // "O_TMPFILE" or "unlinked after open".
  const char* naming() const {
    return anonymous_ ? "O_TMPFILE" : "unlinked after open";
  }

 private:
  // Goes on without O_DIRECT after the filesystem refused an aligned
  // transfer with it; returns false if the file was not direct.
  bool drop_direct();
  // Moves `nbytes` at `offset` with `call(done, length)` (pwrite or pread of
  // `length` bytes, `done` bytes in), continuing short transfers.
  template <typename Syscall>
  void transfer(
      const char* op,
      const char* verb,
      size_t nbytes,
      uint64_t offset,
      Syscall call);
  [[noreturn]] void fail(
      const char* what,
      size_t nbytes,
      uint64_t offset,
      int error) const;

  const std::string dir_;
  FaultInjector& faults_;
  int fd_ = -1;
  bool direct_ = false;
  bool anonymous_ = false;
  std::mutex flags_mutex_;
};

// Sequential transfer rates of a file in `dir` as the disk tier's file gets
// them (O_DIRECT where it can; places written before, as in a training run's
// steady state), for `nbytes` in `block_bytes` blocks.
struct Bandwidth {
  double write_bytes_per_second = 0;
  double read_bytes_per_second = 0;
  bool direct = false;
};
Bandwidth measure_bandwidth(
    const std::string& dir,
    size_t nbytes,
    size_t block_bytes);

} // namespace gcoffload
