// Snapshot of this process's readable+writable mappings, from /proc/self/maps.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace llm_datadist_torch {

class ProcessMaps {
 public:
  // Reads /proc/self/maps once; callers checking many ranges reuse one snapshot.
  static ProcessMaps read_self();

  // True iff [addr, addr + nbytes) is covered by rw mappings (adjacent ones may chain).
  bool covers_rw(uint64_t addr, uint64_t nbytes) const;

 private:
  // Disjoint [start, end) intervals, sorted, adjacent rw mappings merged.
  std::vector<std::pair<uint64_t, uint64_t>> rw_;
};

// One-off check; empty or overflowing ranges are never mapped.
bool is_mapped_rw(uint64_t addr, uint64_t nbytes);

}  // namespace llm_datadist_torch
