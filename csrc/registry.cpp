#include "registry.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "address_map.h"
#include "errors.h"

namespace llm_datadist_torch {

namespace {

std::string range_text(uint64_t start, uint64_t end) {
  return "[" + hex(start) + ", " + hex(end) + ")";
}

}  // namespace

void MemoryRegistry::set_limits(const Limits& limits) {
  if (limits.max_addresses < 0 || limits.max_device_bytes < 0 || limits.max_host_bytes < 0) {
    throw RegistryError("registry limits must be non-negative");
  }
  std::lock_guard<std::mutex> lock(mu_);
  limits_ = limits;
}

MemoryRegistry::Limits MemoryRegistry::limits() const {
  std::lock_guard<std::mutex> lock(mu_);
  return limits_;
}

void MemoryRegistry::add(int64_t cache_id, const std::vector<uint64_t>& addrs, int64_t nbytes,
                         bool is_device, bool check_host_mapping) {
  const std::string who = "cache_id " + std::to_string(cache_id);
  if (addrs.empty()) throw RegistryError(who + ": no addresses to register");
  if (nbytes <= 0) {
    throw RegistryError(who + ": size per address must be positive, got " + std::to_string(nbytes) +
                        " (first address " + hex(addrs[0]) + ")");
  }
  const uint64_t size = static_cast<uint64_t>(nbytes);
  for (uint64_t a : addrs) {
    if (a == 0) throw RegistryError(who + ": address 0x0 is null");
    if (a + size < a) {
      throw RegistryError(who + ": range at " + hex(a) + " of " + std::to_string(size) +
                          " bytes wraps past the end of the address space");
    }
  }

  // Identical ranges (several tensors sharing one buffer) count once; partial overlaps inside
  // one registration would make covers() ambiguous, so they are rejected like cross-cache ones.
  std::vector<uint64_t> starts(addrs);
  std::sort(starts.begin(), starts.end());
  starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
  for (size_t i = 1; i < starts.size(); ++i) {
    if (starts[i] < starts[i - 1] + size) {
      throw RegistryError(who + ": range " + range_text(starts[i], starts[i] + size) +
                          " overlaps " + range_text(starts[i - 1], starts[i - 1] + size) +
                          " of the same registration");
    }
  }

  // Reading /proc/self/maps needs no registry state, so it stays outside the lock.
  if (check_host_mapping) {
    const ProcessMaps maps = ProcessMaps::read_self();
    for (uint64_t a : starts) {
      if (!maps.covers_rw(a, size)) {
        throw RegistryError(who + ": range " + range_text(a, a + size) +
                            " is not mapped readable and writable in this process");
      }
    }
  }

  std::lock_guard<std::mutex> lock(mu_);
  if (caches_.count(cache_id) != 0) {
    throw RegistryError(who + " is already registered (first address " + hex(addrs[0]) + ")");
  }
  const int64_t n_addrs = static_cast<int64_t>(addrs.size());
  if (n_addrs > limits_.max_addresses - address_count_) {
    throw RegistryError(who + ": registering " + std::to_string(n_addrs) + " addresses (first " +
                        hex(addrs[0]) + ") on top of " + std::to_string(address_count_) +
                        " exceeds the limit of " + std::to_string(limits_.max_addresses));
  }
  const char* kind = is_device ? "device" : "host";
  const uint64_t cap = static_cast<uint64_t>(is_device ? limits_.max_device_bytes
                                                       : limits_.max_host_bytes);
  uint64_t& used = is_device ? device_bytes_ : host_bytes_;
  uint64_t new_bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(starts.size()), size, &new_bytes) ||
      used > cap || new_bytes > cap - used) {  // used > cap after set_limits lowered it
    throw RegistryError(who + ": registering " + std::to_string(starts.size()) + " x " +
                        std::to_string(size) + " bytes of " + kind + " memory (first address " +
                        hex(addrs[0]) + ") on top of " + std::to_string(used) +
                        " exceeds the limit of " + std::to_string(cap) + " bytes");
  }
  for (uint64_t a : starts) check_no_overlap(cache_id, a, a + size);

  for (uint64_t a : starts) ranges_.emplace(a, Range{a + size, cache_id});
  address_count_ += n_addrs;
  used += new_bytes;
  caches_.emplace(cache_id, Registration{is_device, n_addrs, std::move(starts), size});
}

void MemoryRegistry::check_no_overlap(int64_t cache_id, uint64_t start, uint64_t end) const {
  auto next = ranges_.lower_bound(start);
  auto hit = ranges_.end();
  if (next != ranges_.end() && next->first < end) {
    hit = next;
  } else if (next != ranges_.begin() && std::prev(next)->second.end > start) {
    hit = std::prev(next);
  }
  if (hit != ranges_.end()) {
    throw RegistryError("cache_id " + std::to_string(cache_id) + ": range " +
                        range_text(start, end) + " overlaps " +
                        range_text(hit->first, hit->second.end) + " registered by cache_id " +
                        std::to_string(hit->second.cache_id));
  }
}

bool MemoryRegistry::remove(int64_t cache_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = caches_.find(cache_id);
  if (it == caches_.end()) return false;
  const Registration& reg = it->second;
  for (uint64_t a : reg.starts) ranges_.erase(a);
  address_count_ -= reg.address_count;
  (reg.is_device ? device_bytes_ : host_bytes_) -= reg.starts.size() * reg.nbytes;
  caches_.erase(it);
  return true;
}

bool MemoryRegistry::covers(uint64_t addr, int64_t nbytes) const {
  if (nbytes < 0) return false;
  const uint64_t end = addr + static_cast<uint64_t>(nbytes);
  if (end < addr) return false;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return false;
  --it;
  return addr < it->second.end && end <= it->second.end;
}

int64_t MemoryRegistry::address_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return address_count_;
}

int64_t MemoryRegistry::registered_bytes(bool is_device) const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(is_device ? device_bytes_ : host_bytes_);
}

std::vector<int64_t> MemoryRegistry::cache_ids() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> ids;
  ids.reserve(caches_.size());
  for (const auto& entry : caches_) ids.push_back(entry.first);
  return ids;
}

}  // namespace llm_datadist_torch
