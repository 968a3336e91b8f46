// Batched memcpy between host addresses, and the split of a segment list over a few threads
// that it shares with the CMA copies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

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
// own. Returns once every share is done, then rethrows the exception of the first share that
// failed, if any.
void for_each_share(const int64_t* lengths, size_t n, int max_threads,
                    const std::function<void(Cursor from, Cursor to)>& work);

// Copies lengths[i] bytes from src[i] to dst[i] for i < n. Lengths must be >= 0 and the
// addresses valid; the caller (registry checks) guarantees both.
void copy_segments(const int64_t* src, const int64_t* dst, const int64_t* lengths, size_t n,
                   int max_threads);

}  // namespace llm_datadist_torch
