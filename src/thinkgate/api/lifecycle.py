"""Serve an app with uvicorn so that SIGTERM (or Ctrl-C) drains it: readiness turns false and new requests are
refused first, uvicorn stops accepting connections, running requests finish or are ended at the grace period
(api/operations.py), every record is settled, and the process exits 0 (uvicorn alone would re-raise the
signal after its shutdown, which ends the process with the signal's status). A second Ctrl-C forces the exit."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import uvicorn

from thinkgate.api.operations import SETTLE_S, Operations


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ops: Operations):
        super().__init__(config)
        self.ops = ops

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.ops.stop_accepting()  # readiness false before the listener closes
            with contextlib.suppress(RuntimeError):  # no running loop: the lifespan's shutdown drains
                asyncio.get_running_loop().call_soon_threadsafe(self.ops.begin_drain)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, without re-raising the signal once the server has stopped: a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app, host: str, port: int, log_level: str) -> bool:
    """Run until SIGTERM/SIGINT has drained the app; False if the server could not start."""
    ops: Operations = app.state.ops
    # uvicorn's own bound on waiting for connections: past the drain (which ends every request) and settling.
    grace = ops.config.drain_timeout_s + SETTLE_S + 5
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=grace)
    server = DrainingServer(config, ops)
    server.run()
    return server.started
