"""Server-side batching: concurrent calls of one signature run as one batch."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import tensorflow as tf


class Batcher:
    """Collects concurrent calls of one signature into batches of at most `max_batch_size` rows."""

    def __init__(self, function, max_batch_size: int, timeout_s: float):
        self.function, self.max_batch_size, self.timeout_s = function, max_batch_size, timeout_s
        self.requests: queue.Queue = queue.Queue()
        self.batches_run = 0
        self.in_flight = 0  # calls submitted that have no result yet
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._loop, daemon=True).start()

    def __call__(self, inputs: dict) -> dict:
        future = self.submit(inputs)
        if future is None:  # the version was unloaded while this call was on its way: run it alone
            return {name: value.numpy() for name, value in self.function(**inputs).items()}
        return future.result()

    def submit(self, inputs: dict) -> Future | None:
        """Queues one call without waiting: a Future of its outputs ({name: NumPy rows}), or None
        once the batcher is closed (the caller then runs the call alone). For an event loop,
        which must not block on the batch."""
        future: Future = Future()
        with self.lock:
            if self.closed:
                return None
            self.in_flight += 1
            self.requests.put((inputs, future))  # under the lock: never after close()'s sentinel
        future.add_done_callback(self._finished)  # runs at once if the batch is already done
        return future

    def _finished(self, _future: Future) -> None:
        with self.lock:
            self.in_flight -= 1

    def close(self) -> None:
        """Ends the batching thread (the version was unloaded); calls already queued still run."""
        with self.lock:
            self.closed = True
            self.requests.put(None)

    def _loop(self):
        while True:
            first = self.requests.get()
            if first is None:
                return
            pending = [first]
            rows = len(next(iter(pending[0][0].values())))
            deadline = time.monotonic() + self.timeout_s
            # wait for more rows only while other calls are on their way: a lone request runs at once
            while rows < self.max_batch_size and self.in_flight > len(pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.requests.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self.requests.put(None)  # close after this batch
                    break
                pending.append(item)
                rows += len(next(iter(item[0].values())))
            sizes = [len(next(iter(inputs.values()))) for inputs, _ in pending]
            try:
                merged = {name: tf.concat([inputs[name] for inputs, _ in pending], axis=0) for name in pending[0][0]}
                outputs = {name: value.numpy() for name, value in self.function(**merged).items()}
                self.batches_run += 1
            except Exception:  # noqa: BLE001  one bad batch must not stop the batcher
                # fall back to one call each, so a bad request fails alone
                for inputs, future in pending:
                    try:
                        future.set_result({n: v.numpy() for n, v in self.function(**inputs).items()})
                    except Exception as single:  # noqa: BLE001
                        future.set_exception(single)
                continue
            start = 0
            for (inputs, future), size in zip(pending, sizes):
                future.set_result({name: value[start:start + size] for name, value in outputs.items()})
                start += size
