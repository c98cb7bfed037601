"""One background thread per object, started and stopped the same way everywhere: the stream
services' loops, the prediction workers' model follower, the prediction log's poller.

    class Poller(BackgroundThread):
        thread_name = "poller"

        def __init__(self) -> None:
            super().__init__()

        def _guarded_run(self) -> None:
            while not self._stop.wait(0.1):
                ...

    p = Poller(); p.start(); ...; p.stop(); p.alive   # False
"""

from __future__ import annotations

import threading


class BackgroundThread:
    thread_name = "background"
    stop_timeout_s = 10.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _guarded_run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded_run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end and wait for it (at most `timeout`, `stop_timeout_s` by default)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s if timeout is None else timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
