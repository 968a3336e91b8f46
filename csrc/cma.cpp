#include "cma.h"

#include <sys/prctl.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

#include "errors.h"
#include "segment_copy.h"

namespace llm_datadist_torch {

namespace {

// Linux rejects more iovecs than this per call (UIO_MAXIOV).
constexpr size_t kMaxIov = 1024;

const char* syscall_name(bool to_remote) {
  return to_remote ? "process_vm_writev" : "process_vm_readv";
}

[[noreturn]] void throw_errno(int err, const std::string& call, int64_t pid) {
  throw SysError(err, call + " with pid " + std::to_string(pid) + " failed: " +
                          std::strerror(err));
}

struct Batch {
  int64_t pid;
  const Segment* segments;
  size_t n;
  bool to_remote;
};

// Moves the bytes from `from` up to `to` (exclusive) in as few syscalls as the kernel allows.
void transfer_range(const Batch& b, Cursor from, Cursor to) {
  const auto in_range = [&](size_t i) { return i < b.n && i <= to.seg; };
  const auto end_of = [&](size_t i) { return i == to.seg ? to.offset : b.segments[i].length; };
  iovec liov[kMaxIov];
  iovec riov[kMaxIov];
  // (seg, offset) is the first byte not yet copied. Each syscall takes up to kMaxIov segments
  // from there; a short count (large batches are capped by the kernel, or a fault midway) may
  // end inside a segment, and the next call resumes at that byte.
  size_t seg = from.seg;
  int64_t offset = from.offset;
  while (true) {
    while (in_range(seg) && end_of(seg) == offset) {
      ++seg;
      offset = 0;
    }
    if (!in_range(seg)) return;
    size_t count = 0;
    for (size_t i = seg; in_range(i) && count < kMaxIov; ++i) {
      const int64_t skip = i == seg ? offset : 0;
      if (end_of(i) == skip) continue;
      const size_t len = static_cast<size_t>(end_of(i) - skip);
      liov[count] = {reinterpret_cast<void*>(b.segments[i].addr[kLocal] + skip), len};
      riov[count] = {reinterpret_cast<void*>(b.segments[i].addr[kRemote] + skip), len};
      ++count;
    }
    const ssize_t done = b.to_remote ? process_vm_writev(b.pid, liov, count, riov, count, 0)
                                     : process_vm_readv(b.pid, liov, count, riov, count, 0);
    if (done < 0) {
      if (errno == EINTR) continue;
      throw_errno(errno, syscall_name(b.to_remote), b.pid);
    }
    // The kernel reports a fault before any byte moved as -1/EFAULT; a bare 0 would loop forever.
    if (done == 0) throw_errno(EFAULT, syscall_name(b.to_remote), b.pid);
    int64_t left = done;
    while (left > 0) {
      const int64_t step = std::min<int64_t>(left, end_of(seg) - offset);
      offset += step;
      left -= step;
      if (offset == end_of(seg)) {
        ++seg;
        offset = 0;
      }
    }
  }
}

}  // namespace

void cma_transfer(int64_t pid, const Segment* segments, size_t n, int64_t total, bool to_remote,
                  int max_threads) {
  // pid_t is 32-bit: a larger value must not wrap onto some other process.
  if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) {
    throw_errno(ESRCH, syscall_name(to_remote), pid);
  }
  // Each share gets its own syscalls: the kernel copies on the calling thread's core.
  const Batch b{pid, segments, n, to_remote};
  for_each_share(segments, n, total, max_threads,
                 [&](Cursor from, Cursor to) { transfer_range(b, from, to); });
}

void allow_ptrace_from(int64_t pid) {
  if (prctl(PR_SET_PTRACER, static_cast<unsigned long>(pid), 0, 0, 0) != 0 && errno != EINVAL) {
    throw_errno(errno, "prctl(PR_SET_PTRACER)", pid);
  }
}

}  // namespace llm_datadist_torch
