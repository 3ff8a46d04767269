// CPU kernels of the ssm scans. Same arguments and results as the Python backends in
// flashops/ops/ssm/pytorch.py (linear_scan_fwd/_bwd, selective_scan_fwd/_bwd), so the family's custom ops
// call whichever backend by name.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace flashops::ssm {

// a, b: [B, D, L] real, or [B, D, L, 2] (re, im) pairs; initial_state: [B, D] (or [B, D, 2]).
// Returns all states h, shaped and typed like b.
at::Tensor linear_scan_fwd(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,
                           bool reverse);

// Returns (da, db, d initial_state); the last is None when initial_state is None.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> linear_scan_bwd(
    const at::Tensor& dh, const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    bool reverse);

// Returns (out [B, D, L] in u's dtype, last state [B, D, N], saved states [B, D, N, ceil(L / spacing)]); the
// states are fp32 (fp64 for fp64 u), saved[..., k] is the state before step k * spacing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
    bool delta_softplus);

using OptionalTensor = std::optional<at::Tensor>;

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, d initial_state); an entry is None when its input is.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, OptionalTensor, OptionalTensor, OptionalTensor,
           OptionalTensor>
selective_scan_bwd(const at::Tensor& dout, const OptionalTensor& dlast, const at::Tensor& u, const at::Tensor& delta,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const OptionalTensor& D,
                   const OptionalTensor& z, const OptionalTensor& delta_bias, const OptionalTensor& initial_state,
                   const at::Tensor& saved, bool delta_softplus);

}  // namespace flashops::ssm
