#include "segment_copy.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llm_datadist_torch {

namespace {

using CopyFn = void (*)(char* dst, const char* src, size_t n);

void plain_copy(char* dst, const char* src, size_t n) { std::memcpy(dst, src, n); }

#if defined(__x86_64__)
// memcpy with non-temporal stores: no read-for-ownership of the destination lines and no
// eviction of the cache, which glibc only does itself for single copies of several MiB. The
// destination is aligned to 32 bytes with a memcpy head; the tail is a memcpy too.
__attribute__((target("avx2"))) void stream_copy(char* dst, const char* src, size_t n) {
  const size_t head = std::min(n, static_cast<size_t>(-reinterpret_cast<uintptr_t>(dst) & 31));
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const size_t body = n & ~size_t{127};
  for (size_t i = 0; i < body; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  std::memcpy(dst + body, src + body, n - body);
}
#endif

// Streaming pays for batches that would not stay in the last-level cache anyway.
CopyFn copy_fn_for(int64_t total) {
#if defined(__x86_64__)
  if (total >= kStreamMinBytes && __builtin_cpu_supports("avx2")) return stream_copy;
#endif
  return plain_copy;
}

void copy_range(const Segment* s, size_t n, CopyFn copy, Cursor from, Cursor to) {
  for (size_t i = from.seg; i <= to.seg && i < n; ++i) {
    const int64_t begin = i == from.seg ? from.offset : 0;
    const int64_t end = i == to.seg ? to.offset : s[i].length;
    if (end > begin) {
      copy(reinterpret_cast<char*>(s[i].addr[1] + begin),
           reinterpret_cast<const char*>(s[i].addr[0] + begin), end - begin);
    }
  }
#if defined(__x86_64__)
  _mm_sfence();  // streaming stores are weakly ordered: drain them before the thread is joined
#endif
}

// Cut points splitting `total` bytes into `parts` nearly equal shares.
std::vector<Cursor> split(const Segment* s, size_t n, int64_t total, int parts) {
  std::vector<Cursor> cuts;
  cuts.reserve(parts + 1);
  cuts.push_back({0, 0});
  size_t seg = 0;
  int64_t seg_start = 0;  // bytes before segment `seg`
  for (int p = 1; p < parts; ++p) {
    const int64_t target = total / parts * p;
    while (seg < n && seg_start + s[seg].length <= target) seg_start += s[seg++].length;
    cuts.push_back({seg, target - seg_start});
  }
  cuts.push_back({n, 0});
  return cuts;
}

}  // namespace

void for_each_share(const Segment* segments, size_t n, int64_t total, int max_threads,
                    const std::function<void(Cursor from, Cursor to)>& work) {
  const int parts = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(max_threads, total / kMinBytesPerThread)));
  if (parts == 1) {
    work({0, 0}, {n, 0});
    return;
  }
  const std::vector<Cursor> cuts = split(segments, n, total, parts);
  // A share that throws must not leave the others running on memory the caller may release.
  std::vector<std::exception_ptr> errors(parts);
  const auto run = [&](int p) {
    try {
      work(cuts[p], cuts[p + 1]);
    } catch (...) {
      errors[p] = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(parts - 1);
  for (int p = 1; p < parts; ++p) {
    try {
      workers.emplace_back(run, p);
    } catch (const std::exception&) {
      run(p);  // no thread available: do that share here
    }
  }
  run(0);  // the calling thread takes the first share
  for (auto& w : workers) w.join();
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

void copy_segments(const Segment* segments, size_t n, int64_t total, int max_threads) {
  const CopyFn copy = copy_fn_for(total);
  for_each_share(segments, n, total, max_threads,
                 [&](Cursor from, Cursor to) { copy_range(segments, n, copy, from, to); });
}

}  // namespace llm_datadist_torch
