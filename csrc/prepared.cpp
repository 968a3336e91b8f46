#include "prepared.h"

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "cma.h"
#include "errors.h"
#include "segment_copy.h"
#include "segments.h"

namespace llm_datadist_torch {

PreparedCopy::PreparedCopy(int64_t data_pid, std::vector<int64_t> remote_regions,
                           std::vector<int64_t> local_regions, FenceWord fence)
    : data_pid_(data_pid),
      remote_regions_(std::move(remote_regions)),
      local_regions_(std::move(local_regions)),
      fence_(fence) {
  if (remote_regions_.size() % 2 != 0 || remote_regions_.size() != local_regions_.size()) {
    throw RegistryError("PreparedCopy: remote and local region tables must have the same number "
                        "of (base, size) rows");
  }
  if (fence_.addr % sizeof(int64_t) != 0) {
    throw RegistryError("PreparedCopy: fence word address " + hex(fence_.addr) +
                        " is not an aligned 8-byte word");
  }
}

int64_t PreparedCopy::read_fence() const {
  if (fence_.addr == 0) return fence_.value;  // no fence: copies inside this process
  if (fence_.pid == 0) {
    return __atomic_load_n(reinterpret_cast<const int64_t*>(fence_.addr), __ATOMIC_ACQUIRE);
  }
  int64_t value = 0;
  iovec local{&value, sizeof value};
  iovec remote{reinterpret_cast<void*>(fence_.addr), sizeof value};
  ssize_t done;
  do {
    done = process_vm_readv(static_cast<pid_t>(fence_.pid), &local, 1, &remote, 1, 0);
  } while (done < 0 && errno == EINTR);
  if (done != static_cast<ssize_t>(sizeof value)) {
    const int err = done < 0 ? errno : EFAULT;
    throw SysError(err, "process_vm_readv of the fence word with pid " +
                            std::to_string(fence_.pid) + " failed: " + std::strerror(err));
  }
  return value;
}

int64_t PreparedCopy::run(const std::vector<int64_t>& remote_offsets,
                          const std::vector<int64_t>& local_offsets,
                          const std::vector<int64_t>& lengths, bool to_remote,
                          int max_threads, bool ordered) const {
  const size_t n = lengths.size();
  if (remote_offsets.size() != n || local_offsets.size() != n) {
    throw RegistryError("PreparedCopy.run: remote_offsets, local_offsets and lengths differ in "
                        "length");
  }
  // Segment p * n + j is segment j of pair p: row p of both region tables.
  const size_t pairs = this->pairs();
  const size_t total_segments = pairs * n;
  std::vector<int64_t> index(total_segments), remote(total_segments), local(total_segments),
      length(total_segments);
  for (size_t p = 0; p < pairs; ++p) {
    std::fill_n(index.begin() + p * n, n, static_cast<int64_t>(p));
    std::copy(remote_offsets.begin(), remote_offsets.end(), remote.begin() + p * n);
    std::copy(local_offsets.begin(), local_offsets.end(), local.begin() + p * n);
    std::copy(lengths.begin(), lengths.end(), length.begin() + p * n);
  }
  const SegmentSide local_side{"local", local_regions_.data(), pairs, index.data(), local.data()};
  const SegmentSide remote_side{"remote", remote_regions_.data(), pairs, index.data(),
                                remote.data()};
  int64_t total = 0;
  std::vector<Segment> segments =
      resolve_segments(local_side, remote_side, length.data(), total_segments, &total);
  if (read_fence() != fence_.value) return kFenceMovedBefore;
  if (data_pid_ != 0) {
    if (total > 0) {
      if (!ordered && segments.size() > kSortMinSegments) sort_segments(segments, kRemote);
      cma_transfer(data_pid_, segments.data(), segments.size(), total, to_remote, max_threads);
    }
  } else if (total > 0) {
    // copy_segments reads addr[0] and writes addr[1]: local is side 0 here.
    if (!to_remote) {
      for (Segment& s : segments) std::swap(s.addr[0], s.addr[1]);
    }
    if (ordered) {
      copy_segments(segments.data(), segments.size(), total, 1);
    } else {
      if (segments.size() > kSortMinSegments) sort_segments(segments, 0);
      copy_segments(segments.data(), segments.size(), total, max_threads);
    }
  }
  // The copy's loads are done before the word is read again (seqlock reader).
  std::atomic_thread_fence(std::memory_order_acquire);
  if (read_fence() != fence_.value) return kFenceMovedAfter;
  return total;
}

}  // namespace llm_datadist_torch
