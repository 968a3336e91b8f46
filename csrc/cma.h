// Cross-memory attach: copy between this process and another one on the same host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "segments.h"

namespace llm_datadist_torch {

// Side of a resolved CMA segment: addr[kLocal] in this process, addr[kRemote] in the peer's.
constexpr int kLocal = 0;
constexpr int kRemote = 1;

// Copies segments[i].length bytes between addr[kLocal] (this process) and addr[kRemote] (process
// `pid`) for i < n: remote -> local when `to_remote` is false (process_vm_readv), else local ->
// remote, split over up to `max_threads` threads like copy_segments. The segments come from
// resolve_segments (the remote regions are the peer's (address, size); the kernel still refuses
// what is not mapped there). Throws SysError(errno) naming the pid on failure, once every thread
// has stopped; other segments may already be copied.
void cma_transfer(int64_t pid, const Segment* segments, size_t n, int64_t total, bool to_remote,
                  int max_threads);

// Lets `pid` ptrace (and so CMA-access) this process under Yama; no-op without Yama.
void allow_ptrace_from(int64_t pid);

}  // namespace llm_datadist_torch
