"""asyncio front for the engine: the model steps run in a background thread, so the HTTP event loop stays
responsive; each request gets its own queue of outputs; cancelling the consumer aborts the request."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.engine.request import RequestOutput
from thinkgate.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thinkgate-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, cache_salt: str = "",
                       reasoning_open: bool = False, grammar=None) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs. Raises InvalidRequestError before anything is queued."""
        seq = self.engine.make_sequence(request_id, prompt_ids, params, cache_salt, reasoning_open, grammar)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", seq))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def num_active(self) -> int:
        return len(self.engine.seqs)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("noop", None))
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                while True:
                    cmd, arg = self._commands.get(block=block, timeout=0.5 if block else None)
                    block = False
                    self._apply(cmd, arg)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"internal engine error: {type(e).__name__}: {e}")
            for out in outputs:
                self._deliver(out)

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            if arg.request_id in self._streams:
                self.engine.submit(arg)
        elif cmd == "abort":
            self.engine.abort(arg)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:  # consumer gone: stop spending compute on it
            if not out.finished:
                self.engine.abort(out.request_id)
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, out)
        except RuntimeError:  # the loop closed
            self.engine.abort(out.request_id)
