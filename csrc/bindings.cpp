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
#include "registry.h"
#include "segment_copy.h"

namespace py = pybind11;

namespace llm_datadist_torch {

namespace {

struct SegmentArgs {
  const int64_t* a;
  const int64_t* b;
  const int64_t* lengths;
  size_t n;
};

void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name,
                    " must be a 1-D contiguous tensor, got shape ", t.sizes());
}

// Validates two address tensors and a lengths tensor of one length, lengths >= 0.
SegmentArgs segment_args(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                         const char* b_name, const at::Tensor& lengths) {
  check_index_tensor(a, a_name);
  check_index_tensor(b, b_name);
  check_index_tensor(lengths, "lengths");
  TORCH_CHECK_VALUE(a.numel() == b.numel() && a.numel() == lengths.numel(), a_name, ", ", b_name,
                    " and lengths must have the same length, got ", a.numel(), ", ", b.numel(),
                    " and ", lengths.numel());
  const int64_t* len = lengths.data_ptr<int64_t>();
  const size_t n = static_cast<size_t>(lengths.numel());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(len[i] >= 0, "lengths[", i, "] is negative: ", len[i]);
  }
  return {a.data_ptr<int64_t>(), b.data_ptr<int64_t>(), len, n};
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

void cma(int64_t pid, const at::Tensor& local, const at::Tensor& remote, const at::Tensor& lengths,
         bool to_remote, int64_t max_threads) {
  check_max_threads(max_threads);
  const SegmentArgs s = segment_args(local, "local_addrs", remote, "remote_addrs", lengths);
  py::gil_scoped_release no_gil;
  cma_transfer(pid, s.a, s.b, s.lengths, s.n, to_remote, static_cast<int>(max_threads));
}

}  // namespace

}  // namespace llm_datadist_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace llm_datadist_torch;
  m.doc() = "Native helpers of llm_datadist_torch: registry, views, segment copies, CMA.";

  // Module-local translators: pybind11's global list is shared with torch._C.
  py::register_local_exception<RegistryError>(m, "RegistryError", PyExc_ValueError);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
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
  m.def(
      "copy_segments",
      [](const at::Tensor& src, const at::Tensor& dst, const at::Tensor& lengths,
         int64_t max_threads) {
        check_max_threads(max_threads);
        const SegmentArgs s = segment_args(src, "src_addrs", dst, "dst_addrs", lengths);
        py::gil_scoped_release no_gil;
        copy_segments(s.a, s.b, s.lengths, s.n, static_cast<int>(max_threads));
      },
      py::arg("src_addrs"), py::arg("dst_addrs"), py::arg("lengths"), py::arg("max_threads") = 2);
  m.def(
      "cma_read",
      [](int64_t pid, const at::Tensor& local, const at::Tensor& remote, const at::Tensor& lengths,
         int64_t max_threads) { cma(pid, local, remote, lengths, false, max_threads); },
      py::arg("pid"), py::arg("local_addrs"), py::arg("remote_addrs"), py::arg("lengths"),
      py::arg("max_threads") = 2);
  m.def(
      "cma_write",
      [](int64_t pid, const at::Tensor& local, const at::Tensor& remote, const at::Tensor& lengths,
         int64_t max_threads) { cma(pid, local, remote, lengths, true, max_threads); },
      py::arg("pid"), py::arg("local_addrs"), py::arg("remote_addrs"), py::arg("lengths"),
      py::arg("max_threads") = 2);
  m.def("allow_ptrace_from", &allow_ptrace_from, py::arg("pid"));
}
