// Exception types thrown by the plain C++ parts; bindings.cpp maps them to Python.
#pragma once

#include <stdexcept>
#include <string>

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

// "0x..." for messages.
std::string hex(unsigned long long value);

}  // namespace llm_datadist_torch
