"""The thinking block of a sequence: where reasoning starts and ends, and the reasoning budget.

Qwen3 models think between `<think>` and `</think>`. A thinking template opens the block in the prompt
(the output starts inside it); a hybrid one lets the model open it as its first token. Tokens inside the
block are reasoning (counted, not constrained by a grammar); when a budget is set and spent, the engine
writes the closing tag itself instead of sampling.
"""

from __future__ import annotations

from thinkgate.engine.request import Sequence


class ThinkingTracker:
    def __init__(self, tokenizer):
        self.start = tokenizer.token_id("<think>")
        self.end = tokenizer.token_id("</think>")
        # What a template writes to close the block: the tag, then the blank line before the answer.
        self.close_ids = ([self.end] + tokenizer.encode("\n\n")) if self.end is not None else []

    def enforce_budget(self, seq: Sequence) -> None:
        """Before a token is appended: once the budget is spent, queue the closing tag in place of sampling."""
        budget = seq.params.reasoning_budget
        if seq.in_reasoning and not seq.forced and budget is not None and seq.reasoning_tokens >= budget \
                and self.close_ids:
            seq.forced = list(self.close_ids)

    def is_reasoning(self, seq: Sequence, token: int) -> bool:
        """Whether `token` (about to be appended) belongs to the thinking block, closing tag included."""
        return seq.in_reasoning or token == self.end

    def advance(self, seq: Sequence, token: int, forced: bool) -> bool:
        """Account an appended token; True when it is answer text (what a grammar constrains)."""
        if token == self.end and seq.in_reasoning:
            seq.in_reasoning = False
            if seq.grammar is not None and not forced:
                seq.forced = self.close_ids[1:]  # the template's newlines, then the grammar takes over
            return False
        if token == self.start and len(seq.output_ids) == 1:
            seq.in_reasoning = True
            return False
        if seq.in_reasoning:
            seq.reasoning_tokens += 1
            return False
        return True
