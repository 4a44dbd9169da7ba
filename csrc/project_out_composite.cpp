// lowrank_ext::project_out as a composite of project_out_forward: autograd, autocast, fake
// tensors and torch.compile all see project_out_forward, whose coefficients feed the backward.
#include "project_out.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

at::Tensor project_out_composite(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                 bool normalize) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::project_out_forward", "")
                            .typed<ProjectOutResult(const at::Tensor&, const at::Tensor&,
                                                    int64_t, bool)>();
  return std::get<0>(forward.call(Q, X, passes, normalize));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CompositeImplicitAutograd, m) {
  m.impl("project_out", TORCH_FN(project_out_composite));
}

}  // namespace lowrank_ext
