"""The bad-input matrix (bad_inputs.py, run by matrix.py) against real servers on loopback: every case its status
and field, and both services answering a good request exactly as before after each one."""

from __future__ import annotations

import bad_inputs
import grpc
import pytest
from bad_inputs import cases
from matrix import Matrix, passed


@pytest.fixture(scope="module")
def matrix():
    running = Matrix()
    yield running
    running.close()


def test_the_matrix_covers_both_services():
    all_cases = cases()
    assert len(all_cases) >= 150
    assert len({c.id for c in all_cases}) == len(all_cases), "case ids must be unique (they name the doc rows)"
    by_service = {s: [c for c in all_cases if c.service == s] for s in ("render", "train")}
    assert min(len(v) for v in by_service.values()) >= 60
    assert all(c.field for c in all_cases if c.code != grpc.StatusCode.OK), "every refusal names what is wrong"


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c.service}-{c.id}")
def test_case(matrix, case):
    code, message, still_serving = matrix.run(case)
    assert passed(case, code, message, still_serving), (code, message, still_serving)
    assert "internal error" not in message


def test_missing_and_forbidden_names_look_the_same(matrix):
    """A caller cannot tell an existing server directory from a missing one: only the echoed name differs."""
    stub = matrix.render_stub

    def details(name: str) -> str:
        with pytest.raises(grpc.RpcError) as info:
            stub.Render(bad_inputs.render(tokenizer=name), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        return info.value.details().replace(repr(name), "NAME")

    existing = [matrix.ctx.tokenizer_dir, "/etc", "/", str(matrix.tmp)]
    missing = [matrix.ctx.tokenizer_dir + "-nope", "/etc/nope", "/nope", "no/such-model"]
    assert len({details(name) for name in existing + missing}) == 1


def test_the_embedded_default_allows_local_paths(matrix):
    """The operator's allowance: the same directory name resolves when local paths are allowed."""
    from render_service.batch import renderer_for

    spec = bad_inputs.spec(tokenizer=matrix.ctx.tokenizer_dir)
    assert renderer_for(spec, allow_local_paths=True).render([{"role": "user", "content": "Hi"}]).token_ids
