"""What the GGUF and quantised-kernel tests share about ggml block layouts."""

from __future__ import annotations

from moeflow.weights.ggml_quants import GGMLType

# byte offsets of the fp16 scale fields in one block, per type
GGUF_F16_FIELDS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
