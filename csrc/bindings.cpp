// Python bindings: argument conversion, tensor views and exception mapping. The only file that
// includes the torch headers, which keeps rebuilds of the other sources fast.
#include <torch/extension.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "address_map.h"
#include "cma.h"
#include "errors.h"
#include "prepared.h"
#include "registry.h"
#include "segment_copy.h"
#include "segments.h"

namespace py = pybind11;

namespace llm_datadist_torch {

namespace {

void check_index_tensor(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name,
                    " must be a 1-D contiguous tensor, got shape ", t.sizes());
}

void check_region_table(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == 2 && t.is_contiguous(), name,
                    " must be a contiguous [R, 2] tensor of (base address, size), got shape ",
                    t.sizes());
}

// The tensors of one side, checked for type and shape (their values are resolve_segments'),
// as pointers that stay valid while the caller's arguments hold the tensors.
SegmentSide side_arg(const char* name, const char* prefix, const at::Tensor& regions,
                     const at::Tensor& index, const at::Tensor& offsets,
                     const at::Tensor& lengths) {
  const std::string p(prefix);
  check_region_table(regions, p + "_regions");
  check_index_tensor(index, p + "_index");
  check_index_tensor(offsets, p + "_offsets");
  TORCH_CHECK_VALUE(index.numel() == lengths.numel() && offsets.numel() == lengths.numel(), p,
                    "_index, ", p, "_offsets and lengths must have the same length, got ",
                    index.numel(), ", ", offsets.numel(), " and ", lengths.numel());
  return {name, regions.data_ptr<int64_t>(), static_cast<size_t>(regions.size(0)),
          index.data_ptr<int64_t>(), offsets.data_ptr<int64_t>()};
}

// Both sides of a batch, as handed over from Python: (regions, index, offsets) per side.
struct Batch {
  SegmentSide a;
  SegmentSide b;
  const int64_t* lengths;
  size_t n;

  // The checked, resolved segments (GIL not needed); sets *total to their bytes.
  std::vector<Segment> resolve(int64_t* total) const {
    return resolve_segments(a, b, lengths, n, total);
  }
};

Batch batch_args(const char* a_name, const char* a_prefix, const at::Tensor& a_regions,
                 const at::Tensor& a_index, const at::Tensor& a_offsets, const char* b_name,
                 const char* b_prefix, const at::Tensor& b_regions, const at::Tensor& b_index,
                 const at::Tensor& b_offsets, const at::Tensor& lengths) {
  check_index_tensor(lengths, "lengths");
  return {side_arg(a_name, a_prefix, a_regions, a_index, a_offsets, lengths),
          side_arg(b_name, b_prefix, b_regions, b_index, b_offsets, lengths),
          lengths.data_ptr<int64_t>(), static_cast<size_t>(lengths.numel())};
}

Batch copy_args(const at::Tensor& src_regions, const at::Tensor& src_index,
                const at::Tensor& src_offsets, const at::Tensor& dst_regions,
                const at::Tensor& dst_index, const at::Tensor& dst_offsets,
                const at::Tensor& lengths) {
  return batch_args("source", "src", src_regions, src_index, src_offsets, "destination", "dst",
                    dst_regions, dst_index, dst_offsets, lengths);
}

Batch cma_args(const at::Tensor& local_regions, const at::Tensor& local_index,
               const at::Tensor& local_offsets, const at::Tensor& remote_regions,
               const at::Tensor& remote_index, const at::Tensor& remote_offsets,
               const at::Tensor& lengths) {
  return batch_args("local", "local", local_regions, local_index, local_offsets, "remote",
                    "remote", remote_regions, remote_index, remote_offsets, lengths);
}

at::Tensor tensor_from_address(uint64_t addr, const std::vector<int64_t>& shape,
                               at::ScalarType dtype, at::Device device) {
  if (addr == 0) throw RegistryError("tensor_from_address: address 0x0 is null");
  uint64_t nbytes = c10::elementSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) {
      throw RegistryError("tensor_from_address: negative dimension " + std::to_string(d) +
                          " for address " + hex(addr));
    }
    if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes)) {
      throw RegistryError("tensor_from_address: shape too large for address " + hex(addr));
    }
  }
  if (addr + nbytes < addr) {
    throw RegistryError("tensor_from_address: view at " + hex(addr) +
                        " wraps past the end of the address space");
  }
  // Naming the device (with its index) spares from_blob a pointer-attribute query, which is
  // what lets this work for any backend, NPU included.
  if (!device.is_cpu() && !device.has_index()) {
    device = c10::impl::getDeviceGuardImpl(device.type())->getDevice();
  }
  return at::for_blob(reinterpret_cast<void*>(addr), shape)
      .options(at::TensorOptions().dtype(dtype).device(device))
      .target_device(device)
      .make_tensor();
}

