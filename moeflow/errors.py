"""The errors a user can meet (docs/RELIABILITY.md). Each carries one clear message line;
the CLI prints it without a traceback."""

from __future__ import annotations


class MoeflowError(Exception):
    """Base of every error moeflow raises on purpose."""


class ModelFormatError(MoeflowError):
    """A checkpoint (GGUF, safetensors, config.json, tokenizer) is malformed or unsupported."""


class ModelNotFoundError(MoeflowError):
    """The model path does not exist or holds no loadable checkpoint."""


class UnsupportedArchitectureError(MoeflowError):
    """config.json / GGUF names an architecture that no family file registers."""


class InsufficientMemoryError(MoeflowError):
    """A model, its KV cache and working memory do not fit the memory available: found by the
    memory plan (loading/memory_plan.py) before any weight is read."""


class RequestError(MoeflowError):
    """One request is invalid (bad sampling parameter, prompt longer than the context...)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineDeadError(MoeflowError):
    """The engine loop died; its state is unknown and no further request can be served."""
