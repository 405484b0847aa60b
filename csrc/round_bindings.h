// Binds the round executor into the extension module (csrc/round_bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace avatar_sched {
// context_error_type: the Python exception raised when the CUDA context is poisoned.
void bind_rounds(pybind11::module_& m, pybind11::handle context_error_type);
}  // namespace avatar_sched
