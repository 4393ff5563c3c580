"""What the engine runs next: per-model FIFO queues, round robin across them, and coalescing.

Each key (a training model, a sampler, "control") has a FIFO queue, so its work runs in submission
order. Keys with waiting work take turns in a ring. When a key's turn comes and its next work is a
forward / forward_backward, the pass also takes the next work of other keys waiting in the ring when it
is of the same kind on the same base model, up to the pass's token budget: many models' rows go through
the shared base at once. A request larger than the budget is split over several passes, and between
them every other key gets its turn. Sampling requests on one base likewise start decoding together, as
one decode group that then takes one turn in the ring per decode step.

Each key has at most one piece of work running at a time (several for samples that decode together), so
a model's optim_step always runs after its earlier operations, and a pass holds one request per model.
"""

from __future__ import annotations

import collections
import inspect
import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from train_service.passes import PartResult, Rows


@dataclass(frozen=True)
class Limits:
    """Engine limits, reported in GetInfo. A request above them is refused; a pass never exceeds them."""

    max_request_tokens: int = 131_072  # tokens in one forward / forward_backward request
    max_pass_tokens: int = 16_384  # padded tokens (rows x longest row) in one pass over the base
    max_pass_ops: int = 64  # requests coalesced into one pass; 1 = no coalescing


class Work:
    """Something queued under a key; its future holds the result."""

    key: str = ""

    def __init__(self) -> None:
        self.future: Future = Future()
        self.started = False

    def start(self) -> bool:
        """Mark the work running (it can no longer be cancelled); False if it was cancelled while queued."""
        if not self.started:
            self.started = self.future.set_running_or_notify_cancel()
        return self.started


class Call(Work):
    """A function run alone on the engine thread (optim_step, checkpoints, control). A function that returns a
    generator is stepped one `next()` per turn, so a long job interleaves with everything else."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__()
        self.fn = fn
        self.steps: Iterator[Any] | None = None

    def step(self) -> bool:
        """Run one unit; True when finished (the future is then set)."""
        try:
            if self.steps is None:
                result = self.fn()
                if not inspect.isgenerator(result):
                    self.future.set_result(result)
                    return True
                self.steps = result
            next(self.steps)
            return False
        except StopIteration as stop:
            self.future.set_result(stop.value)
        except BaseException as exc:  # noqa: BLE001 - the failure belongs to this work only
            self.future.set_exception(exc)
        return True


_work_ids = itertools.count()


class ForwardWork(Work):
    """A forward or forward_backward request: its rows go through one or more passes, maybe with others'."""

    def __init__(
        self,
        model: Any,
        rows: Rows,
        loss: Any,
        config: dict[str, float],
        backward: bool,
        finish: Callable[["ForwardWork"], Any],
        loss_name: str = "",
        wid: int | None = None,
    ):
        super().__init__()
        self.wid = next(_work_ids) if wid is None else wid  # names it to the other ranks (train_service.replay)
        self.model = model  # has .base, .adapter and the gradient bookkeeping (sessions.TrainingModel)
        self.rows = rows
        self.loss = loss
        self.loss_name = loss_name
        self.config = config
        self.backward = backward
        self.finish = finish  # builds the answer once every row is done
        self.cursor = 0  # rows [0, cursor) have been computed
        self.results: list[PartResult] = []
        self.start_grads: list[Any] | None = None  # the model's gradient before this request's first pass

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.rows)

    def compatible(self, other: "ForwardWork") -> bool:
        return other.model.base is self.model.base and other.backward == self.backward


@dataclass
class PassPlan:
    """Rows of several requests (at most one per model) for one pass over one base model."""

    backward: bool
    parts: list[tuple[ForwardWork, int, int]] = field(default_factory=list)  # (work, first row, last row)
    keys: list[str] = field(default_factory=list)


class SampleWork(Work):
    """A sample request; it decodes in a group with other sample requests on the same base."""

    def __init__(self, base: Any, request: Any):
        super().__init__()
        self.base = base
        self.request = request  # sampler.SampleRequest


class _Budget:
    """Greedy fit of rows into a pass: padded tokens (rows x longest row) within the budget."""

    def __init__(self, limit: int):
        self.limit, self.rows, self.width = limit, 0, 0

    def take(self, rows: Rows, first: int, at_least_one: bool) -> int:
        """How many rows from `first` fit; at least one for the pass's first request."""
        last = first
        while last < len(rows):
            n = len(rows.ids[last])
            width = max(self.width, n)
            if (self.rows + 1) * width > self.limit and not (at_least_one and last == first):
                break
            self.rows, self.width = self.rows + 1, width
            last += 1
        return last


