"""Tensor, expert and data parallelism: process groups and ranks (parallel_state.py), the
collectives the parallel layers call (comm.py), the typed step messages rank 0 sends the other
ranks (messages.py) and expert placement (eplb.py). Leaf package: torch.distributed only; the
processes themselves are started by engine/executor.py."""
