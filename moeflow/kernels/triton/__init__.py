"""Triton fast paths, one module per op (attention, mla, fused_moe, elementwise). Nothing here is
imported by a CPU-only run: each `<op>()` dispatch point in moeflow/kernels imports its module
inside the function, after `use_triton` said yes."""
