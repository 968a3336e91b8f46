#include "address_map.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "errors.h"

namespace llm_datadist_torch {

ProcessMaps ProcessMaps::read_self() {
  ProcessMaps maps;
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (f == nullptr) {
    throw RegistryError("cannot read /proc/self/maps to validate host addresses");
  }
  // Only the leading "start-end perms" fields matter; the path may be long, so lines are
  // consumed with getline rather than a fixed buffer.
  char* line = nullptr;
  size_t cap = 0;
  while (getline(&line, &cap, f) != -1) {
    char* p = line;
    const uint64_t start = std::strtoull(p, &p, 16);
    if (*p != '-') continue;
    const uint64_t end = std::strtoull(p + 1, &p, 16);
    if (*p != ' ' || p[1] != 'r' || p[2] != 'w') continue;
    maps.rw_.emplace_back(start, end);
  }
  std::free(line);
  std::fclose(f);
  // Merge touching mappings so one lookup answers ranges that span several of them.
  std::sort(maps.rw_.begin(), maps.rw_.end());
  std::vector<std::pair<uint64_t, uint64_t>> merged;
  for (const auto& m : maps.rw_) {
    if (!merged.empty() && merged.back().second >= m.first) {
      merged.back().second = std::max(merged.back().second, m.second);
    } else {
      merged.push_back(m);
    }
  }
  maps.rw_ = std::move(merged);
  return maps;
}

bool ProcessMaps::covers_rw(uint64_t addr, uint64_t nbytes) const {
  if (nbytes == 0 || addr + nbytes < addr) return false;
  auto it = std::upper_bound(rw_.begin(), rw_.end(), std::make_pair(addr, UINT64_MAX));
  if (it == rw_.begin()) return false;
  --it;
  return addr + nbytes <= it->second;
}

bool is_mapped_rw(uint64_t addr, uint64_t nbytes) {
  return ProcessMaps::read_self().covers_rw(addr, nbytes);
}

}  // namespace llm_datadist_torch
