"""RenderedTokens: runs and per-token lists are two views of one attribution, and the wire keeps it whole."""

from __future__ import annotations

import random

import pytest

from bios import wire
from bios.rendered import AttributionRun, RenderedTokens
from bios.v1 import render_pb2


def random_runs(rng: random.Random) -> list[AttributionRun]:
    runs = []
    for _ in range(rng.randint(0, 12)):
        index = rng.randint(-1, 4)
        role = None if index < 0 else ["system", "user", "assistant", "tool", "user"][index]
        runs.append(AttributionRun(rng.randint(0, 5), index, role, rng.random() < 0.5, rng.random() < 0.5))
    return runs


def as_lists(runs):
    out = ([], [], [], [])
    for n, index, role, sampled, content in runs:
        for lst, value in zip(out, (index, role, sampled, content)):
            lst += [value] * n
    return out


def test_runs_and_lists_agree():
    rng = random.Random(0)
    for _ in range(300):
        runs = random_runs(rng)
        n = sum(r.length for r in runs)
        ids = [rng.randrange(1000) for _ in range(n)]
        lazy = RenderedTokens.from_runs(ids, runs)
        eager = RenderedTokens(ids, *as_lists(runs))
        assert lazy == eager and eager == lazy
        assert (lazy.message_indices, lazy.message_roles, lazy.sampled_mask, lazy.is_content) == as_lists(runs)
        assert lazy.runs == eager.runs and as_lists(eager.runs) == as_lists(runs)
        assert all(r.length > 0 for r in eager.runs)
        assert all(a[1:] != b[1:] for a, b in zip(eager.runs, eager.runs[1:]))  # maximal
        values = [rng.random() for _ in eager.runs]
        assert eager.per_token(values) == lazy.per_token(values)
        assert eager.content_token_spans_by_role() == RenderedTokens(ids, *as_lists(runs)).content_token_spans_by_role()


def test_content_spans_and_masks():
    rendered = RenderedTokens.from_runs(
        list(range(9)),
        [
            AttributionRun(2, -1, None, False, False),
            AttributionRun(2, 0, "user", False, True),
            AttributionRun(1, 1, "assistant", False, False),
            AttributionRun(2, 1, "assistant", True, True),
            AttributionRun(1, 1, "assistant", False, True),
            AttributionRun(1, 2, "tool", False, True),
        ],
    )
    assert rendered.content_token_spans_by_role() == {"user": [(2, 4)], "assistant": [(5, 8)], "tool": [(8, 9)]}
    assert rendered.content_mask_for_roles({"tool", "user"}) == [False] * 2 + [True] * 2 + [False] * 4 + [True]


def test_per_token_lists_can_be_edited():
    rendered = RenderedTokens.from_runs([1, 2, 3], [AttributionRun(3, 0, "user", False, True)])
    rendered.sampled_mask[1] = True
    rendered.token_ids += [4]
    rendered.message_indices += [-1]
    rendered.message_roles += [None]
    rendered.sampled_mask += [False]
    rendered.is_content += [False]
    assert rendered.runs == [
        AttributionRun(1, 0, "user", False, True),
        AttributionRun(1, 0, "user", True, True),
        AttributionRun(1, 0, "user", False, True),
        AttributionRun(1, -1, None, False, False),
    ]


def test_runs_must_cover_the_ids():
    with pytest.raises(ValueError, match="cover 2 tokens"):
        RenderedTokens.from_runs([1, 2, 3], [AttributionRun(2, 0, "user", False, True)])


def test_wire_round_trip_and_bad_runs():
    rng = random.Random(1)
    for _ in range(100):
        runs = random_runs(rng)
        rendered = RenderedTokens.from_runs(list(range(sum(r.length for r in runs))), runs)
        pb = render_pb2.RenderedTokens.FromString(wire.rendered_to_pb(rendered).SerializeToString())
        assert wire.rendered_from_pb(pb) == rendered
        assert len(pb.run_lengths) == len(rendered.runs)
    for lengths, indices, flags in (
        ([5], [0], [True]),
        ([1], [3], [True]),
        ([-1, 2], [0, 0], [True, False]),
        ([1], [-2], [True]),
        ([1], [0], [True, False]),
    ):
        pb = render_pb2.RenderedTokens(
            token_ids=[1],
            roles=["user"],
            run_lengths=lengths,
            run_message_indices=indices,
            run_sampled=flags,
            run_is_content=flags[:1],
        )
        with pytest.raises(wire.WireError, match="run"):
            wire.rendered_from_pb(pb)
    example = render_pb2.SupervisedExample(
        tokens=render_pb2.RenderedTokens(
            token_ids=[1, 2, 3],
            roles=["user"],
            run_lengths=[3],
            run_message_indices=[0],
            run_sampled=[False],
            run_is_content=[True],
        ),
        run_weights=[1.0, 0.0],
    )
    with pytest.raises(wire.WireError, match="run_weights"):
        wire.supervised_from_pb(example)
