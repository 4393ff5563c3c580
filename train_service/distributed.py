"""The train service on several ranks (torchrun): FSDP2-sharded base weights, data-parallel passes.

Every rank holds a shard of each base model's decoder layers (`fully_shard` per layer, all-gathered layer by layer
as a pass runs), the whole embeddings / final norm / LM head (small next to the layers, and the LM head is called
outside the decoder's forward, in chunks), and a replica of every adapter with its optimizer state (LoRA weights
are small; they are created and removed per session, which an already sharded module cannot take). Rank 0 serves
gRPC and schedules; it sends each unit of engine work to the other ranks (train_service.replay), and all ranks run
it together:

- a pass is data-parallel: rank k computes rows k, k + N, ... of the coalesced batch; per-part loss sums are
  all-reduced before the backward (so every rank refuses the same non-finite parts), LoRA gradients after it, and
  the per-row results are gathered, so every rank ends the pass with the same gradients and results;
- optimizer steps run on every rank on the same all-reduced gradients, so the replicas stay equal;
- decoding runs every row on every rank (FSDP needs each rank in each layer's all-gather), with rank 0's
  choices of tokens sent to the others at each step.

gloo on CPU, NCCL on CUDA (device cuda:LOCAL_RANK); control messages and results go over a gloo group.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from bios.errors import InvalidArgumentError, UnavailableError
from train_service.passes import Part, PartResult, Rows, layout, score_parts

log = logging.getLogger("bios.distributed")


class RanksFailed(UnavailableError):
    """A collective with the other ranks failed: a rank died or timed out. The group must restart (until then
    every call is UNAVAILABLE, which clients retry)."""


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    objects: Any  # a gloo process group for Python objects (control messages, results)
    broken: bool = False

    @classmethod
    def from_env(cls, use_cuda: bool = True) -> "Ranks | None":
        """The process group torchrun describes in the environment; None for a single process. NCCL when CUDA is
        there and wanted, else gloo. $BIOS_DIST_TIMEOUT bounds every collective (seconds)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        timeout = datetime.timedelta(seconds=float(os.environ.get("BIOS_DIST_TIMEOUT", "300")))
        backend = "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
        objects = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        ranks = cls(dist.get_rank(), dist.get_world_size(), local_rank, objects)
        log.info("rank %d of %d (local rank %d, %s)", ranks.rank, ranks.world, local_rank, backend)
        return ranks

    @property
    def device(self) -> str:
        """cuda:LOCAL_RANK when CUDA is there, else cpu."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    # ---- collectives: any failure marks the group broken -----------------------------------------------

    def _guard(self, fn, *args, **kwargs):
        if self.broken:
            raise RanksFailed("a rank of this train group failed earlier")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL errors come as RuntimeError and friends
            self.broken = True
            raise RanksFailed(f"lost contact with the other ranks: {exc}") from exc

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        self._guard(dist.broadcast_object_list, box, src=0, group=self.objects)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._guard(dist.all_gather_object, out, obj, group=self.objects)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        self._guard(dist.all_reduce, tensor)
        return tensor

    def close(self) -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already torn down by a failed peer
            pass

    # ---- models ------------------------------------------------------------------------------------

    def shard(self, base: Any) -> None:
        """FSDP2 over the decoder: each layer its own unit, the decoder the root. Target Linears are wrapped for
        LoRA first (fully_shard keeps each Linear object, so routing reaches it), and the embeddings and final
        norm are left whole (ignored): the LM head shares the embedding when tied and runs outside the decoder."""
        base.wrap_all_targets()
        decoder = base.decoder
        for layer in decoder.layers:
            fully_shard(layer)
        whole = {p for name, p in decoder.named_parameters() if not name.startswith("layers.")}
        fully_shard(decoder, ignored_params=whole)

    def split(self, rows: int) -> list[int]:
        """The rows of a pass this rank computes."""
        return list(range(self.rank, rows, self.world))


# ---- a data-parallel pass -------------------------------------------------------------------------------


def _local_parts(parts: list, ranks: Ranks) -> tuple[list, list[tuple[int, int]], bool]:
    """This rank's share of the pass: each part's rows whose index in the pass is rank mod N. Returns the local
    parts, (part index, row in part) of each local row, and whether the share is a stand-in (a rank with no row
    still runs one, with no weight, so that it takes part in every layer's collectives)."""
    mine = set(ranks.split(sum(p.last - p.first for p in parts)))
    local, where, row = [], [], 0
    for index, part in enumerate(parts):
        chosen = []
        for i in range(part.first, part.last):
            if row in mine:
                chosen.append(i)
                where.append((index, i - part.first))
            row += 1
        if chosen:
            rows = Rows(
                [part.rows.ids[i] for i in chosen],
                [part.rows.targets[i] for i in chosen],
                [part.rows.inputs[i] for i in chosen],
            )
            local.append(Part(part.adapter, rows, 0, len(chosen), part.loss, part.config))
    if local:
        return local, where, False
    first = parts[0]
    rows = Rows([first.rows.ids[first.first]], [first.rows.targets[first.first]], [first.rows.inputs[first.first]])
    return [Part(first.adapter, rows, 0, 1, first.loss, first.config)], [], True


def run_pass(base: Any, parts: list, backward: bool) -> list:
    """passes.run_pass over all ranks: the same results and the same gradients on every rank."""
    ranks: Ranks = base.ranks
    local, where, stand_in = _local_parts(parts, ranks)
    rows = layout(local, base.device.device)
    local_index = [] if stand_in else sorted({i for i, _ in where})  # global index of each local part
    with torch.set_grad_enabled(backward), base.training_pass(backward), base.router.route(rows.segments):
        with base.device.autocast():
            # Embeddings that ask for a gradient: every rank then runs every layer's backward (and its all-gather),
            # whichever adapters its rows use.
            embeds = base.decoder.embed_tokens(rows.input_ids).detach().requires_grad_(backward)
            hidden = base.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
            scored = score_parts(base, local, rows, hidden)
        sums = torch.zeros(len(parts), dtype=torch.float64)
        for index, (result, _) in zip(local_index, scored):
            sums[index] = result.loss
        totals = ranks.all_reduce(sums).tolist()
        finite = [loss for index, (_, loss) in zip(local_index, scored) if torch.isfinite(torch.tensor(totals[index]))]
        if backward:
            anchor = hidden.float().sum() * 0.0  # zero gradient, but through every layer
            (sum(finite) + anchor if finite else anchor).backward()
            _reduce_gradients(ranks, parts)
    gathered = ranks.gather([(i, j, r.logprobs[k], r.losses[k]) for (i, j), (r, k) in zip(where, _rows_of(scored))])
    results = []
    for index, part in enumerate(parts):
        n = part.last - part.first
        lp: list[np.ndarray | None] = [None] * n
        el: list[np.ndarray | None] = [None] * n
        for share in gathered:
            for i, j, row_lp, row_el in share:
                if i == index:
                    lp[j], el[j] = row_lp, row_el
        total = totals[index]
        error = None
        if not torch.isfinite(torch.tensor(total)):
            error = InvalidArgumentError("data: the loss is not finite for these inputs (check logprobs/advantages)")
        # every row was scored on one rank, so the gather filled every slot
        results.append(PartResult(cast(list[np.ndarray], lp), cast(list[np.ndarray], el), float(total), error))
    return results


def _rows_of(scored: list) -> list[tuple[Any, int]]:
    """(the part's result, row in it) of each local row, in order."""
    return [(result, k) for result, _ in scored for k in range(len(result.logprobs))]


def _reduce_gradients(ranks: Ranks, parts: list) -> None:
    """Sum every involved adapter's gradient over the ranks (in one all-reduce)."""
    params, seen = [], set()
    for part in parts:
        if id(part.adapter) not in seen:
            seen.add(id(part.adapter))
            params += part.adapter.parameters()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = ranks.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
