// Exception types thrown by the plain C++ parts; bindings.cpp maps them to Python.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace llm_datadist_torch {

// A registration or address argument was rejected; surfaces as RegistryError (a ValueError).
class RegistryError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A system call failed; surfaces as OSError(errno, message) so Python picks the subclass
// (PermissionError, ProcessLookupError, ...) from the errno.
class SysError : public std::runtime_error {
 public:
  SysError(int err, const std::string& what) : std::runtime_error(what), err_(err) {}
  int err() const noexcept { return err_; }

 private:
  int err_;
};

// A segment reaches outside its region, names a region that does not exist, has a negative
// length or offset, or a region itself is malformed (negative size, wraps past 2^64). Thrown
// before any byte moves; surfaces as SegmentRangeError (a ValueError) carrying `side` ("source",
// "destination", "local", "remote", or "length"), `segment` (position in the batch as passed,
// -1 for a region-level fault) and `region` (row of that side's region table, -1 if none).
class SegmentRangeError : public std::invalid_argument {
 public:
  SegmentRangeError(const std::string& what, std::string side, long long segment,
                    long long region)
      : std::invalid_argument(what), side_(std::move(side)), segment_(segment), region_(region) {}
  const std::string& side() const noexcept { return side_; }
  long long segment() const noexcept { return segment_; }
  long long region() const noexcept { return region_; }

 private:
  std::string side_;
  long long segment_;
  long long region_;
};

// "0x..." for messages.
std::string hex(unsigned long long value);

}  // namespace llm_datadist_torch
