// The fused layers' translation unit (DecodeStack, MlaAttention, MoeLayer and their bindings):
// cpu_ops.cpp's second half, compiled beside the first in parallel (a first build on two cores
// takes the longer half's time, not the sum). cpu_ops.cpp says how the two are cut.
#define MOEFLOW_FUSED_TU
#include "cpu_ops.cpp"
