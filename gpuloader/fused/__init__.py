"""The one gather-and-augment pass over a store: CPU (numpy + numba loops) and CUDA (fused.cu)."""
