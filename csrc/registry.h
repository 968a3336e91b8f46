// Address ranges registered by one LLMDataDist instance, with the limits upstream enforces.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace llm_datadist_torch {

class MemoryRegistry {
 public:
  struct Limits {
    int64_t max_addresses = 240;
    int64_t max_device_bytes = 50'000'000'000;
    int64_t max_host_bytes = 20'000'000'000;
  };

  void set_limits(const Limits& limits);
  Limits limits() const;

  // Registers [a, a + nbytes) for every a in addrs under cache_id; all or nothing.
  // Throws RegistryError naming the first problem found.
  void add(int64_t cache_id, const std::vector<uint64_t>& addrs, int64_t nbytes, bool is_device,
           bool check_host_mapping);
  bool remove(int64_t cache_id);

  // True iff [addr, addr + nbytes) lies inside one registered range.
  bool covers(uint64_t addr, int64_t nbytes) const;

  int64_t address_count() const;
  int64_t registered_bytes(bool is_device) const;
  std::vector<int64_t> cache_ids() const;

 private:
  struct Registration {
    bool is_device;
    int64_t address_count;  // len(addrs), duplicates included: that is what the limit counts
    std::vector<uint64_t> starts;  // distinct range starts
    uint64_t nbytes;
  };
  struct Range {
    uint64_t end;
    int64_t cache_id;
  };

  // Throws if [start, end) intersects a range already registered.
  void check_no_overlap(int64_t cache_id, uint64_t start, uint64_t end) const;

  mutable std::mutex mu_;
  Limits limits_;
  std::map<int64_t, Registration> caches_;
  std::map<uint64_t, Range> ranges_;  // keyed by start; ranges are disjoint
  int64_t address_count_ = 0;
  uint64_t device_bytes_ = 0;
  uint64_t host_bytes_ = 0;
};

}  // namespace llm_datadist_torch
