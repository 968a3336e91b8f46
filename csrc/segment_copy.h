// Batched memcpy between host addresses, optionally split over a few threads.
#pragma once

#include <cstddef>
#include <cstdint>

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

// Copies lengths[i] bytes from src[i] to dst[i] for i < n. Lengths must be >= 0 and the
// addresses valid; the caller (registry checks) guarantees both.
void copy_segments(const int64_t* src, const int64_t* dst, const int64_t* lengths, size_t n,
                   int max_threads);

}  // namespace llm_datadist_torch
