"""Watch and steer the engine from a test: its own count of each sequence's tokens, and a gate on its steps."""

from __future__ import annotations

import threading
import time


class EngineProbe:
    """Wraps the engine's step and finish: counts each sequence's tokens when the engine ends it, and can
    hold a step (`hold`), slow every step (`delay_s`), or fail a step once a request has tokens (`fail_after`)."""

    def __init__(self, eng):
        self.counts: dict[str, int] = {}
        self.open = threading.Event()
        self.open.set()
        self.delay_s = 0.0
        self.fail_after: int | None = None
        finish, execute = eng.scheduler.finish, eng.runner.execute

        def counted_finish(seq):
            self.counts[seq.request_id] = len(seq.output_ids)
            finish(seq)

        def gated_execute(batch, rows):
            self.open.wait()
            time.sleep(self.delay_s)
            if self.fail_after is not None and any(len(s.output_ids) >= self.fail_after for s in batch.seqs):
                self.fail_after = None
                raise RuntimeError("injected failure in a model step")
            return execute(batch, rows)

        eng.scheduler.finish = counted_finish
        eng.runner.execute = gated_execute

    def reset(self) -> None:
        self.open.set()
        self.delay_s, self.fail_after = 0.0, None

    def generated(self, request_id: str) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith(request_id + "-"))
