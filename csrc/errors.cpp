#include "errors.h"

#include <cstdio>

namespace llm_datadist_torch {

std::string hex(unsigned long long value) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", value);
  return buf;
}

}  // namespace llm_datadist_torch
