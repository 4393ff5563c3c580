"""Runs what the scheduler planned on the device: coalesced passes and decode-group steps.

Gradients: a pass's backward writes into fresh `.grad` tensors (each model's earlier gradient is set
aside first) and is added to the earlier gradient only when the pass succeeded. A request that fails in
a later pass, or a pass that fails as a whole, leaves every model's gradient as it was before that
request, so a failed operation never changes what the next optim_step applies.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from bios.errors import ResourceExhaustedError
from train_service import distributed, metrics, passes
from train_service.device import is_out_of_memory
from train_service.replay import Mirror
from train_service.sampler import DecodeGroup
from train_service.scheduler import ForwardWork, PassPlan

log = logging.getLogger("bios.worker")

Grads = list[torch.Tensor | None]


def _grads(params: list[torch.nn.Parameter]) -> Grads:
    return [p.grad for p in params]


def _set_grads(params: list[torch.nn.Parameter], grads: Grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def _merge(params: list[torch.nn.Parameter], earlier: Grads) -> None:
    """p.grad = earlier + what this pass added (out of place: `earlier` tensors stay untouched)."""
    for p, old in zip(params, earlier):
        if old is not None:
            p.grad = old if p.grad is None else old + p.grad


def run_plan(plan: PassPlan) -> list[ForwardWork]:
    """Run one pass; returns the works answered by it (their futures are set)."""
    works = [w for w, _, _ in plan.parts]
    base = works[0].model.base
    params = [w.model.parameters() for w in works]
    before: list[Grads] = []
    if plan.backward:
        for work, p in zip(works, params):
            if work.start_grads is None:
                work.start_grads = _grads(p)
            before.append(_grads(p))
            _set_grads(p, [None] * len(p))
    parts = [passes.Part(w.model.adapter, w.rows, first, last, w.loss, w.config) for w, first, last in plan.parts]
    try:
        if _leads(base):
            Mirror(base.ranks).pass_plan(plan)
        results = (distributed.run_pass if base.ranks is not None else passes.run_pass)(base, parts, plan.backward)
    except Exception as exc:  # noqa: BLE001 - the pass failed as a whole: no gradient of it is kept
        for p, old in zip(params, before):
            _set_grads(p, old)
        if base.ranks is not None:  # ranks that stopped in the middle of a pass no longer agree: restart them all
            base.ranks.broken = True
            if not isinstance(exc, distributed.RanksFailed):
                log.exception("pass failed on rank %d; the train group must restart", base.ranks.rank)
                exc = distributed.RanksFailed(f"a pass failed on rank {base.ranks.rank}: {type(exc).__name__}")
            return [_fail(w, exc) for w in works]
        if is_out_of_memory(exc):
            base.device.release_cached()
            if len(plan.parts) > 1:  # maybe one request is too big alongside the others: try each alone
                log.warning("pass of %d requests ran out of memory; running them one by one", len(plan.parts))
                answered = []
                for part in plan.parts:
                    answered += run_plan(PassPlan(plan.backward, [part], []))
                return answered
            exc = ResourceExhaustedError(
                f"out of memory on {base.device.describe()} for this request "
                f"({part_tokens(plan)} tokens in the pass); send fewer or shorter data"
            )
        return [_fail(w, exc) for w in works]
    metrics.record_pass(
        "forward_backward" if plan.backward else "forward",
        len(parts),
        sum(len(w.rows.ids[i]) for w, a, b in plan.parts for i in range(a, b)),
    )
    answered = []
    olds: Sequence[Grads | None] = before or [None] * len(works)
    for (work, _, last), result, p, saved in zip(plan.parts, results, params, olds):
        if result.error is not None:
            answered.append(_fail(work, result.error))
            continue
        if plan.backward:
            assert saved is not None  # a backward pass saved every work's gradients above
            _merge(p, saved)
        work.results.append(result)
        work.cursor = last
        if work.done:
            if plan.backward:
                work.model.has_gradient = True
            work.start_grads = None
            try:
                work.future.set_result(work.finish(work))
            except Exception as exc:  # noqa: BLE001
                work.future.set_exception(exc)
            answered.append(work)
    return answered


def _leads(base: Any) -> bool:
    """Rank 0 of several: what it runs, it first tells the other ranks to run (train_service.replay)."""
    return base.ranks is not None and base.ranks.rank == 0


def part_tokens(plan: PassPlan) -> int:
    return sum(len(w.rows.ids[i]) for w, a, b in plan.parts for i in range(a, b))


def _fail(work: ForwardWork, exc: BaseException) -> ForwardWork:
    if work.backward and work.start_grads is not None:
        _set_grads(work.model.parameters(), work.start_grads)
    work.start_grads = None
    work.cursor = len(work.rows)
    if not work.future.done():
        work.future.set_exception(exc)
    return work


def step_group(group: DecodeGroup) -> list[Any]:
    """One decode step of a group; returns the sample works answered in it."""
    try:
        if _leads(group.base):
            mirror = Mirror(group.base.ranks)
            if group.cache is None:  # its first step
                mirror.group(group)
            mirror.step(group)
        # Counted before the step: its answers may wake callers that read the metrics.
        metrics.record_decode_step(sum(m.request.num_samples for m in group.members))
        answered = group.step()
    except Exception as exc:  # noqa: BLE001
        ranks = group.base.ranks
        if ranks is not None:  # the ranks no longer agree on this group: restart them all
            ranks.broken = True
            if not isinstance(exc, distributed.RanksFailed):
                log.exception("decode step failed on rank %d; the train group must restart", ranks.rank)
                exc = distributed.RanksFailed(f"a decode step failed on rank {ranks.rank}: {type(exc).__name__}")
            return group.fail(exc)
        if is_out_of_memory(exc):
            group.base.device.release_cached()
            exc = ResourceExhaustedError(
                f"out of memory on {group.base.device.describe()} while sampling; ask for fewer samples or tokens"
            )
        return group.fail(exc)
    return answered
