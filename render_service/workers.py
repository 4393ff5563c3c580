"""Render worker processes: a RenderBatch is cut into slices rendered in parallel.

Rendering is CPU-bound Python, so one process uses one core. With `--workers N` (N > 1) the render
service keeps N worker processes for the batched RPC; single-conversation RPCs stay in the server
process (they are small and latency-bound). Slices cross as serialized protobuf bytes, so only bytes
are pickled, and each worker keeps its own renderer and tokenizer caches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing

from bios.errors import UnavailableError
from bios.v1 import render_pb2
from render_service.batch import render_batch

MIN_SLICE = 16  # conversations: smaller slices cost more in IPC than they gain


def _render_slice(data: bytes, allow_local_paths: bool) -> bytes:
    return render_batch(render_pb2.RenderBatchRequest.FromString(data), allow_local_paths).SerializeToString()


def _warm_up() -> None:
    """Each worker's initializer: unpickling it imports this module, and with it batch (the torch-free render
    code), once at start rather than in the first slice."""


class RenderWorkers:
    """A pool of render processes (spawned: forking a process that runs gRPC threads is unsafe)."""

    def __init__(self, workers: int):
        if workers < 2:
            raise ValueError(f"workers: {workers}; use the server process itself below 2")
        self.workers = workers
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_up
        )

    async def render_batch(
        self, request: render_pb2.RenderBatchRequest, allow_local_paths: bool
    ) -> render_pb2.RenderBatchResponse:
        n = len(request.conversations)
        parts = max(1, min(self.workers, n // MIN_SLICE))
        bounds = [n * k // parts for k in range(parts + 1)]
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            slices = []
            for a, b in zip(bounds, bounds[1:]):
                part = render_pb2.RenderBatchRequest(
                    renderer=request.renderer,
                    kind=request.kind,
                    add_generation_prompt=request.add_generation_prompt,
                    train_on_what=request.train_on_what,
                    content_sft_roles=request.content_sft_roles,
                    first_index=request.first_index + a,
                    conversations=request.conversations[a:b],
                )
                slices.append(loop.run_in_executor(pool, _render_slice, part.SerializeToString(), allow_local_paths))
            results = await asyncio.gather(*slices)
        except concurrent.futures.process.BrokenProcessPool:  # at submission too: a pool broken by an earlier death
            logging.exception("a render worker died; starting a new pool")
            if self._pool is pool:
                self._pool = self._new_pool()
            # UNAVAILABLE: the request was fine and a retry (which the client makes) meets the new pool.
            raise UnavailableError("a render worker process died while rendering this batch; retry") from None
        response = render_pb2.RenderBatchResponse()
        for data in results:
            response.MergeFromString(data)  # repeated fields append: the slices' examples, in order
        return response

    def pids(self) -> list[int]:
        """The worker processes started so far."""
        return sorted(self._pool._processes or {})

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
