#include "cma.h"

#include <sys/prctl.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

#include "errors.h"

namespace llm_datadist_torch {

namespace {

// Linux rejects more iovecs than this per call (UIO_MAXIOV).
constexpr size_t kMaxIov = 1024;

[[noreturn]] void throw_errno(int err, const std::string& call, int64_t pid) {
  throw SysError(err, call + " with pid " + std::to_string(pid) + " failed: " +
                          std::strerror(err));
}

}  // namespace

void cma_transfer(int64_t pid, const int64_t* local, const int64_t* remote,
                  const int64_t* lengths, size_t n, bool to_remote) {
  const char* call = to_remote ? "process_vm_writev" : "process_vm_readv";
  // pid_t is 32-bit: a larger value must not wrap onto some other process.
  if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) throw_errno(ESRCH, call, pid);
  iovec liov[kMaxIov];
  iovec riov[kMaxIov];
  // (seg, offset) is the first byte not yet copied. Each syscall takes up to kMaxIov segments
  // from there; a short count (large batches are capped by the kernel, or a fault midway) may
  // end inside a segment, and the next call resumes at that byte.
  size_t seg = 0;
  int64_t offset = 0;
  while (true) {
    while (seg < n && lengths[seg] == offset) {
      ++seg;
      offset = 0;
    }
    if (seg == n) return;
    size_t count = 0;
    for (size_t i = seg; i < n && count < kMaxIov; ++i) {
      const int64_t skip = i == seg ? offset : 0;
      if (lengths[i] == skip) continue;
      const size_t len = static_cast<size_t>(lengths[i] - skip);
      liov[count] = {reinterpret_cast<void*>(local[i] + skip), len};
      riov[count] = {reinterpret_cast<void*>(remote[i] + skip), len};
      ++count;
    }
    const ssize_t done = to_remote ? process_vm_writev(pid, liov, count, riov, count, 0)
                                   : process_vm_readv(pid, liov, count, riov, count, 0);
    if (done < 0) {
      if (errno == EINTR) continue;
      throw_errno(errno, call, pid);
    }
    // The kernel reports a fault before any byte moved as -1/EFAULT; a bare 0 would loop forever.
    if (done == 0) throw_errno(EFAULT, call, pid);
    int64_t left = done;
    while (left > 0) {
      const int64_t step = std::min<int64_t>(left, lengths[seg] - offset);
      offset += step;
      left -= step;
      if (offset == lengths[seg]) {
        ++seg;
        offset = 0;
      }
    }
  }
}

void allow_ptrace_from(int64_t pid) {
  if (prctl(PR_SET_PTRACER, static_cast<unsigned long>(pid), 0, 0, 0) != 0 && errno != EINVAL) {
    throw_errno(errno, "prctl(PR_SET_PTRACER)", pid);
  }
}

}  // namespace llm_datadist_torch
