"""What the engine calls for prefill/decode disaggregation: the KVConnector interface. The
implementation (its scheduler side and worker side, and the transports between instances) is
moeflow/disagg/; the engine only calls these methods, at four points (add_request, step,
_finish, has_unfinished), and runs exactly as before when it has no connector."""

from __future__ import annotations

from typing import Protocol

from moeflow.engine.request import Request
from moeflow.sampling_params import KVTransferParams


class KVConnector(Protocol):
    """Invariants: a request held by the connector (waiting for its KV) is in
    `LLMEngine.requests` but in neither scheduler queue; `poll` hands it to the scheduler (its
    prompt's KV written, or to be recomputed) or finishes it with an error, never both; every
    method runs on the engine thread."""

    def check_request(self, params: KVTransferParams) -> None:
        """Raise RequestError when this instance cannot play the request's part (a prefill
        instance asked to receive, an instance without a peer, a dead transport)."""
        ...

    def add_receiving(self, req: Request) -> None:
        """Hold `req` (do_remote_prefill) until its prompt's KV arrives or its wait runs out."""
        ...

    def poll(self, wait: bool) -> list[Request]:
        """Admit the held requests whose KV arrived and checks out (their first token appended
        through LLMEngine.accept_token), and settle the failed ones (recomputed, or finished
        with `req.error`). Returns the requests that gained a token or finished. `wait`: the
        engine has nothing else to run, so the call may block a few milliseconds for a
        message."""
        ...

    def request_finished(self, req: Request) -> None:
        """Called as a request ends, before its blocks are freed: a sender
        (do_remote_decode) that finished cleanly sends its prompt's KV; a held receiver is
        dropped."""
        ...

    def has_pending(self) -> bool:
        """Requests are held waiting for their KV."""
        ...
