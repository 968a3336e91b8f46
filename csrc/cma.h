// Cross-memory attach: copy between this process and another one on the same host.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llm_datadist_torch {

// Copies lengths[i] bytes between local[i] (this process) and remote[i] (process `pid`):
// remote -> local when `to_remote` is false (process_vm_readv), else local -> remote, split
// over up to `max_threads` threads like copy_segments. Throws SysError(errno) naming the pid on
// failure, once every thread has stopped; other segments may already be copied.
void cma_transfer(int64_t pid, const int64_t* local, const int64_t* remote,
                  const int64_t* lengths, size_t n, bool to_remote, int max_threads);

// Lets `pid` ptrace (and so CMA-access) this process under Yama; no-op without Yama.
void allow_ptrace_from(int64_t pid);

}  // namespace llm_datadist_torch
