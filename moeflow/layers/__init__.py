"""Building blocks the model families share. Kernels are chosen here, never in models/."""
