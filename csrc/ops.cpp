// Schemas of the innsteer ops. Implementations: csrc/cpu/ops_cpu.cpp (CPU) and
// csrc/cuda/ops_cuda.cpp (CUDA, built only against a CUDA torch). Fake kernels and autograd
// are registered from Python (innsteer_ext/_registration.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import innsteer_ext._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define INNSTEER_FLOW_ARGS \
  "Tensor mean, Tensor scale, Tensor[] cond_idx, Tensor[] trans_idx, Tensor[] w1, Tensor[] b1, " \
  "Tensor[] w2, Tensor[] b2, float clamp"

TORCH_LIBRARY(innsteer, m) {
  m.def("coupling_forward(Tensor x, " INNSTEER_FLOW_ARGS ") -> (Tensor, Tensor)");
  m.def("coupling_inverse(Tensor z, " INNSTEER_FLOW_ARGS ") -> Tensor");
  m.def("steer(Tensor hidden, Tensor? residual, Tensor direction, float alpha, " INNSTEER_FLOW_ARGS
        ") -> Tensor");
  m.def("steer_(Tensor(a!) hidden, Tensor? residual, Tensor direction, float alpha, " INNSTEER_FLOW_ARGS
        ") -> ()");
}
