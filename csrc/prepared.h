// A transfer prepared once and run many times: fixed pairs of (remote region, local region),
// the same list of segments applied to every pair, guarded by the owner's fence word. What a
// link builds when it first learns a remote cache, so that a call costs one native call
// whatever the number of tensors (NIXL's prepared descriptor lists play the same part).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llm_datadist_torch {

// Where a fence word is read: in this process (pid 0: the owner's table mapped here, or this
// process's own) or in process `pid` (CMA). `value` is what the owner said it holds. Address 0:
// no fence (copies between caches of this process, which pins them itself).
struct FenceWord {
  int64_t pid;
  uint64_t addr;
  int64_t value;
};

// run() results other than a byte count: the fence word moved (the cache went away or was
// rebound), before any byte moved or after the bytes moved (which must then not be used).
constexpr int64_t kFenceMovedBefore = -1;
constexpr int64_t kFenceMovedAfter = -2;

class PreparedCopy {
 public:
  // `remote_regions` and `local_regions`: one (base, size) row per pair, flattened. Remote bases
  // are addresses in process `data_pid` (CMA), or in this process when it is 0 (a mapping of the
  // owner's file, or the owner is this process).
  PreparedCopy(int64_t data_pid, std::vector<int64_t> remote_regions,
               std::vector<int64_t> local_regions, FenceWord fence);

  // For every pair p and segment j: lengths[j] bytes between remote region p at
  // remote_offsets[j] and local region p at local_offsets[j], remote -> local unless
  // `to_remote`. Every segment is checked against its regions first (resolve_segments:
  // SegmentRangeError, nothing moved). The fence word is read before and after the bytes
  // (a seqlock); returns the bytes moved, or kFenceMovedBefore / kFenceMovedAfter. `ordered`:
  // one thread, segments in order pair by pair (a segment may read what an earlier one wrote);
  // otherwise sorted by address and spread over `max_threads` threads.
  int64_t run(const std::vector<int64_t>& remote_offsets, const std::vector<int64_t>& local_offsets,
              const std::vector<int64_t>& lengths, bool to_remote, int max_threads,
              bool ordered) const;

  size_t pairs() const { return remote_regions_.size() / 2; }

 private:
  int64_t read_fence() const;

  int64_t data_pid_;
  std::vector<int64_t> remote_regions_;
  std::vector<int64_t> local_regions_;
  FenceWord fence_;
};

}  // namespace llm_datadist_torch
