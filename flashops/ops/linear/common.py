"""Constants shared by the linear-attention backends."""

# Log-gates below this are treated as this (exp(-30) ~ 1e-13, below fp32 resolution of the state): it keeps
# g = -inf from producing inf - inf = NaN in the chunk-local cumulative sums and bounds their magnitude
# (precision of gc_r - gc_c). Slopes are capped at -LOG_GATE_FLOOR likewise. Below the floor dg is 0.
LOG_GATE_FLOOR = -30.0
