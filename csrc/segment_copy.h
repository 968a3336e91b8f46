// Batched memcpy between host addresses, and the split of a segment list over a few threads
// that it shares with the CMA copies. Both take segments resolve_segments has checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "segments.h"

namespace llm_datadist_torch {

// Each extra thread must get at least this many bytes. Starting and joining a thread costs
// ~20 us idle and far more when the other cores are busy; on the 2-vCPU project box a second
// thread lost below ~4 MiB in total and won from ~8 MiB with 16 KiB segments.
constexpr int64_t kMinBytesPerThread = 4 << 20;

// Batches of at least this many bytes are copied with non-temporal stores where the CPU has
// AVX2: about one last-level cache (32 MiB on the project box). A batch that large pushes itself
// out of the cache anyway, so regular stores only add read-for-ownership traffic; a smaller one
// stays cached for whoever reads it next.
constexpr int64_t kStreamMinBytes = 32 << 20;

// A position in the flattened byte stream of all segments: byte `offset` of segment `seg`.
struct Cursor {
  size_t seg;
  int64_t offset;
};

// Splits the n segments into shares of nearly equal bytes, at most `max_threads` of them and
// none under kMinBytesPerThread (a segment larger than a share is split too), and runs
// work(from, to) for each: the first share on the calling thread, the others on threads of their
// own. `total` is the sum of the lengths. Returns once every share is done, then rethrows the
// exception of the first share that failed, if any.
void for_each_share(const Segment* segments, size_t n, int64_t total, int max_threads,
                    const std::function<void(Cursor from, Cursor to)>& work);

// Copies segments[i].length bytes from addr[0] (source) to addr[1] (destination) for i < n, in
// the order given; `total` is the sum of the lengths. The segments come from resolve_segments,
// which proved every range inside its region.
void copy_segments(const Segment* segments, size_t n, int64_t total, int max_threads);

}  // namespace llm_datadist_torch
