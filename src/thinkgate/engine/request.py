"""Per-request state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from thinkgate.engine.detokenizer import IncrementalDetokenizer
from thinkgate.sampling.params import SamplingParams


class FinishReason(enum.StrEnum):
    EOS = "eos"  # the model ended its turn
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched
    STOP_TOKEN = "stop_token"  # a stop_token_ids entry was generated
    LENGTH = "max_tokens"
    ABORT = "abort"
    GRAMMAR = "grammar"  # a constraint reached its accepting end
    ERROR = "error"


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # resolved
    detok: IncrementalDetokenizer
    cache_salt: str = ""
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # when it first entered the running batch (queue time = this - arrival)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache (first admission)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    generator: torch.Generator | None = None
    forced: list[int] = field(default_factory=list)  # tokens the engine emits instead of sampling
    in_reasoning: bool = False
    reasoning_tokens: int = 0
    num_preemptions: int = 0
    grammar: object | None = None  # a structured.Matcher when the output is constrained
    logprobs: list = field(default_factory=list)  # (token, logprob, top) per output token, when asked

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str  # new text since the last output (never a broken UTF-8 character, never a partial stop string)
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_reasoning_tokens: int = 0
    logprobs: list | None = None  # [(token_id, logprob, [(id, logprob), ...]), ...] for the new tokens
