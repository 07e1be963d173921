"""The engine core: add_request / step / abort. Each step schedules a batch, runs the model,
samples, appends tokens, checks stop ids, eos and lengths, and frees finished requests' blocks.
It sees token ids only: text and stop strings are output_processor.py's. With the overlap
schedule the host reads a step's tokens after launching the next one (see step()). Each step's
time and energy are booked to its requests (engine/cost.py)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeflow.config import EngineConfig, ModelConfig
from moeflow.engine.block_manager import BlockManager
from moeflow.engine.cost import CostLedger, Share, find_meter
from moeflow.engine.kv_cache import plan_kv_cache
from moeflow.engine.kv_connector import KVConnector
from moeflow.engine.model_runner import ModelRunner, TokenCarry
from moeflow.engine.profile import StepProfile, device_timed, timed
from moeflow.engine.request import Request, RequestStatus
from moeflow.engine.sampler import (
    SampledBatch,
    Sampler,
    SamplingRow,
    TokenLogprobs,
    has_penalties,
    make_generator,
)
from moeflow.engine.scheduler import ScheduledBatch, Scheduler
from moeflow.engine.structured_output import StructuredOutputs
from moeflow.errors import RequestError
from moeflow.models.base import CausalLM, MoEStats
from moeflow.sampling_params import FinishReason, SamplingParams
from moeflow.tokenizer import Tokenizer
from moeflow.utils.dtype import parse_dtype

logger = logging.getLogger("moeflow")


@dataclass(slots=True)
class _InFlight:
    """A launched step's sampling rows, their ids still on the device (or on their way)."""

    reqs: list[Request]
    sampled: SampledBatch
    row_of: dict[str, int]  # request id -> row of `sampled`


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests
    num_computed_tokens: int = 0  # tokens run through the model (prefill, recompute, decode)
    num_generated_tokens: int = 0