class Scheduler:
    """Queues and turn order; not thread-safe by itself (the engine calls it under its lock)."""

    def __init__(self, limits: Limits, max_decode_rows: int = 256):
        self.limits = limits
        self.max_decode_rows = max_decode_rows
        self.queues: dict[str, collections.deque[Work]] = {}
        self.ring: collections.deque[Any] = collections.deque()  # keys with waiting work, and decode groups
        self.running: dict[str, int] = {}  # key -> how many of its works are running

    def add(self, key: str, work: Work) -> None:
        work.key = key
        queue = self.queues.setdefault(key, collections.deque())
        queue.append(work)
        if len(queue) == 1 and key not in self.running:
            self.ring.append(key)

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def drop(self, key: str) -> list[Work]:
        """Forget a key (its model is gone); returns its works that were waiting, not running."""
        queue = self.queues.pop(key, collections.deque())
        if key in self.ring:
            self.ring.remove(key)
        running = self.running.pop(key, 0)
        return list(queue)[running:]

    def next(self) -> Any | None:
        """The next unit to run: a Call, a PassPlan, a list of SampleWork to start decoding, or a running
        decode group (any object in the ring that is not a key)."""
        while self.ring:
            item = self.ring.popleft()
            if not isinstance(item, str):
                return item
            head = self._head(item)
            if head is None:
                continue
            self.running[item] = 1
            if isinstance(head, ForwardWork):
                return self._plan(item, head)
            if isinstance(head, SampleWork):
                return self._group(item, head)
            return head
        return None

    def _head(self, key: str) -> Work | None:
        """The key's first work that was not cancelled while queued (cancelled ones are dropped)."""
        queue = self.queues.get(key)
        while queue:
            if queue[0].start():
                return queue[0]
            queue.popleft()
        self.queues.pop(key, None)
        return None

    def _plan(self, key: str, head: ForwardWork) -> PassPlan:
        plan = PassPlan(head.backward)
        budget = _Budget(self.limits.max_pass_tokens)
        plan.parts.append((head, head.cursor, budget.take(head.rows, head.cursor, at_least_one=True)))
        plan.keys.append(key)
        for other in list(self.ring):
            if len(plan.parts) >= self.limits.max_pass_ops or budget.rows * budget.width >= self.limits.max_pass_tokens:
                break
            if not isinstance(other, str):
                continue
            work = self._head(other)
            if work is None:
                self.ring.remove(other)
                continue
            if not isinstance(work, ForwardWork) or not head.compatible(work):
                continue
            if any(w.model is work.model for w, _, _ in plan.parts):
                continue
            last = budget.take(work.rows, work.cursor, at_least_one=False)
            if last > work.cursor:
                plan.parts.append((work, work.cursor, last))
                plan.keys.append(other)
                self.ring.remove(other)
                self.running[other] = 1
        return plan

    def _group(self, key: str, head: SampleWork) -> list[SampleWork]:
        """Sample requests to start decoding together: this key's consecutive samples, then other waiting keys'."""
        group: list[SampleWork] = []
        rows = 0

        def take(k: str) -> None:
            nonlocal rows
            queue, taken = self.queues[k], 0
            while taken < len(queue):
                work = queue[taken]
                if not isinstance(work, SampleWork) or work.base is not head.base:
                    break
                if group and rows + work.request.num_samples > self.max_decode_rows:
                    break
                if not work.start():  # cancelled while queued
                    del queue[taken]
                    continue
                group.append(work)
                rows += work.request.num_samples
                taken += 1
            self.running[k] = taken

        take(key)
        for other in list(self.ring):
            if rows >= self.max_decode_rows:
                break
            if not isinstance(other, str):
                continue
            first = self._head(other)
            if first is None:
                self.ring.remove(other)
            elif (
                isinstance(first, SampleWork)
                and first.base is head.base
                and rows + first.request.num_samples <= self.max_decode_rows
            ):
                self.ring.remove(other)
                take(other)
        return group

    def finished(self, work: Work) -> None:
        """`work` is done (answered): its key's next work may run."""
        key = work.key
        queue = self.queues.get(key)
        if queue is None or work not in queue:
            return
        queue.remove(work)
        self.running[key] = self.running.get(key, 1) - 1
        if self.running[key] <= 0:
            del self.running[key]
            if queue:
                self.ring.append(key)
            else:
                del self.queues[key]

    def release(self, key: str) -> None:
        """`key`'s running work took its turn without finishing (a partial pass, a generator step)."""
        if key in self.running and self.running[key] == 1 and self.queues.get(key):
            del self.running[key]
            self.ring.append(key)

    def requeue(self, unit: Any) -> None:
        """A running decode group (or any non-key unit) takes its next turn at the end of the ring."""
        self.ring.append(unit)
