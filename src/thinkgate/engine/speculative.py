"""N-gram speculative decoding (prompt lookup, vLLM's "ngram" method): drafts copied from the sequence itself.

Text that repeats what came before (an edited file, a quoted passage, code that restates its names) can be
predicted by finding the last few tokens earlier in the sequence and proposing what followed them there. The
engine verifies the drafts in one forward over the pending token plus the drafts (the chunked-prefill path),
keeps the longest prefix the model agrees with (sampling/acceptance.py keeps the output distribution exact)
and gives back the rejected tokens' blocks.

A proposal costs a wider forward, so on text that does not repeat, drafting backs off: after a proposal of
which nothing was accepted the sequence stops proposing for a number of steps that doubles with each such
miss in a row (up to MAX_COOLDOWN), and a hit resets it. The draft length adapts too: a sequence starts with
START_DRAFT tokens, doubles it (up to MAX_DRAFT) each time every draft is accepted, drops to one past what
was accepted on a partial hit and to 1 on a miss. A miss then costs a verify step of 2 rows rather than 8: on
CPU a row costs ~1/3 of a one-token step, so on prose the fixed 8-token drafts cost 15 % of the speed
(BENCHMARKS.md, "N-gram speculative decoding"), while text that repeats is back at MAX_DRAFT within three steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NGRAM_MAX = 3  # the longest suffix looked up first ...
NGRAM_MIN = 1  # ... down to this one
# Tokens proposed at most per step: 7, so that a verify step (the pending token and its drafts) is 8 rows, one
# group of the CPU block kernels, which unpack each weight block once for 8 rows; a 9th row costs a second
# unpacking (editing 1.92x at 8, 2.03-2.14x at 7, 1.88x at 15: BENCHMARKS.md, "CPU, fifth round").
MAX_DRAFT = 7
START_DRAFT = 2  # a sequence's first drafts
MAX_COOLDOWN = 64  # steps without proposing after many misses in a row


@dataclass
class DraftState:
    misses: int = 0  # proposals in a row of which nothing was accepted
    limit: int = START_DRAFT  # tokens the next proposal may hold
    cooldown: int = 0  # steps left before the next proposal
    proposed: int = 0  # draft tokens proposed (statistics)
    accepted: int = 0  # of which accepted


def find_ngram_draft(tokens: list[int], max_draft: int, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (n_max..n_min
    long) that occurs earlier; [] when none does."""
    if max_draft <= 0 or len(tokens) < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        tail = arr[size - n:]
        # Windows that start at 0..size-n-1 (the suffix itself excluded) and match it.
        hay = arr[: size - 1]
        if len(hay) < n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(hay, n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: closest to what is being written now
            return arr[start:start + max_draft].tolist()
    return []


class NgramProposer:
    def __init__(self, max_draft: int = MAX_DRAFT):
        self.max_draft = max_draft
        self.states: dict[str, DraftState] = {}
        self.proposed = 0  # totals over finished and live sequences
        self.accepted = 0

    def propose(self, request_id: str, tokens: list[int], room: int) -> list[int]:
        """Drafts for a sequence whose known tokens are `tokens`; `room`: how many may be proposed at most."""
        st = self.states.setdefault(request_id, DraftState(limit=min(START_DRAFT, self.max_draft)))
        if st.cooldown > 0:
            st.cooldown -= 1
            return []
        return find_ngram_draft(tokens, min(st.limit, room))

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        st = self.states.setdefault(request_id, DraftState(limit=min(START_DRAFT, self.max_draft)))
        st.proposed += proposed
        st.accepted += accepted
        self.proposed += proposed
        self.accepted += accepted
        if accepted == 0:
            st.misses += 1
            st.cooldown = min(2 ** st.misses, MAX_COOLDOWN)
            st.limit = 1
        else:
            st.misses = 0
            st.limit = min(self.max_draft, 2 * st.limit if accepted == proposed else accepted + 1)

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0
