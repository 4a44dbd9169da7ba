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

PyObject* cpu_hugepages(PyObject*, PyObject*) {
  return PyBool_FromLong(lowrank_ext::cpu_hugepage_outputs() ? 1 : 0);
}

PyMethodDef methods[] = {
    {"_set_cuda_kernels", set_cuda_kernels, METH_O, "Select the CUDA kernels of linear."},
    {"_cuda_kernels", cuda_kernels, METH_NOARGS, "The CUDA kernels linear runs."},
    {"_tensorcore_kernels", tensorcore_kernels, METH_NOARGS,
     "Whether this build holds the tensor-core kernels."},
    {"_cpu_gemm", cpu_gemm, METH_NOARGS, "The CPU GEMM path: 'blas' or 'aten'."},
    {"_cpu_hugepages", cpu_hugepages, METH_NOARGS,
     "Whether large CPU outputs are advised for transparent huge pages."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lowrank_ext compiled ops", -1,
                               methods};
  return PyModule_Create(&module);
}
