#include "segment_copy.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

namespace llm_datadist_torch {

namespace {

// A position in the flattened byte stream of all segments.
struct Cursor {
  size_t seg;
  int64_t offset;
};

struct Segments {
  const int64_t* src;
  const int64_t* dst;
  const int64_t* lengths;
  size_t n;
};

void copy_range(const Segments& s, Cursor from, Cursor to) {
  for (size_t i = from.seg; i <= to.seg && i < s.n; ++i) {
    const int64_t begin = i == from.seg ? from.offset : 0;
    const int64_t end = i == to.seg ? to.offset : s.lengths[i];
    if (end > begin) {
      std::memcpy(reinterpret_cast<void*>(s.dst[i] + begin),
                  reinterpret_cast<const void*>(s.src[i] + begin), end - begin);
    }
  }
}

// Cut points splitting `total` bytes into `parts` nearly equal shares; a segment larger than a
// share is split between threads too.
std::vector<Cursor> split(const Segments& s, int64_t total, int parts) {
  std::vector<Cursor> cuts;
  cuts.reserve(parts + 1);
  cuts.push_back({0, 0});
  size_t seg = 0;
  int64_t seg_start = 0;  // bytes before segment `seg`
  for (int p = 1; p < parts; ++p) {
    const int64_t target = total / parts * p;
    while (seg < s.n && seg_start + s.lengths[seg] <= target) seg_start += s.lengths[seg++];
    cuts.push_back({seg, target - seg_start});
  }
  cuts.push_back({s.n, 0});
  return cuts;
}

}  // namespace

void copy_segments(const int64_t* src, const int64_t* dst, const int64_t* lengths, size_t n,
                   int max_threads) {
  const Segments s{src, dst, lengths, n};
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += lengths[i];
  const int parts = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(max_threads, total / kMinBytesPerThread)));
  if (parts == 1) {
    copy_range(s, {0, 0}, {n, 0});
    return;
  }
  const std::vector<Cursor> cuts = split(s, total, parts);
  std::vector<std::thread> workers;
  workers.reserve(parts - 1);
  for (int p = 1; p < parts; ++p) {
    try {
      workers.emplace_back(copy_range, std::cref(s), cuts[p], cuts[p + 1]);
    } catch (const std::exception&) {
      copy_range(s, cuts[p], cuts[p + 1]);  // no thread available: do that share here
    }
  }
  copy_range(s, cuts[0], cuts[1]);  // the calling thread takes the first share
  for (auto& w : workers) w.join();
}

}  // namespace llm_datadist_torch
