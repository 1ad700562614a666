#include "disk_file.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace gcoffload {

// Note [The disk tier's file]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// All the bytes a disk tier holds live in one file, at offsets the tier
// hands out (no file per tensor: creating and deleting files costs metadata
// I/O, and one file lets the tier reuse its blocks step after step). The file
// has no name from the moment it exists, so nothing is left on the disk when
// the process ends in any way, SIGKILL and the OOM killer included: it is
// opened with O_TMPFILE, or, where the filesystem lacks it (some network and
// FUSE filesystems), created with a unique name and unlinked at once. Only a
// crash between those two calls can leave a `gcoffload-disk-*` file behind.
// Transfers bypass the page cache with O_DIRECT where the filesystem takes
// it: otherwise every byte written would also sit in host RAM as cache,
// which is the memory the tier exists to spare, and reads would measure the
// cache, not the disk. O_DIRECT wants block-aligned offsets, lengths and
// addresses (kAlignment covers every logical block size in use). A
// filesystem that refuses it (tmpfs; some refuse only at the first transfer,
// with EINVAL) gets ordinary buffered I/O instead, and `direct()` says so.
// Transfers loop until every byte moved: a short write or read is normal for
// pwrite and pread and is continued; one that moves nothing is an error.

namespace {

const char* errno_name(int error) {
  switch (error) {
    case ENOSPC:
      return "ENOSPC";
    case EIO:
      return "EIO";
    case EROFS:
      return "EROFS";
    case EACCES:
      return "EACCES";
    case EPERM:
      return "EPERM";
    case ENOENT:
      return "ENOENT";
    case ENOTDIR:
      return "ENOTDIR";
    case EDQUOT:
      return "EDQUOT";
    case EFBIG:
      return "EFBIG";
    default:
      return "errno";
  }
}

std::string describe_errno(int error) {
  return std::string(std::strerror(error)) + " (" + errno_name(error) + " " +
      std::to_string(error) + ")";
}

// What to do about a failed open or transfer, by its cause.
const char* remedy(int error) {
  switch (error) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return "Free space there, point disk_dir (or GCOFFLOAD_DISK_DIR) at a "
             "larger local disk, or lower disk_budget_bytes below the free "
             "space.";
    case EROFS:
    case EACCES:
    case EPERM:
      return "disk_dir must be a directory this process can write to; point "
             "disk_dir (or GCOFFLOAD_DISK_DIR) at one.";
    case ENOENT:
    case ENOTDIR:
      return "disk_dir must be an existing directory; create it, or point "
             "disk_dir (or GCOFFLOAD_DISK_DIR) at one.";
    default:
      return "The disk or its filesystem reported an error; check the "
             "kernel log, or point disk_dir (or GCOFFLOAD_DISK_DIR) at "
             "another local disk.";
  }
}

} // namespace

void FaultInjector::arm(
    const std::string& op,
    int error,
    int64_t transfer_bytes,
    int64_t skip,
    int64_t times) {
  TORCH_CHECK_VALUE(
      op == "open" || op == "write" || op == "read",
      "_inject_fault: op must be 'open', 'write' or 'read', got '",
      op,
      "'");
  TORCH_CHECK_VALUE(
      error >= 0 && transfer_bytes >= 0 && skip >= 0 && times >= 0,
      "_inject_fault: error, transfer_bytes, skip and times must be >= 0");
  std::lock_guard<std::mutex> lock(mutex_);
  armed_.push_back(Armed{op, Fault{error, transfer_bytes}, skip, times});
}

std::optional<FaultInjector::Fault> FaultInjector::next(const char* op) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = armed_.begin(); it != armed_.end(); ++it) {
    if (it->op != op) {
      continue;
    }
    if (it->skip > 0) {
      it->skip -= 1;
      return std::nullopt;
    }
    const Fault fault = it->fault;
    if (--it->times <= 0) {
      armed_.erase(it);
    }
    return fault;
  }
  return std::nullopt;
}

void FaultInjector::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_.clear();
}

DiskFile::DiskFile(std::string dir, FaultInjector& faults)
    : dir_(std::move(dir)), faults_(faults) {
  // See Note [The disk tier's file].
  int error = 0;
  if (const auto fault = faults_.next("open")) {
    error = fault->error != 0 ? fault->error : EIO;
  } else {
    fd_ = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    error = fd_ < 0 ? errno : 0;
    anonymous_ = fd_ >= 0;
    const bool no_tmpfile =
        error == EOPNOTSUPP || error == EISDIR || error == EINVAL;
    if (no_tmpfile) {
      std::string path = dir_ + "/gcoffload-disk-XXXXXX";
      std::vector<char> name(path.begin(), path.end());
      name.push_back('\0');
      fd_ = ::mkostemp(name.data(), O_CLOEXEC);
      error = fd_ < 0 ? errno : 0;
      if (fd_ >= 0 && ::unlink(name.data()) != 0) {
        error = errno;
        ::close(fd_);
        fd_ = -1;
      }
    }
  }
  if (fd_ < 0) {
    TORCH_CHECK(
        false,
        "gcoffload disk tier: cannot create its file in disk_dir='",
        dir_,
        "': ",
        describe_errno(error),
        ". ",
        remedy(error));
  }
  const int flags = ::fcntl(fd_, F_GETFL);
  direct_ = flags >= 0 && ::fcntl(fd_, F_SETFL, flags | O_DIRECT) == 0;
}

