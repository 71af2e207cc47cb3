// Shared by the CPU kernels' Python modules (csrc/attention_cpu/, csrc/gemm_cpu/, csrc/layer_cpu/): their
// `registrations()`, the {FFI target name: handler capsule} dict that kernels_pallas/ffi_extension.py registers
// with XLA.
#pragma once

#include <Python.h>

#include <initializer_list>
#include <utility>

namespace jaxserve_cpu {

// A new dict {name: PyCapsule(handler)} of `handlers`, or nullptr with the Python error set.
inline PyObject* ffi_registrations(std::initializer_list<std::pair<const char*, void*>> handlers) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& [name, handler] : handlers) {
    PyObject* capsule = PyCapsule_New(handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(dict, name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return dict;
}

}  // namespace jaxserve_cpu