void check_max_threads(int64_t max_threads) {
  TORCH_CHECK_VALUE(max_threads >= 1 && max_threads <= 64, "max_threads must be in [1, 64], got ",
                    max_threads);
}

int64_t cma(int64_t pid, const Batch& batch, bool to_remote, int64_t max_threads) {
  check_max_threads(max_threads);
  py::gil_scoped_release no_gil;
  int64_t total = 0;
  std::vector<Segment> segments = batch.resolve(&total);
  // Ascending remote addresses read faster, like ascending sources in copy_segments.
  if (segments.size() > kSortMinSegments) sort_segments(segments, kRemote);
  cma_transfer(pid, segments.data(), segments.size(), total, to_remote,
               static_cast<int>(max_threads));
  return total;
}

// llm_datadist_torch._C.SegmentRangeError, created at import; lives as long as the process.
PyObject* segment_range_error = nullptr;

}  // namespace

}  // namespace llm_datadist_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace llm_datadist_torch;
  m.doc() = "Native helpers of llm_datadist_torch: registry, views, checked segment copies, CMA.";

  // Module-local translators: pybind11's global list is shared with torch._C.
  py::register_local_exception<RegistryError>(m, "RegistryError", PyExc_ValueError);
  segment_range_error = PyErr_NewExceptionWithDoc(
      "llm_datadist_torch._C.SegmentRangeError",
      "A segment outside its region (or a malformed region), refused before any byte moved.\n"
      "Attributes: side ('source', 'destination', 'local', 'remote' or 'length'), segment\n"
      "(its position as passed, -1 for a bad region) and region (row of that side's table,\n"
      "-1 if none).",
      PyExc_ValueError, nullptr);
  if (segment_range_error == nullptr) throw py::error_already_set();
  m.attr("SegmentRangeError") = py::handle(segment_range_error);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const SegmentRangeError& e) {
      py::object err = py::handle(segment_range_error)(e.what());
      err.attr("side") = e.side();
      err.attr("segment") = e.segment();
      err.attr("region") = e.region();
      PyErr_SetObject(segment_range_error, err.ptr());
    } catch (const SysError& e) {
      // OSError(errno, text) builds the errno's subclass (PermissionError, ProcessLookupError).
      py::object err = py::reinterpret_steal<py::object>(
          PyObject_CallFunction(PyExc_OSError, "is", e.err(), e.what()));
      if (err) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    }
  });

  py::class_<MemoryRegistry>(m, "MemoryRegistry")
      .def(py::init<>())
      .def(
          "set_limits",
          [](MemoryRegistry& r, int64_t max_addresses, int64_t max_device_bytes,
             int64_t max_host_bytes) {
            r.set_limits({max_addresses, max_device_bytes, max_host_bytes});
          },
          py::arg("max_addresses"), py::arg("max_device_bytes"), py::arg("max_host_bytes"))
      .def("limits",
           [](const MemoryRegistry& r) {
             const MemoryRegistry::Limits l = r.limits();
             return std::make_tuple(l.max_addresses, l.max_device_bytes, l.max_host_bytes);
           })
      .def("register", &MemoryRegistry::add, py::arg("cache_id"), py::arg("addrs"),
           py::arg("nbytes"), py::arg("is_device"), py::arg("check_host_mapping"))
      .def("unregister", &MemoryRegistry::remove, py::arg("cache_id"))
      .def("covers", &MemoryRegistry::covers, py::arg("addr"), py::arg("nbytes"))
      .def("address_count", &MemoryRegistry::address_count)
      .def("registered_bytes", &MemoryRegistry::registered_bytes, py::arg("is_device"))
      .def("cache_ids", &MemoryRegistry::cache_ids);

  m.def("is_mapped_rw", &is_mapped_rw, py::arg("addr"), py::arg("nbytes"));
  m.def("tensor_from_address", &tensor_from_address, py::arg("addr"), py::arg("shape"),
        py::arg("dtype"), py::arg("device"));
  // Every native copy takes segments as (region table, region index, offset) per side and
  // checks them all (resolve_segments) before a byte moves: SegmentRangeError otherwise.
  m.def(
      "copy_segments",
      [](const at::Tensor& src_regions, const at::Tensor& src_index, const at::Tensor& src_offsets,
         const at::Tensor& dst_regions, const at::Tensor& dst_index, const at::Tensor& dst_offsets,
         const at::Tensor& lengths, int64_t max_threads, bool sort) {
        check_max_threads(max_threads);
        const Batch batch = copy_args(src_regions, src_index, src_offsets, dst_regions, dst_index,
                                      dst_offsets, lengths);
        py::gil_scoped_release no_gil;
        int64_t total = 0;
        std::vector<Segment> segments = batch.resolve(&total);
        if (sort && segments.size() > kSortMinSegments) sort_segments(segments, 0);
        copy_segments(segments.data(), segments.size(), total, static_cast<int>(max_threads));
        return total;
      },
      py::arg("src_regions"), py::arg("src_index"), py::arg("src_offsets"),
      py::arg("dst_regions"), py::arg("dst_index"), py::arg("dst_offsets"), py::arg("lengths"),
      py::arg("max_threads") = 2, py::arg("sort") = true);
  m.def(
      "check_segments",
      [](const at::Tensor& src_regions, const at::Tensor& src_index, const at::Tensor& src_offsets,
         const at::Tensor& dst_regions, const at::Tensor& dst_index, const at::Tensor& dst_offsets,
         const at::Tensor& lengths) {
        const Batch batch = copy_args(src_regions, src_index, src_offsets, dst_regions, dst_index,
                                      dst_offsets, lengths);
        py::gil_scoped_release no_gil;
        int64_t total = 0;
        batch.resolve(&total);
        return total;
      },
      py::arg("src_regions"), py::arg("src_index"), py::arg("src_offsets"),
      py::arg("dst_regions"), py::arg("dst_index"), py::arg("dst_offsets"), py::arg("lengths"));
  m.def(
      "resolve_segments",
      [](const at::Tensor& local_regions, const at::Tensor& local_index,
         const at::Tensor& local_offsets, const at::Tensor& remote_regions,
         const at::Tensor& remote_index, const at::Tensor& remote_offsets,
         const at::Tensor& lengths) {
        const Batch batch = cma_args(local_regions, local_index, local_offsets, remote_regions,
                                     remote_index, remote_offsets, lengths);
        const int64_t n = static_cast<int64_t>(batch.n);
        at::Tensor local = at::empty({n}, at::kLong);
        at::Tensor remote = at::empty({n}, at::kLong);
        {
          py::gil_scoped_release no_gil;
          int64_t total = 0;
          const std::vector<Segment> segments = batch.resolve(&total);
          int64_t* l = local.data_ptr<int64_t>();
          int64_t* r = remote.data_ptr<int64_t>();
          for (int64_t i = 0; i < n; ++i) {
            l[i] = static_cast<int64_t>(segments[i].addr[kLocal]);
            r[i] = static_cast<int64_t>(segments[i].addr[kRemote]);
          }
        }
        return std::make_tuple(local, remote);
      },
      py::arg("local_regions"), py::arg("local_index"), py::arg("local_offsets"),
      py::arg("remote_regions"), py::arg("remote_index"), py::arg("remote_offsets"),
      py::arg("lengths"));
  for (const bool to_remote : {false, true}) {
    m.def(
        to_remote ? "cma_write" : "cma_read",
        [to_remote](int64_t pid, const at::Tensor& local_regions, const at::Tensor& local_index,
                    const at::Tensor& local_offsets, const at::Tensor& remote_regions,
                    const at::Tensor& remote_index, const at::Tensor& remote_offsets,
                    const at::Tensor& lengths, int64_t max_threads) {
          return cma(pid,
                     cma_args(local_regions, local_index, local_offsets, remote_regions,
                              remote_index, remote_offsets, lengths),
                     to_remote, max_threads);
        },
        py::arg("pid"), py::arg("local_regions"), py::arg("local_index"),
        py::arg("local_offsets"), py::arg("remote_regions"), py::arg("remote_index"),
        py::arg("remote_offsets"), py::arg("lengths"), py::arg("max_threads") = 2);
  }
  m.def("allow_ptrace_from", &allow_ptrace_from, py::arg("pid"));

  py::class_<PreparedCopy>(m, "PreparedCopy")
      .def(py::init([](int64_t data_pid, std::vector<int64_t> remote_regions,
                       std::vector<int64_t> local_regions, int64_t fence_pid, uint64_t fence_addr,
                       int64_t fence_value) {
             return PreparedCopy(data_pid, std::move(remote_regions), std::move(local_regions),
                                 FenceWord{fence_pid, fence_addr, fence_value});
           }),
           py::arg("data_pid"), py::arg("remote_regions"), py::arg("local_regions"),
           py::arg("fence_pid"), py::arg("fence_addr"), py::arg("fence_value"))
      .def(
          "run",
          [](const PreparedCopy& copy, const std::vector<int64_t>& remote_offsets,
             const std::vector<int64_t>& local_offsets, const std::vector<int64_t>& lengths,
             bool to_remote, int64_t max_threads, bool ordered) {
            check_max_threads(max_threads);
            py::gil_scoped_release no_gil;
            return copy.run(remote_offsets, local_offsets, lengths, to_remote,
                            static_cast<int>(max_threads), ordered);
          },
          py::arg("remote_offsets"), py::arg("local_offsets"), py::arg("lengths"),
          py::arg("to_remote"), py::arg("max_threads") = 2, py::arg("ordered") = false);
  m.attr("FENCE_MOVED_BEFORE") = kFenceMovedBefore;
  m.attr("FENCE_MOVED_AFTER") = kFenceMovedAfter;
}
