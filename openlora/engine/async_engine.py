"""AsyncEngine: the synchronous LLMEngine stepping in its own thread, driven from an asyncio loop.

NOTE (threading): LLMEngine is not thread-safe, so only the engine thread ever touches it. The event
loop talks to that thread through an *inbox* (a list guarded by a Condition) of commands: add a
request, abort one, or run a callable (metrics snapshots). The thread drains the inbox before every
step, steps, and hands every step's outputs back to the loop in one `call_soon_threadsafe` call, which
puts each output on its request's asyncio.Queue. When nothing is queued or running the thread waits on
the Condition (no busy spin); the loop never waits on a model step.

Failure policy: errors raised by `LLMEngine.add_request` (InvalidRequest, RequestTooLong,
AdapterNotFound, ...) travel back to the awaiting caller through a concurrent Future, so a route can
answer 4xx before it starts streaming. An exception inside `step()` is logged, every in-flight request
receives an `EngineStepError` (500-class) and is aborted, and the thread carries on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from openlora.engine.llm_engine import AdapterSpec, LLMEngine
from openlora.errors import OpenLoRAError, Overloaded
from openlora.outputs import RequestOutput
from openlora.sampling_params import SamplingParams

log = logging.getLogger("openlora.async_engine")


class EngineStepError(OpenLoRAError):
    """The engine failed while running this request (a server bug, not the caller's fault)."""

    status = 500
    code = "internal_error"


class ShuttingDown(OpenLoRAError):
    """The server is draining before exit and admits no new requests."""

    status = 503
    code = "service_unavailable"


# An item on a request's queue: a cumulative RequestOutput, or an exception that ends the request.
StreamItem = RequestOutput | BaseException


IDLE_WAIT_S = 0.005  # longest sleep of an engine loop whose requests all wait (see _run)

@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    adapters: AdapterSpec
    tenant: str
    merge: dict | None
    queue: asyncio.Queue
    future: Future
    cache_scope: str | None = None
    seal: Callable[[list[str]], str] | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: Future


class AsyncEngine:
    """Runs `engine` in a background thread; every public method is called from the event loop
    (except `abort`, which is safe from any thread)."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int | None = None) -> None:
        self.engine = engine
        # Bound on queued (not yet running) sequences; beyond it new requests get Overloaded (429).
        self.max_waiting = max_waiting if max_waiting is not None else engine.config.scheduler.max_waiting
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort | _Call] = []
        self._queues: dict[str, asyncio.Queue] = {}  # engine-thread owned: request id -> its queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False  # set at shutdown: no new requests
        self.num_in_flight = 0  # requests admitted and not finished (read on the loop side only)
        self.step_errors = 0
        self._woken = False  # an adapter load ended since the loop last looked (guarded by _cond)
        if engine.lora is not None:
            engine.lora.on_load_done(self._wake)

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine], *, max_waiting: int | None = None) -> AsyncEngine:
        """Construct the LLMEngine with `factory()` on the thread that will step it, and return the
        AsyncEngine around it (its thread already running, idle until `start`). Raises what the
        factory raises.

        NOTE: torch's OpenMP runtime keeps a worker team per thread that ever ran a parallel op. Loading
        the model on the main thread and stepping on another leaves two teams; with more OpenMP threads
        than cores libgomp cuts its spin-wait to almost nothing, so each of a step's ~600 parallel regions
        pays a futex wake-up (measured: decode 8% slower than the same engine stepped on the thread that
        loaded it). Building here keeps every parallel op of the server on one thread.
        """
        built: Future = Future()

        def main() -> None:
            try:
                ae = cls(factory(), max_waiting=max_waiting)
                ae._thread = threading.current_thread()
            except BaseException as e:
                built.set_exception(e)
                return
            built.set_result(ae)
            ae._run()

        threading.Thread(target=main, name="openlora-engine", daemon=True).start()
        return built.result()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running event loop and start the engine thread (if `build` has not already)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="openlora-engine", daemon=True)
            self._thread.start()

    async def drain(self, grace_period: float) -> None:
        """Stop admitting; let in-flight requests run up to `grace_period` s, then abort the rest,
        each consumer getting a ShuttingDown error (so streams end cleanly, not cut off)."""
        self.draining = True
        deadline = time.monotonic() + grace_period
        while time.monotonic() < deadline and await self.call(lambda e: e.has_unfinished_requests()):
            await asyncio.sleep(0.05)
        n = await self.call(self._abort_all)
        if n:
            log.warning("shutdown: aborted %d request(s) still running after the %.1fs grace period", n, grace_period)

    async def shutdown(self, grace_period: float = 0.0) -> None:
        """drain(grace_period), then stop the engine thread."""
        await self.drain(grace_period)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def _abort_all(self, eng: LLMEngine) -> int:
        n = len(eng.groups)
        self._fail_all(ShuttingDown("the server is shutting down; request aborted"))
        return n

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine delivers to (None before start)."""
        return self._loop

    # ---- loop-side API ----------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                          adapters: AdapterSpec = None, tenant: str = "", merge: dict | None = None,
                          queue: asyncio.Queue | None = None, cache_scope: str | None = None,
                          seal: Callable[[list[str]], str] | None = None) -> asyncio.Queue:
        """Queue a request; returns the asyncio.Queue its outputs arrive on (several requests may
        share one queue: outputs carry their request_id). Raises what LLMEngine.add_request raises,
        Overloaded when the waiting queue is full, ShuttingDown while draining."""
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        q = queue if queue is not None else asyncio.Queue()
        fut: Future = Future()
        self._post(_Add(request_id, prompt, params, adapters, tenant, merge, q, fut, cache_scope, seal))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # caller went away while we queued: do not run it for nobody
            self.abort(request_id)
            raise
        self.num_in_flight += 1
        return q

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       **kw: Any) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs until it finishes; aborts it if the
        consumer stops early (client disconnect cancels the consuming task)."""
        q = await self.add_request(request_id, prompt, params, **kw)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.request_done(request_id, finished)

    def request_done(self, request_id: str, finished: bool) -> None:
        """Bookkeeping when a consumer is done with a request; aborts it if it is still running."""
        self.num_in_flight -= 1
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); safe from any thread."""
        self._post(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        fut: Future = Future()
        self._post(_Call(fn, fut))
        return await asyncio.wrap_future(fut)

    def _wake(self) -> None:
        """An adapter load ended (a loader thread): an idle loop may have work again."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def _post(self, item: _Add | _Abort | _Call) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stop and not eng.has_unfinished_requests():
                    self._cond.wait()
                if eng.last_step_idle and not (self._inbox or self._stop or self._woken):
                    # Requests wait on adapter loads: sleep until one ends (or a new item arrives), at
                    # most IDLE_WAIT_S, since a slot's time slice also ends by the clock alone.
                    self._cond.wait(IDLE_WAIT_S)
                self._woken = False
                items, self._inbox = self._inbox, []
                if self._stop and not items:
                    break
            try:
                self._drain(items)
                if eng.has_unfinished_requests():
                    self._deliver(eng.step())
            except Exception as e:  # never die silently: fail the in-flight requests, keep serving
                self.step_errors += 1
                log.exception("engine step failed; failing %d in-flight request(s)", len(self._queues))
                self._fail_all(e)
        self._fail_all(ShuttingDown("the server shut down"))

    def _drain(self, items: list[_Add | _Abort | _Call]) -> None:
        eng = self.engine
        for it in items:
            if isinstance(it, _Add):
                try:
                    if eng.num_waiting() >= self.max_waiting:
                        raise Overloaded(f"too many queued requests ({eng.num_waiting()}); retry later")
                    eng.add_request(it.request_id, it.prompt, it.params, adapters=it.adapters,
                                    tenant=it.tenant, merge=it.merge, cache_scope=it.cache_scope, seal=it.seal)
                except BaseException as e:  # goes back to the caller, who answers 4xx
                    log.debug("request %s refused: %s", it.request_id, type(e).__name__)
                    it.future.set_exception(e)
                else:
                    self._queues[it.request_id] = it.queue
                    it.future.set_result(None)
                    # Counts and ids only: no prompt or output text is ever logged, at any level.
                    g = eng.groups[it.request_id]
                    log.debug("request %s queued: %d prompt tokens, n=%d, adapters %s", it.request_id,
                              len(g.prompt_token_ids), it.params.n, [u.adapter_id for u in g.children[0].adapters])
            elif isinstance(it, _Abort):
                if it.request_id in eng.groups:
                    eng.abort_request(it.request_id)
                # The consumer is gone: nobody reads the final output, drop the queue now.
                self._queues.pop(it.request_id, None)
            else:
                try:
                    it.future.set_result(it.fn(eng))
                except BaseException as e:
                    it.future.set_exception(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            if out.finished:
                del self._queues[out.request_id]
            batch.append((q, out))
        if batch:
            self._send(batch)

    def _fail_all(self, err: BaseException) -> None:
        """Give every in-flight request an error and abort it in the engine (best effort)."""
        batch = [(q, EngineStepError(f"engine error: {type(err).__name__}: {err}")
                  if not isinstance(err, OpenLoRAError) else err) for q in self._queues.values()]
        ids = list(self._queues)
        self._queues.clear()
        try:
            self.engine.abort_request(list(self.engine.groups) or ids)
        except Exception:  # the engine state may be corrupt; the requests are failed either way
            log.exception("aborting requests after an engine error failed: dropping every request")
            self.engine.groups.clear()
            self.engine.child_to_group.clear()
            self.engine.scheduler.reset()  # else the scheduler would run the dropped requests again
        if batch:
            self._send(batch)

    def _send(self, batch: list[tuple[asyncio.Queue, StreamItem]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # loop closed (process exiting): nobody is listening any more
            pass


def _put_all(batch: list[tuple[asyncio.Queue, StreamItem]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
