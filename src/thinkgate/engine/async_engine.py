"""asyncio front for the engine: the model steps run in a background thread, so the HTTP event loop stays
responsive; each request gets its own queue of outputs; cancelling the consumer aborts the request.

All torch work should happen on that one thread: OpenMP keeps a worker team per calling thread, and two
teams on a small CPU fight for cores (decode measured 1.6x slower here when the model was loaded on the
main thread and stepped on another). `AsyncEngine.build(factory)` therefore loads the model on the
engine thread itself."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.engine.request import RequestOutput
from thinkgate.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, factory: Callable[[], LLMEngine] | None = None):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        # Called on the engine thread with each queued sequence (`added(seq)`) and each step's outputs
        # (`delivered(outputs)`): the metrics' timings. It must not raise.
        self.observer = None
        self._thread = threading.Thread(target=self._main, args=(factory,), name="thinkgate-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine]) -> AsyncEngine:
        """Create the engine on the engine thread (so one OpenMP team does all the work)."""
        return cls(factory=factory)

    def _main(self, factory) -> None:
        if factory is not None:
            try:
                self.engine = factory()
            except BaseException as e:  # surfaces in the constructor
                self._load_error = e
                self._ready.set()
                return
        self._ready.set()
        self._run()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, cache_salt: str = "",
                       reasoning_open: bool = False, grammar=None) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs, ending with a finished one (also after `abort`). Raises ValueError
        (a prompt or parameters the engine cannot take) before anything is queued."""
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

    def alive(self) -> bool:
        """The engine thread runs and takes requests (false after shutdown or if the thread died)."""
        return self._thread.is_alive() and not self._stop.is_set()

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
            self._deliver(outputs)

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            if arg.request_id in self._streams:
                self.engine.submit(arg)
                if self.observer is not None:
                    self.observer.added(arg)
        elif cmd == "abort":
            # The abort's output carries the exact token counts up to now: the consumer's usage record
            # needs it, so it is delivered like any other (dropped if the consumer is gone).
            out = self.engine.abort(arg)
            if out is not None:
                self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their consumers: one wake-up per event loop per step, not per token."""
        if self.observer is not None:
            self.observer.delivered(outputs)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:  # consumer gone: stop spending compute on it
                if not out.finished:
                    self.engine.abort(out.request_id)
                continue
            by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_fan_out, items)
            except RuntimeError:  # the loop closed
                for _, out in items:
                    self.engine.abort(out.request_id)


def _fan_out(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
