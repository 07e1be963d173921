"""Runs one model over several processes, SPMD: rank 0 holds the engine (scheduler, sampler,
the server) and, each step, sends the flattened batch to the other ranks as a typed message
(distributed/messages.py); every rank runs the same forward over its shard of the model, and
rank 0 samples. The other ranks are started here: "mp" (one process per rank on this machine,
`python -c` of `main`), "ray" (Ray actors, local or on a cluster) or by torchrun
("external_launcher"). A monitor watches them: a rank that dies marks the engine dead.

NOTE: arguments reach a rank as JSON (EngineArgs' fields); Ray's own remote calls pickle their
arguments internally, so moeflow hands Ray only strings and ints."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from torch._C._distributed_c10d import Store, TCPStore

from moeflow import env
from moeflow.config import EngineArgs
from moeflow.context import ForwardBatch, forward_context
from moeflow.distributed import messages
from moeflow.distributed.parallel_state import (
    destroy_parallel,
    device_of_rank,
    init_parallel,
)
from moeflow.engine.kv_cache import allocate_kv_cache
from moeflow.errors import EngineDeadError
from moeflow.utils.dtype import parse_dtype

logger = logging.getLogger("moeflow")

# How long the ranks wait for each other to join the group (loading comes after).
JOIN_TIMEOUT_S = 300.0
# How long Ray may take to find the resources of the ranks' placement group.
PLACEMENT_TIMEOUT_S = 120.0
RAY_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray's label on every node that holds the node's id (bundle_label_selector pins rank 0's bundle).
_RAY_NODE_ID_LABEL = "ray.io/node-id"

_current: Executor | None = None

# What a rank started by "mp" runs (`python -c`, so that this module is imported only once).
_RANK_MAIN = "import sys; from moeflow.engine.executor import main; sys.exit(main(sys.argv[1:]))"


def current_executor() -> Executor | None:
    """The executor this process (rank 0) started; None in a single process."""
    return _current


def args_to_json(args: EngineArgs) -> str:
    return json.dumps(dataclasses.asdict(args))


def args_from_json(text: str) -> EngineArgs:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    if not isinstance(data, dict) or set(data) - known:
        raise ValueError(f"not EngineArgs: unknown fields {sorted(set(data) - known)[:3]}")
    return EngineArgs(**data)


class Executor:
    """Rank 0's side of the group: the ranks it started, their monitor, the step messages."""

    def __init__(self, args: EngineArgs) -> None:
        args.check_parallel()
        self.args = args
        self.world_size = args.world_size
        launched = env.torchrun_rank()
        backend = args.distributed_executor_backend or (
            "external_launcher" if launched is not None else "mp"
        )
        self.backend = backend
        self.dead_reason: str | None = None
        self._next_replica = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ray_refs: list[Any] = []
        self._placement: Any = None  # Ray's placement group of the ranks
        # The Ray node id of each rank (rank 0: this process's), once the Ray ranks started.
        self.rank_nodes: list[str] = []
        self._stopping = False
        device = resolved_device(args.device)
        if backend == "ray":
            self._ray_strategy = ray_placement_strategy()  # a bad value fails before any start
        store: Store | None = None
        if backend == "external_launcher":
            if launched is None or launched[1] != self.world_size:
                raise ValueError(
                    "external_launcher: start this program with torchrun --nproc-per-node "
                    f"{self.world_size} (tensor_parallel_size x data_parallel_size)"
                )
            rank = launched[0]
        else:
            rank = 0
            host = "127.0.0.1" if backend == "mp" else _ray_host()
            store = TCPStore(
                host,
                0,
                self.world_size,
                is_master=True,
                timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
                wait_for_workers=False,
            )
            if backend == "mp":
                self._start_processes(host, store.port)
            else:
                self._start_ray(host, store.port)
        self.device = device_of_rank(device, rank)
        init_parallel(
            rank,
            args.tensor_parallel_size,
            args.data_parallel_size,
            args.enable_expert_parallel,
            store,
            self.device,
        )
        self.rank = rank
        if backend != "external_launcher":
            threading.Thread(target=self._monitor, name="moeflow-ranks", daemon=True).start()

    # ---- rank 0 --------------------------------------------------------------------------------
    def start_engine(self, num_cache_blocks: int, block_size: int, dtype: str) -> None:
        """Tell the other ranks the KV cache rank 0 allocated, so theirs matches."""
        messages.send(
            {
                "kind": "init",
                "num_cache_blocks": num_cache_blocks,
                "block_size": block_size,
                "dtype": dtype,
            }
        )

    def send_step(self, fb: ForwardBatch, replica: int = 0, last: bool = True) -> None:
        self.check_alive()
        messages.send_step(fb, replica, last)

    @property
    def dp_size(self) -> int:
        return self.args.data_parallel_size

    def next_replica(self) -> int:
        """The data-parallel replica a new request runs on: round-robin."""
        replica = self._next_replica
        self._next_replica = (replica + 1) % self.dp_size
        return replica

    def receive_logits(self, replica: int, rows: int) -> torch.Tensor:
        """The logits [rows, V] of the step's piece that `replica` ran (from its first rank)."""
        self.check_alive()
        return messages.receive_logits(replica * self.args.tensor_parallel_size, rows)

    def check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"a parallel rank is gone: {self.dead_reason}")

    def shutdown(self) -> None:
        """Stop the other ranks and leave the group (a new engine may start after)."""
        global _current
        if self._stopping:
            return
        self._stopping = True
        if self.dead_reason is None and self.rank == 0:
            try:
                messages.send({"kind": "stop"})
            except RuntimeError as e:  # a rank died meanwhile
                logger.warning("stopping the ranks: %s", e)
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._ray_refs:
            import ray

            ray.wait(self._ray_refs, num_returns=len(self._ray_refs), timeout=10.0)
        if self._placement is not None:
            import ray.util

            ray.util.remove_placement_group(self._placement)
        destroy_parallel()
        if _current is self:
            _current = None

    # ---- the ranks' processes ------------------------------------------------------------------
    def _worker_command(self, rank: int, host: str, port: int) -> list[str]:
        return [
            "--rank",
            str(rank),
            "--host",
            host,
            "--port",
            str(port),
            "--args-json",
            args_to_json(self.args),
        ]

    def _start_processes(self, host: str, port: int) -> None:
        child_env = {**os.environ, "PYTHONPATH": _package_root()}
        for rank in range(1, self.world_size):
            cmd = [sys.executable, "-c", _RANK_MAIN]
            cmd += self._worker_command(rank, host, port)
            self._procs.append(subprocess.Popen(cmd, env=child_env))

    def _start_ray(self, host: str, port: int) -> None:
        """Ranks 1.. as Ray actors, each in its bundle of one placement group (vLLM's shape):
        a bundle per rank (one CPU, or one GPU), rank 0's pinned to this process's node (it
        reserves what this process computes with), placed by MOEFLOW_RAY_PLACEMENT (PACK by
        default; STRICT_SPREAD puts every rank on its own node)."""
        try:
            import ray
            import ray.util
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ValueError(
                "distributed_executor_backend='ray' needs Ray: pip install 'moeflow[distributed]'"
            ) from e
        strategy = self._ray_strategy
        if not ray.is_initialized():
            # a local cluster (no RAY_ADDRESS) gets a CPU per rank, no more; "local": a new one
            # even where `ray start` left a cluster (ray.init(None) would join it)
            ray.init(
                address=env.RAY_ADDRESS or "local",
                num_cpus=None if env.RAY_ADDRESS else self.world_size,
                runtime_env={"env_vars": {"PYTHONPATH": _package_root()}},
                include_dashboard=False,
                log_to_driver=True,
            )
        gpus = 1 if resolved_device(self.args.device).startswith("cuda") else 0
        bundle = {"GPU": 1.0} if gpus else {"CPU": 1.0}
        here = ray.get_runtime_context().get_node_id()
        selectors = [{_RAY_NODE_ID_LABEL: here}] + [{}] * (self.world_size - 1)
        placement = ray.util.placement_group(
            [bundle] * self.world_size, strategy=strategy, bundle_label_selector=selectors
        )
        ready, _ = ray.wait([placement.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(placement)
            raise ValueError(
                f"Ray could not place {self.world_size} ranks ({bundle} each, {strategy}, rank "
                f"0's on this node) within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster holds "
                f"{ray.cluster_resources()} on {len(ray.nodes())} nodes"
            )
        placed = ray.util.placement_group_table(placement)["bundles_to_node_id"]
        if placed[0] != here:  # a Ray that ignores bundle label selectors (before 2.50)
            ray.util.remove_placement_group(placement)
            raise ValueError(
                f"Ray placed rank 0's bundle on node {placed[0]}, not on this process's node "
                f"{here}: moeflow's Ray backend needs ray>=2.50"
            )
        self._placement = placement
        actor: Any = ray.remote(num_cpus=1 if gpus == 0 else 0, num_gpus=gpus)(RayRank)
        nodes = []
        for rank in range(1, self.world_size):
            where = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)
            handle = actor.options(scheduling_strategy=where).remote()
            nodes.append(handle.node_id.remote())  # an actor runs its calls in order: first
            self._ray_refs.append(handle.run.remote(self._worker_command(rank, host, port)))
        self.rank_nodes = [here, *ray.get(nodes, timeout=JOIN_TIMEOUT_S)]
        logger.info("Ray ranks' nodes (%s): %s", strategy, self.rank_nodes)

    def _monitor(self) -> None:
        """Poll the ranks; the first that ends before shutdown marks the engine dead."""
        while not self._stopping and self.dead_reason is None:
            reason = None
            for rank, proc in enumerate(self._procs, start=1):
                code = proc.poll()
                if code is not None:
                    reason = f"rank {rank} exited with code {code}"
            if self._ray_refs:
                import ray

                done, _ = ray.wait(self._ray_refs, timeout=0)
                if done:
                    try:
                        code = ray.get(done[0])
                        reason = f"a Ray rank returned {code}"
                    except Exception as e:  # noqa: BLE001 - the actor died: any error is the reason
                        reason = f"a Ray rank died: {type(e).__name__}: {str(e)[:200]}"
            if reason is not None and not self._stopping:
                self._die(reason)
                return
            time.sleep(0.1)

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        logger.error("parallel group is dead: %s", reason)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()


def ray_placement_strategy() -> str:
    """MOEFLOW_RAY_PLACEMENT, checked: the Ray placement group's strategy."""
    strategy = env.MOEFLOW_RAY_PLACEMENT.upper()
    if strategy not in RAY_PLACEMENT_STRATEGIES:
        raise ValueError(
            f"MOEFLOW_RAY_PLACEMENT must be one of {', '.join(RAY_PLACEMENT_STRATEGIES)}, "
            f"got {env.MOEFLOW_RAY_PLACEMENT!r}"
        )
    return strategy


def start_executor(args: EngineArgs) -> Executor:
    """Join (rank 0: form) the group of `args`; the ranks' processes start here."""
    global _current
    assert _current is None, "one parallel engine per process: shut the other down first"
    _current = Executor(args)
    atexit.register(_current.shutdown)  # the other ranks stop with this program
    return _current


class RayRank:
    """A Ray actor that runs one rank (`run` returns when rank 0 stops the group)."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, argv: list[str]) -> int:
        return main(argv, watch_parent=False)  # Ray ends its actors with their driver


# ---- the other ranks ---------------------------------------------------------------------------
def run_rank(rank: int, args: EngineArgs, store: Store | None) -> None:
    """One rank other than 0: load this rank's shard, allocate the KV cache rank 0 describes,
    then run every step rank 0 sends until it says stop. With data parallelism a step comes in
    pieces, one per replica: the rank runs its replica's piece once the last has come, and a
    replica's first rank sends the piece's logits to rank 0."""
    from moeflow.engine.factory import load  # the factory imports this module

    device = device_of_rank(resolved_device(args.device), rank)
    init_parallel(
        rank,
        args.tensor_parallel_size,
        args.data_parallel_size,
        args.enable_expert_parallel,
        store,
        device,
    )
    loaded = load(dataclasses.replace(args, device=device))
    model = loaded.model
    header = messages.receive()
    if header["kind"] != "init":
        raise ValueError(f"rank {rank}: expected the init message, got {header['kind']!r}")
    dev = torch.device(device)
    allocate_kv_cache(
        model, header["num_cache_blocks"], header["block_size"], parse_dtype(header["dtype"]), dev
    )
    tp_rank, dp_rank = rank % args.tensor_parallel_size, rank // args.tensor_parallel_size
    mine: ForwardBatch | None = None
    with torch.inference_mode():
        while True:
            header = messages.receive()
            if header["kind"] == "stop":
                break
            fb = messages.receive_step(header, dev)  # every piece is received, mine or not
            if header["replica"] == dp_rank:
                mine = fb
            if not header["last"] or mine is None:
                continue
            fb, mine = mine, None
            with forward_context(fb):
                hidden = model(fb.input_ids, fb.positions)  # [T, E]
            if fb.logits_indices.numel():
                logits = model.compute_logits(hidden, fb.logits_indices)  # [S, V] (gathered)
                if dp_rank > 0 and tp_rank == 0:
                    messages.send_logits(logits)
    destroy_parallel()


def main(argv: list[str] | None = None, watch_parent: bool = True) -> int:
    """A rank other than 0: `--rank R --host H --port P --args-json JSON`."""
    parser = argparse.ArgumentParser(prog="moeflow.engine.executor")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--args-json", required=True)
    ns = parser.parse_args(argv)
    args = args_from_json(ns.args_json)
    if watch_parent:
        _exit_with_parent()
    store = TCPStore(
        ns.host,
        ns.port,
        args.world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
    )
    run_rank(ns.rank, args, store)
    return 0


def resolved_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _package_root() -> str:
    """The folder holding this moeflow package, so that the ranks run the same code."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ray_host() -> str:
    import ray.util

    return ray.util.get_node_ip_address() if env.RAY_ADDRESS else "127.0.0.1"


def _exit_with_parent() -> None:
    """A rank started by "mp" leaves when rank 0 is gone, even killed (no orphan waits)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="moeflow-parent", daemon=True).start()
