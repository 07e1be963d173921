"""Engine: request state, scheduling, KV cache, model runner and sampler."""