class LLMEngine:
    """Built by engine/factory.py build_engine(). Construction allocates the KV cache, the sink
    block included, and captures the decode graphs on a GPU: a built engine is ready to step."""

    def __init__(
        self,
        config: EngineConfig,
        model: CausalLM,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = torch.device(config.device)
        # The cache the block manager's blocks index, and the sink block (EngineConfig.sink_block).
        self.kv_cache_bytes = plan_kv_cache(
            model,
            config.num_cache_blocks,
            config.block_size,
            parse_dtype(config.dtype),
            self.device,
        )
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, config.block_size, self.device)
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()
        self.sampler = Sampler()
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.model_config.eos_token_ids
        )
        self.structured = StructuredOutputs(
            tokenizer,
            model_config.vocab_size,
            list(dict.fromkeys([*tokenizer.eos_token_ids, *model_config.eos_token_ids])),
            pin_memory=self.device.type == "cuda",
        )
        # Computes structured output's token masks while the model runs (llguidance drops the
        # GIL); made on first use.
        self._mask_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = EngineStats()
        self._in_flight: _InFlight | None = None  # the launch whose ids the host has not read
        self.overlap_schedule = config.overlap_schedule  # may change between steps
        self.cost = CostLedger(find_meter(config.device))
        # Called with each request as it ends, whatever ended it (the server's metrics).
        self.finish_listeners: list[Callable[[Request], None]] = []
        # Prefill/decode disaggregation (moeflow/disagg attaches one): None runs colocated.
        self.kv_connector: KVConnector | None = None

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate and queue one request. Bad input raises RequestError and queues nothing."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if params.n != 1:
            raise RequestError(
                "one engine request generates once: run n > 1 as n requests (LLM.generate does)",
                param="n",
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        max_len = self.config.max_model_len
        if len(prompt_ids) >= max_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens, but the context holds {max_len} "
                f"(at least one must be left to generate)",
                param="prompt",
                code="context_length_exceeded",
            )
        if self.block_manager.blocks_needed(len(prompt_ids) + 1) > self.block_manager.num_blocks:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens, more than the whole KV cache holds "
                f"({self.block_manager.num_blocks * self.config.block_size} tokens)",
                param="prompt",
                code="context_length_exceeded",
            )
        room = max_len - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"max_tokens {params.max_tokens} exceeds what the context leaves: "
                f"{max_len} - {len(prompt_ids)} prompt tokens = {room}",
                param="max_tokens",
            )
        req = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=params.max_tokens if params.max_tokens is not None else room,
            arrival_time=time.monotonic(),
        )
        if params.kv_transfer is not None:
            if self.kv_connector is None:
                raise RequestError(
                    "kv_transfer_params need an instance started with --role prefill or decode",
                    param="kv_transfer_params",
                )
            self.kv_connector.check_request(params.kv_transfer)
        if params.structured_outputs is not None:
            req.grammar = self.structured.new_state(params.structured_outputs, req.prompt_ids)
        if not params.is_greedy:
            req.generator = make_generator(params.seed, self.device)
        self.requests[request_id] = req
        if params.kv_transfer is not None and params.kv_transfer.do_remote_prefill:
            assert self.kv_connector is not None  # checked above
            self.kv_connector.add_receiving(req)  # admitted by kv_connector.poll()
        else:
            self.scheduler.add(req)
        self.stats.num_prompt_tokens += len(prompt_ids)
        return req

    def abort(
        self,
        request_id: str,
        finish_reason: FinishReason = FinishReason.ABORT,
        stop_reason: str | None = None,
    ) -> bool:
        """Finish a request now; its blocks are freed. False if it had already ended. A client
        gone aborts; a stop string (found by the output processor, which sees the text) finishes
        with FinishReason.STOP and the string as stop_reason."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason, req.stop_reason = finish_reason, stop_reason
        self._finish(req)
        return True

    def check_health(self) -> None:
        """Raise EngineDeadError when a rank of a parallel group is gone (a no-op in one
        process); the async engine calls it while idle, so a dead group ends the server."""
        if self.runner.executor is not None:
            self.runner.executor.check_alive()

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_unfinished()
            or self._in_flight is not None
            or (self.kv_connector is not None and self.kv_connector.has_pending())
        )

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; returns the requests that gained a token or finished (finished ones are
        no longer tracked by the engine after this; `req.error` is set on those that failed).

        With the overlap schedule (`EngineConfig.overlap_schedule`), a step launches its batch
        and only then reads the ids sampled by the step before, so the host's work (scheduling,
        preparing, stop checks) runs while the device computes: a step returns the requests of
        the previous launch. A request that finishes has one wasted row in the launch after.
        A row with penalties or structured output needs every earlier token on the host when
        it samples: when one of its tokens is still on the way, the launch before is read
        between the forward and the sampling, while the device runs the forward (its grammar's
        mask is computed then).

        The step's time and energy go to the requests it scheduled (CostLedger); a step that
        scheduled nothing but read the launch before goes to that launch's requests.

        With a KV connector, requests whose prompt's KV arrived from a prefill instance are
        admitted first (their first token, sampled there, is among the returned updates)."""
        if self.kv_connector is None:
            return self._step()
        idle = not self.scheduler.has_unfinished() and self._in_flight is None
        received = self.kv_connector.poll(wait=idle)
        done = self._step()
        return received + [r for r in done if r not in received]

    def _step(self) -> list[Request]:
        self.cost.book_idle()
        with timed(self.profile, "schedule_s"):
            batch = self.scheduler.schedule()
        if not batch.reqs:
            waited = self._in_flight is not None
            done = self._idle_step()
            self.cost.book_step(None if waited else ())
            return done
        shares = self._shares(batch)
        done = self._overlap_step(batch) if self.overlap_schedule else self._normal_step(batch)
        self.cost.book_step(shares)
        return done

    def _shares(self, batch: ScheduledBatch) -> list[Share]:
        """Each request's part of the step: a decode row (one token past the prompt) samples
        output token k; anything else is prefill (a chunk, or a recompute after preemption).
        Stamps the requests scheduled for the first time."""
        now = time.monotonic()
        shares: list[Share] = []
        for req, n in zip(batch.reqs, batch.num_new_tokens, strict=True):
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            start, num_prompt = req.num_computed_tokens, len(req.prompt_ids)
            if n == 1 and start >= num_prompt:
                shares.append(Share(req.cost, 1, "decode", start + 1 - num_prompt))
            else:
                shares.append(Share(req.cost, n, "prefill"))
        return shares

    def _normal_step(self, batch: ScheduledBatch) -> list[Request]:
        """Launch the batch and read its ids before returning. A launch still in flight (from an
        overlapped step before) is read first, and the requests it finished leave the batch."""
        done: list[Request] = []
        prev = self._take_in_flight()
        if prev is not None:
            done = self._resolve(prev)
            batch = _without_finished(batch)
            if not batch.reqs:
                return done
        launched, _ = self._launch(batch, None)
        self._cache_full_blocks(batch)
        if launched is not None:
            done += self._resolve(launched)
        return done

    def _overlap_step(self, batch: ScheduledBatch) -> list[Request]:
        """Launch the batch (its pending input tokens come from the launch before, on the
        device), then read the launch before while the device computes; this launch's ids are
        read by the next step. When a row samples from host state that a token of the launch
        before still changes (its grammar's next mask, its penalties' counts), the launch
        before is read once the forward is launched, before the sampling."""
        prev = self._take_in_flight()
        read_prev = any(
            r.num_pending and (r.grammar is not None or has_penalties(r.params)) for r in batch.reqs
        )
        launched, done = self._launch(batch, prev, read_prev)
        if prev is not None and not read_prev:
            done = self._resolve(prev)
        self._cache_full_blocks(batch)
        self._in_flight = launched
        return done

    def _idle_step(self) -> list[Request]:
        """Nothing was scheduled: read the launch still in flight, or fail a request that can
        never fit."""
        prev = self._take_in_flight()
        if prev is not None:
            return self._resolve(prev)
        if self.scheduler.waiting and not self.scheduler.running:
            # Nothing runs and the head of the queue still does not fit: it never will.
            req = self.scheduler.waiting[0]
            req.finish_reason = FinishReason.ABORT
            req.error = (
                f"request {req.request_id} needs more KV blocks than the cache has "
                f"({self.block_manager.num_blocks} blocks of {self.config.block_size})"
            )
            self._finish(req)
            return [req]
        return []

    def _take_in_flight(self) -> _InFlight | None:
        launched, self._in_flight = self._in_flight, None
        return launched

    def _cache_full_blocks(self, batch: ScheduledBatch) -> None:
        for req in batch.reqs:
            if not req.is_finished:  # every computed token is known to the host by now
                self.block_manager.cache_full_blocks(req)

    def _launch(
        self, batch: ScheduledBatch, prev: _InFlight | None, read_prev: bool = False
    ) -> tuple[_InFlight | None, list[Request]]:
        """Run the model over `batch` and sample on the device; returns the sampled rows with
        their ids still on the way to the host (None when no row samples), and the requests
        reading `prev` updated. The masks are computed on a worker thread while the forward
        runs. With `read_prev`, `prev` is read (`_resolve`) between the forward and the
        sampling, and the masks computed after it: the grammars must have seen its tokens (on
        a GPU the forward runs meanwhile)."""
        profile = self.profile
        done: list[Request] = []
        with device_timed(profile, self.device):
            carry = TokenCarry(prev.sampled.token_ids, prev.row_of) if prev is not None else None
            reqs = [
                req
                for req, n in zip(batch.reqs, batch.num_new_tokens, strict=True)
                if req.num_computed_tokens + n == req.num_tokens
            ]
            mask = None if read_prev else self._start_masks(reqs)
            logits = self.runner.run(batch, carry, profile)
            self.stats.num_steps += 1
            self.stats.num_computed_tokens += batch.num_tokens
            for req, n in zip(batch.reqs, batch.num_new_tokens, strict=True):
                req.num_computed_tokens += n
            if read_prev and prev is not None:
                done = self._resolve(prev)
            if not reqs:
                return None, done
            with timed(profile, "sample_s"):
                if read_prev:  # a request `prev` finished samples a row nobody reads: no mask
                    states = [None if r.is_finished else r.grammar for r in reqs]
                    bitmask = self.structured.fill_bitmask(states)
                else:
                    bitmask = mask.result() if mask is not None else None
                rows = [
                    SamplingRow(r.params, r.prompt_ids, r.output_ids, r.generator) for r in reqs
                ]
                sampled = self.sampler.sample(logits, rows, bitmask)
                for req in reqs:
                    req.num_pending += 1
            return _InFlight(reqs, sampled, {r.request_id: i for i, r in enumerate(reqs)}), done

    def _start_masks(
        self, reqs: list[Request]
    ) -> concurrent.futures.Future[torch.Tensor | None] | None:
        """Start computing the structured-output masks of the rows about to be sampled, on a
        worker thread, so that they are ready when the forward is (None: no row constrained)."""
        if all(r.grammar is None for r in reqs):
            return None
        if self._mask_pool is None:
            self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, "moeflow-mask")
        states = [r.grammar for r in reqs]
        return self._mask_pool.submit(self.structured.fill_bitmask, states)

    def _resolve(self, launched: _InFlight) -> list[Request]:
        """Read a launch's sampled ids on the host: append them, check stop conditions, finish
        requests. Requests that ended meanwhile (aborted, or stopped by an earlier token) are
        skipped."""
        with timed(self.profile, "wait_s"):
            token_ids, logprobs = launched.sampled.to_host()
        done: list[Request] = []
        with timed(self.profile, "postprocess_s"):
            for req, token, lp in zip(launched.reqs, token_ids, logprobs, strict=True):
                req.num_pending -= 1
                if req.is_finished:
                    continue
                self.accept_token(req, token, lp)
                done.append(req)
        return done

    def accept_token(self, req: Request, token: int, lp: TokenLogprobs | None = None) -> None:
        """Append one sampled token to a running request, check its grammar and stop
        conditions, and finish it when they end it. Also how a KV connector hands over the
        first token a prefill instance sampled. A token the request's grammar rejects (which
        its mask should not have admitted) is not taken: the request stops before it."""
        if req.grammar is not None and not self.structured.advance(req.grammar, token):
            req.finish_reason = FinishReason.STOP
            self._finish(req)
            return
        req.output_ids.append(token)
        req.last_token_time = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = req.last_token_time
        if lp is not None:
            req.output_logprobs.append(lp)
        self.stats.num_generated_tokens += 1
        self._check_stop(req, token)
        if req.finish_reason is not None:
            self._finish(req)

    # ---- profiling ---------------------------------------------------------------------------
    # The phases of every step between start_profile and stop_profile (engine/profile.py).
    profile: StepProfile | None = None

    def start_profile(self) -> None:
        """Time the phases of every step from now on."""
        self.profile = StepProfile()

    def stop_profile(self) -> StepProfile:
        profile, self.profile = self.profile, None
        assert profile is not None, "start_profile was not called"
        return profile

    def _capture_graphs(self) -> None:
        """Capture the decode graphs; a model whose decode cannot be captured (a kernel that
        syncs with the host) runs eagerly, with a warning saying why."""
        c = self.config
        graphs = self.runner.make_graph_runner(c.max_num_seqs, c.max_model_len, c.sink_block)
        try:
            graphs.capture()
        except Exception as e:  # any capture failure means "run eagerly"
            logger.warning(
                "decode runs without CUDA graphs: capture failed (%s: %s)", type(e).__name__, e
            )
            self.runner.graphs = None
            torch.cuda.synchronize(self.device)

    def _check_stop(self, req: Request, token: int) -> None:
        """Stop ids, eos and lengths; stop strings are the output processor's (token ids only
        here)."""
        p = req.params
        if not p.ignore_eos and token in self.eos_ids or token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = FinishReason.STOP, token
        elif len(req.output_ids) >= req.max_tokens or (
            len(req.prompt_ids) + len(req.output_ids) >= self.config.max_model_len
        ):
            req.finish_reason = FinishReason.LENGTH

    def _finish(self, req: Request) -> None:
        if req.status is RequestStatus.FINISHED:
            return
        if self.kv_connector is not None and req.params.kv_transfer is not None:
            self.kv_connector.request_finished(req)  # before its blocks are freed
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        for listener in self.finish_listeners:
            listener(req)

    # ---- routing statistics (MoE) ----------------------------------------------------------------
    def moe_layers(self) -> list[MoEStats]:
        """The model's MoE layers, in model order (none for a dense model)."""
        return self.runner.model.moe_layers()

    def enable_routing_stats(self, enabled: bool = True) -> None:
        for m in self.moe_layers():
            m.enable_stats(enabled)
        # Captured graphs hold the layers as they were: count through the eager path.
        self.runner.graphs_paused = enabled

    def routing_stats(self) -> list[list[int]]:
        """Tokens routed to each expert since the last reset, one list per MoE layer."""
        return [m.tokens_per_expert() for m in self.moe_layers()]

    def experts_touched_per_step(self) -> list[float]:
        """Mean number of distinct experts a forward ran, since the last reset, per MoE layer
        (what a decode step reads of the experts' weights)."""
        return [m.experts_touched_per_forward() for m in self.moe_layers()]

    def reset_routing_stats(self) -> None:
        for m in self.moe_layers():
            m.reset_stats()

    def run_to_completion(self) -> None:
        """Step until every request has finished (offline use)."""
        start = time.perf_counter()
        while self.has_unfinished():
            self.step()
        logger.debug("drained in %.3f s", time.perf_counter() - start)


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    """`batch` less the requests that finished since it was scheduled (their blocks are free)."""
    keep = [i for i, r in enumerate(batch.reqs) if not r.is_finished]
    return ScheduledBatch([batch.reqs[i] for i in keep], [batch.num_new_tokens[i] for i in keep])
