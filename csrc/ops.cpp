// Schemas of the innsteer ops, and the autograd side of the in-place steer_. The backend kernels
// are csrc/flow_ops.h, instantiated by csrc/cpu/ops_cpu.cpp (CPU) and csrc/cuda/ops_cuda.cpp
// (CUDA, built only against a CUDA torch). Fake kernels and the functional ops' autograd are
// registered from Python (innsteer_ext/_registration.py).
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "flow_types.h"

extern "C" {
// `import innsteer_ext._C` loads this library, which runs the registrations below. The module
// carries the flow constants every loader shares (csrc/flow_types.h).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const std::pair<const char*, double> constants[] = {
      {"MIN_CLAMP", innsteer::kMinClamp},
      {"MAX_CLAMP", innsteer::kMaxClamp},
      {"SHIFT_CLAMP_FACTOR", innsteer::kShiftClampFactor},
  };
  for (const auto& [name, value] : constants) {
    PyObject* number = PyFloat_FromDouble(value);
    if (number == nullptr || PyModule_AddObject(module, name, number) < 0) {
      Py_XDECREF(number);
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
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

namespace innsteer {
namespace {

using SteerInplace = void(at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, double,
                          const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                          at::TensorList, at::TensorList, at::TensorList, double);

const c10::TypedOperatorHandle<SteerInplace>& steer_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("innsteer::steer_", "").typed<SteerInplace>();
  return op;
}

void refuse_requires_grad(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(!(t.defined() && t.requires_grad()), "innsteer: steer_ overwrites hidden without recording "
              "gradients, but ", name, " requires grad; call it under torch.no_grad() or torch.inference_mode(), "
              "or use the out-of-place steer to differentiate");
}

// steer_ has no backward: under grad mode it refuses every argument that requires grad, whose
// gradient would otherwise come out silently wrong (or a leaf would be modified under autograd).
void steer_inplace_autograd(c10::DispatchKeySet keys, at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                            const at::Tensor& direction, double alpha, const at::Tensor& mean,
                            const at::Tensor& scale, at::TensorList cond_idx, at::TensorList trans_idx,
                            at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2,
                            double clamp) {
  if (at::GradMode::is_enabled()) {
    refuse_requires_grad(hidden, "hidden");
    if (residual.has_value()) refuse_requires_grad(*residual, "residual");
    refuse_requires_grad(direction, "direction");
    refuse_requires_grad(mean, "mean");
    refuse_requires_grad(scale, "scale");
    const std::pair<at::TensorList, const char*> lists[] = {{w1, "w1"}, {b1, "b1"}, {w2, "w2"}, {b2, "b2"}};
    for (const auto& [list, name] : lists) {
      for (size_t k = 0; k < list.size(); ++k) refuse_requires_grad(list[k], std::string(name) + "[" +
                                                                                 std::to_string(k) + "]");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  steer_inplace_op().redispatch(keys & c10::after_autograd_keyset, hidden, residual, direction, alpha, mean, scale,
                                cond_idx, trans_idx, w1, b1, w2, b2, clamp);
}

// Bumps hidden's version counter, like ATen's in-place ops, so autograd refuses to backpropagate
// through a saved copy of hidden that steer_ has since overwritten. Runs in inference mode too
// (for normal tensors), where the autograd kernel above does not.
void steer_inplace_ad_inplace_or_view(c10::DispatchKeySet keys, at::Tensor& hidden,
                                      const c10::optional<at::Tensor>& residual, const at::Tensor& direction,
                                      double alpha, const at::Tensor& mean, const at::Tensor& scale,
                                      at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1,
                                      at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    steer_inplace_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, hidden, residual, direction, alpha,
                                  mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  }
  hidden.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(innsteer, Autograd, m) { m.impl("steer_", &steer_inplace_autograd); }
TORCH_LIBRARY_IMPL(innsteer, ADInplaceOrView, m) { m.impl("steer_", &steer_inplace_ad_inplace_or_view); }

}  // namespace innsteer
