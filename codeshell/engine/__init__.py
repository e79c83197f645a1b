"""The generation engine: KV cache, sampling, scheduling and the step loop.

It owns the KV cache and samples; the model only computes. Nothing here knows of HTTP: the
engine's surface is submit a request, step (stream its outputs), abort it.
"""

from .engine import Engine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
