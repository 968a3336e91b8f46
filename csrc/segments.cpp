#include "segments.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

#include "errors.h"

namespace llm_datadist_torch {

namespace {

// The error paths stay out of line, so the per-segment loop is a few compares.
[[noreturn]] __attribute__((noinline, cold)) void bad_region(const SegmentSide& side, size_t r) {
  const int64_t base = side.regions[2 * r];
  const int64_t size = side.regions[2 * r + 1];
  const std::string where = std::string(side.name) + " region " + std::to_string(r) + ": ";
  if (size < 0) {
    throw SegmentRangeError(where + "negative size " + std::to_string(size), side.name, -1,
                            static_cast<long long>(r));
  }
  throw SegmentRangeError(where + std::to_string(size) + " bytes at " +
                              hex(static_cast<uint64_t>(base)) +
                              " reach past the end of the address space",
                          side.name, -1, static_cast<long long>(r));
}

[[noreturn]] __attribute__((noinline, cold)) void bad_segment(const SegmentSide& side, size_t i,
                                                              int64_t length) {
  const int64_t r = side.index[i];
  const std::string where = std::string(side.name) + " segment " + std::to_string(i) + ": ";
  if (r < 0 || static_cast<uint64_t>(r) >= side.region_count) {
    throw SegmentRangeError(where + "region index " + std::to_string(r) + " is not in [0, " +
                                std::to_string(side.region_count) + ")",
                            side.name, static_cast<long long>(i), -1);
  }
  throw SegmentRangeError(where + "offset " + std::to_string(side.offsets[i]) + " and length " +
                              std::to_string(length) + " do not fit in region " +
                              std::to_string(r) + " of " + std::to_string(side.regions[2 * r + 1]) +
                              " bytes",
                          side.name, static_cast<long long>(i), r);
}

[[noreturn]] __attribute__((noinline, cold)) void bad_length(size_t i, int64_t length) {
  const std::string where = "segment " + std::to_string(i) + ": ";
  throw SegmentRangeError(length < 0 ? where + "negative length " + std::to_string(length)
                                     : where + "the lengths add up to more than 2^63 - 1 bytes",
                          "length", static_cast<long long>(i), -1);
}

void check_regions(const SegmentSide& side) {
  for (size_t r = 0; r < side.region_count; ++r) {
    const uint64_t base = static_cast<uint64_t>(side.regions[2 * r]);
    const int64_t size = side.regions[2 * r + 1];
    // The end, base + size, must be an address itself: size <= UINT64_MAX - base.
    if (size < 0 || static_cast<uint64_t>(size) > UINT64_MAX - base) bad_region(side, r);
  }
}

// The address of segment i's first byte on `side`; throws unless all `length` bytes from there
// lie in its region. No sum is formed before it is known not to wrap: offset <= size, then
// length <= size - offset; base + offset then stays below base + size, which check_regions
// proved representable.
inline uint64_t locate(const SegmentSide& side, size_t i, uint64_t length) {
  const int64_t r = side.index[i];
  if (r < 0 || static_cast<uint64_t>(r) >= side.region_count) {
    bad_segment(side, i, static_cast<int64_t>(length));
  }
  const uint64_t size = static_cast<uint64_t>(side.regions[2 * r + 1]);
  const int64_t offset = side.offsets[i];
  if (offset < 0 || static_cast<uint64_t>(offset) > size ||
      length > size - static_cast<uint64_t>(offset)) {
    bad_segment(side, i, static_cast<int64_t>(length));
  }
  return static_cast<uint64_t>(side.regions[2 * r]) + static_cast<uint64_t>(offset);
}

constexpr int kDigitBits = 11;
constexpr size_t kBuckets = size_t{1} << kDigitBits;
// Below this, a comparison sort beats clearing and summing the radix histograms.
constexpr size_t kRadixMinSegments = 1024;

}  // namespace

std::vector<Segment> resolve_segments(const SegmentSide& a, const SegmentSide& b,
                                      const int64_t* lengths, size_t n, int64_t* total) {
  check_regions(a);
  check_regions(b);
  std::vector<Segment> out;
  out.reserve(n);
  int64_t sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t length = lengths[i];
    if (length < 0) bad_length(i, length);
    const uint64_t len = static_cast<uint64_t>(length);
    out.push_back(Segment{{locate(a, i, len), locate(b, i, len)}, length});
    if (__builtin_add_overflow(sum, length, &sum)) bad_length(i, length);
  }
  *total = sum;
  return out;
}

void sort_segments(std::vector<Segment>& segments, int side) {
  const size_t n = segments.size();
  if (n < 2) return;
  uint64_t any = 0;
  uint64_t all = ~uint64_t{0};
  bool ascending = true;
  uint64_t previous = segments[0].addr[side];
  for (const Segment& s : segments) {
    const uint64_t key = s.addr[side];
    any |= key;
    all &= key;
    ascending &= previous <= key;
    previous = key;
  }
  if (ascending) return;
  const auto by_key = [side](const Segment& x, const Segment& y) {
    return x.addr[side] < y.addr[side];
  };
  if (n < kRadixMinSegments) {
    std::sort(segments.begin(), segments.end(), by_key);
    return;
  }
  // LSD radix sort over the bits that differ between keys (not ascending: some do). Blocks of
  // one region differ in a few middle bits only, so this is typically two or three passes.
  const uint64_t varying = any & ~all;
  const int low = __builtin_ctzll(varying);
  const int high = 64 - __builtin_clzll(varying);
  std::unique_ptr<Segment[]> buffer(new Segment[n]);  // not zeroed: every slot is written
  Segment* from = segments.data();
  Segment* to = buffer.get();
  std::vector<size_t> start(kBuckets);
  for (int shift = low; shift < high; shift += kDigitBits) {
    if (((varying >> shift) & (kBuckets - 1)) == 0) continue;
    std::fill(start.begin(), start.end(), 0);
    const auto digit = [&](const Segment& s) { return (s.addr[side] >> shift) & (kBuckets - 1); };
    for (size_t i = 0; i < n; ++i) ++start[digit(from[i])];
    size_t sum = 0;
    for (size_t& s : start) sum += std::exchange(s, sum);
    for (size_t i = 0; i < n; ++i) to[start[digit(from[i])]++] = from[i];
    std::swap(from, to);
  }
  if (from != segments.data()) std::copy(from, from + n, segments.data());
}

}  // namespace llm_datadist_torch
