"""Admission and batching: each step, running sequences first (decodes and unfinished prefill
chunks), then waiting ones, under a per-step token budget (chunked prefill). When blocks run
out, the newest running sequence is preempted and later recomputed from its tokens.

With the overlap schedule a request may have a pending token (sampled on the device, not yet
read by the host): it counts in `num_tokens`, so its decode row is scheduled all the same."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeflow.engine.block_manager import BlockManager
from moeflow.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledBatch:
    reqs: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.reqs)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.reached_max_tokens:
                i += 1  # its last token is on the way (overlap schedule): nothing left to compute
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate_slots(req, n):
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.reqs.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break
        # Admit waiting requests only when nothing had to give way this step.
        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            if req.num_pending:  # preempted while its token was on the way: admit it next step
                break
            hits = bm.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_hit = len(hits) * bm.block_size
            n = min(req.num_tokens - req.num_computed_tokens - num_hit, budget)
            if not bm.allocate_slots(req, n, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens += num_hit
            req.num_cached_tokens = max(req.num_cached_tokens, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.reqs.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def admit_computed(self, req: Request) -> bool:
        """Admit a waiting request whose tokens are all computed elsewhere (a KV connector then
        writes their KV into the blocks allocated here): it joins the running ones, and its
        next row is a decode. False (nothing changed) when blocks or sequence slots run out."""
        if len(self.running) >= self.max_num_seqs:
            return False
        if not self.block_manager.allocate_slots(req, req.num_tokens - req.num_computed_tokens):
            return False
        req.num_computed_tokens = req.num_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
