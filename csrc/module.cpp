// The Python module lowrank_ext._C. Importing it loads this library, whose static initializers
// register the ops with the dispatcher (torch.ops.lowrank_ext.*). Its functions are the
// process-wide settings that are no ops: lowrank_ext.set_cuda_kernels wraps them.
#include <Python.h>

#include <cstring>

#include "backend.h"

namespace {

PyObject* set_cuda_kernels(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name != nullptr && std::strcmp(name, "cublas") == 0) {
    lowrank_ext::set_cuda_kernels(lowrank_ext::CudaKernels::kCublas);
  } else if (name != nullptr && std::strcmp(name, "fused") == 0) {
    lowrank_ext::set_cuda_kernels(lowrank_ext::CudaKernels::kFused);
  } else if (name != nullptr && std::strcmp(name, "tensorcore") == 0) {
    if (!lowrank_ext::tensorcore_kernels_built()) {  // never a silent downgrade
      PyErr_Format(PyExc_RuntimeError,
                   "lowrank_ext.set_cuda_kernels('tensorcore'): not available: %s",
                   lowrank_ext::tensorcore_missing_reason());
      return nullptr;
    }
    lowrank_ext::set_cuda_kernels(lowrank_ext::CudaKernels::kTensorcore);
  } else {
    PyErr_SetString(PyExc_ValueError,
                    "_set_cuda_kernels: expected 'cublas', 'fused' or 'tensorcore'");
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cuda_kernels(PyObject*, PyObject*) {
  switch (lowrank_ext::cuda_kernels()) {
    case lowrank_ext::CudaKernels::kFused:
      return PyUnicode_FromString("fused");
    case lowrank_ext::CudaKernels::kTensorcore:
      return PyUnicode_FromString("tensorcore");
    default:
      return PyUnicode_FromString("cublas");
  }
}

PyObject* tensorcore_kernels(PyObject*, PyObject*) {
  return PyBool_FromLong(lowrank_ext::tensorcore_kernels_built() ? 1 : 0);
}

PyObject* cpu_gemm(PyObject*, PyObject*) {
  return PyUnicode_FromString(lowrank_ext::cpu_gemm_path());
}

PyObject* cpu_buffer_cache(PyObject*, PyObject*) {
  if (const char* error = lowrank_ext::cpu_buffer_cache_error()) {
    PyErr_SetString(PyExc_ValueError, error);
    return nullptr;
  }
  int64_t s[4];
  lowrank_ext::cpu_buffer_cache_stats(s);
  return Py_BuildValue("{s:L,s:L,s:L,s:L}", "cached_bytes", static_cast<long long>(s[0]),
                       "limit_bytes", static_cast<long long>(s[1]), "hits",
                       static_cast<long long>(s[2]), "misses", static_cast<long long>(s[3]));
}

PyObject* empty_cpu_buffer_cache(PyObject*, PyObject*) {
  lowrank_ext::empty_cpu_buffer_cache();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_cuda_kernels", set_cuda_kernels, METH_O, "Select the CUDA kernels of linear."},
    {"_cuda_kernels", cuda_kernels, METH_NOARGS, "The CUDA kernels linear runs."},
    {"_tensorcore_kernels", tensorcore_kernels, METH_NOARGS,
     "Whether this build holds the tensor-core kernels."},
    {"_cpu_gemm", cpu_gemm, METH_NOARGS, "The CPU GEMM path: 'blas' or 'aten'."},
    {"_cpu_buffer_cache", cpu_buffer_cache, METH_NOARGS,
     "The CPU kernels' cache of large output buffers: bytes, limit, hits, misses."},
    {"_empty_cpu_buffer_cache", empty_cpu_buffer_cache, METH_NOARGS,
     "Free every cached CPU output buffer."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lowrank_ext compiled ops", -1,
                               methods};
  return PyModule_Create(&module);
}