DiskFile::~DiskFile() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

bool DiskFile::drop_direct() {
  std::lock_guard<std::mutex> lock(flags_mutex_);
  if (!direct_) {
    return false;
  }
  const int flags = ::fcntl(fd_, F_GETFL);
  if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) != 0) {
    return false;
  }
  direct_ = false;
  return true;
}

void DiskFile::fail(
    const char* what,
    size_t nbytes,
    uint64_t offset,
    int error) const {
  TORCH_CHECK(
      false,
      "gcoffload disk tier: ",
      what,
      " ",
      nbytes,
      " bytes at offset ",
      offset,
      " of its file in disk_dir='",
      dir_,
      "' failed: ",
      error == 0 ? std::string("the transfer moved no bytes")
                 : describe_errno(error),
      ". ",
      remedy(error));
}

void DiskFile::write(const void* data, size_t nbytes, uint64_t offset) {
  const char* bytes = static_cast<const char*>(data);
  transfer("write", "writing", nbytes, offset, [&](size_t done, size_t length) {
    return ::pwrite(fd_, bytes + done, length, offset + done);
  });
}

void DiskFile::read(void* data, size_t nbytes, uint64_t offset) {
  char* bytes = static_cast<char*>(data);
  transfer("read", "reading", nbytes, offset, [&](size_t done, size_t length) {
    return ::pread(fd_, bytes + done, length, offset + done);
  });
}

template <typename Syscall>
void DiskFile::transfer(
    const char* op,
    const char* verb,
    size_t nbytes,
    uint64_t offset,
    Syscall call) {
  size_t done = 0;
  while (done < nbytes) {
    size_t length = nbytes - done;
    ssize_t moved;
    const auto fault = faults_.next(op);
    if (fault && fault->error != 0) {
      errno = fault->error;
      moved = -1;
    } else {
      if (fault) {
        length = std::min(length, static_cast<size_t>(fault->transfer_bytes));
      }
      moved = length > 0 ? call(done, length) : 0;
    }
    if (moved < 0) {
      const int error = errno;
      if (error == EINTR || (error == EINVAL && drop_direct())) {
        continue;
      }
      fail(verb, nbytes, offset, error);
    }
    if (moved == 0) {
      fail(verb, nbytes, offset, 0);
    }
    done += static_cast<size_t>(moved);
  }
}

Bandwidth measure_bandwidth(
    const std::string& dir,
    size_t nbytes,
    size_t block_bytes) {
  TORCH_CHECK_VALUE(
      block_bytes > 0 && block_bytes % DiskFile::kAlignment == 0 &&
          nbytes >= block_bytes,
      "measure_bandwidth: block_bytes must be a positive multiple of ",
      DiskFile::kAlignment,
      " and nbytes at least block_bytes, got ",
      block_bytes,
      " and ",
      nbytes);
  FaultInjector no_faults;
  DiskFile file(dir, no_faults);
  void* memory = nullptr;
  TORCH_CHECK(
      ::posix_memalign(&memory, DiskFile::kAlignment, block_bytes) == 0,
      "measure_bandwidth: cannot allocate a ",
      block_bytes,
      "-byte buffer");
  std::unique_ptr<void, decltype(&std::free)> buffer(memory, &std::free);
  std::memset(memory, 0x5a, block_bytes);
  const size_t blocks = nbytes / block_bytes;
  using Clock = std::chrono::steady_clock;
  auto rate = [&](Clock::time_point start) {
    const double seconds =
        std::chrono::duration<double>(Clock::now() - start).count();
    return static_cast<double>(blocks * block_bytes) / seconds;
  };
  // Written twice, the second time timed: the tier rewrites its file's
  // places step after step, which a filesystem does faster than it grows a
  // file.
  for (size_t index = 0; index < blocks; ++index) {
    file.write(memory, block_bytes, index * block_bytes);
  }
  Bandwidth measured;
  auto start = Clock::now();
  for (size_t index = 0; index < blocks; ++index) {
    file.write(memory, block_bytes, index * block_bytes);
  }
  measured.write_bytes_per_second = rate(start);
  start = Clock::now();
  for (size_t index = 0; index < blocks; ++index) {
    file.read(memory, block_bytes, index * block_bytes);
  }
  measured.read_bytes_per_second = rate(start);
  measured.direct = file.direct();
  return measured;
}

void DiskFile::truncate(uint64_t nbytes) {
  if (::ftruncate(fd_, static_cast<off_t>(nbytes)) != 0) {
    fail("truncating to", static_cast<size_t>(nbytes), 0, errno);
  }
}

} // namespace gcoffload
