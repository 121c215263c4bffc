"""Continuous batching: each step mixes decodes and chunked prefills under a token budget.

Running sequences go first (oldest first), each asking for all its uncomputed tokens (1 for a decode,
the rest of the prompt for a prefill in progress) up to the budget. If the KV pool runs dry, the newest
running sequence is preempted: its blocks are released and it re-queues to be recomputed later (its
cached blocks usually survive, so recompute is mostly prefix-cache hits). Waiting sequences are admitted
while budget, sequence slots and blocks last.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from thinkgate.engine.block_manager import BlockManager
from thinkgate.engine.request import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens to compute for each sequence this step
    # Speculative drafts per sequence (parallel to seqs; empty = none): computed after its pending token,
    # counted in num_new. Empty list when the step has none at all.
    drafts: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, drafts: dict[str, list[int]] | None = None) -> ScheduledBatch:
        """`drafts`: speculative tokens proposed for decoding sequences; each is verified after the
        sequence's pending token when the budget and free blocks allow it (drafts never preempt)."""
        budget = self.max_num_batched_tokens
        seqs, num_new, seq_drafts = [], [], []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            d = drafts.get(seq.request_id, []) if drafts and n == seq.num_tokens - seq.num_computed == 1 else []
            d = d[:budget - 1]
            if d and self.bm.can_allocate(seq, seq.num_computed + 1 + len(d)):
                n += len(d)
            else:
                d = []
            while not self.bm.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break
            self.bm.allocate(seq, seq.num_computed + n)
            seqs.append(seq)
            num_new.append(n)
            seq_drafts.append(d)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.bm.match_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt = cached
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.bm.can_allocate(seq, seq.num_computed + n):
                if self.running:  # wait for running sequences to finish and free blocks
                    self.bm.release(seq)
                    seq.num_computed = 0
                    break
                # Nothing running will free blocks: take the chunk that fits now.
                n = min(n, (len(seq.block_table) + self.bm.num_free_blocks) * self.bm.block_size - seq.num_computed)
                if n <= 0:
                    raise RuntimeError("the KV cache is too small for a single sequence")
            self.waiting.popleft()
            self.bm.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            seq_drafts.append([])
            budget -= n
        return ScheduledBatch(seqs, num_new, seq_drafts if any(seq_drafts) else [])

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.release(seq)
        seq.status = Status.FINISHED
