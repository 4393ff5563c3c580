"""Many sessions on one shared base model, through the client against real servers on loopback: every session's
losses, logprobs, samples and errors equal the same session run alone (fp32 CPU, 1e-5: a pass shared with other
rows sums in another order, ~2e-6 after a few Adam steps), whatever the order in
which the sessions' operations arrive, whoever else shares their passes, and whatever the others do (train, get
deleted, drive themselves into refused, non-finite steps).

Each session runs a fixed script of steps; the outcome of every step is recorded. The reference is the same
script on a fresh model with the same seed, with no other session active."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any, Callable

import pytest

import bios
from bios import types
from bios.errors import BiosError
from bios.futures import LoopThread
from bios_cookbook import renderers
from bios_server.auth import ApiKeys

CONVS = {
    "a": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}],
    "b": [{"role": "user", "content": "Name a colour, please."}, {"role": "assistant", "content": "Teal."}],
    "c": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend."}],
}
MODELS = {"a": "ultrasafe/usf-mini", "b": "ultrasafe/usf-conversation", "c": "ultrasafe/usf-mini"}  # one base
SEEDS = {"a": 1, "b": 2, "c": 3}


@pytest.fixture(scope="module")
def data(qwen3_tokenizer):
    renderer = renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    out = {}
    for name, conv in CONVS.items():
        tokens, weights = renderer.build_supervised_example(conv)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
        )
        out[name] = ([datum], renderer.build_generation_prompt(conv[:1]))
    return out


def outcome(fn: Callable[[], Any]) -> Any:
    """A step's result, or the status of its error (errors are outcomes too)."""
    try:
        return fn()
    except BiosError as exc:
        return ("error", type(exc).__name__, str(exc).split(":")[1] if ":" in str(exc) else "")


def fwd(tc, d):
    out = tc.forward(d).result()
    return ("forward", out.metrics["loss:sum"], out.loss_fn_outputs[0]["logprobs"].data)


def train(tc, d, **adam):
    fb = tc.forward_backward(d)
    opt = tc.optim_step(types.AdamParams(**{"learning_rate": 5e-3, **adam}))
    return ("train", outcome(lambda: fb.result().metrics["loss:sum"]), outcome(lambda: opt.result().step))


def sample(tc, prompt, seed):
    out = tc.sample(prompt, types.SamplingParams(max_tokens=6, temperature=1.0, seed=seed), num_samples=2).result()
    return ("sample", [s.tokens for s in out.sequences], [s.logprobs for s in out.sequences])


def script(name: str, tc, data) -> list[Callable[[], Any]]:
    d, prompt = data[name]
    return [
        lambda: fwd(tc, d),
        lambda: train(tc, d),
        lambda: sample(tc, prompt, 7),
        lambda: train(tc, d),
        lambda: train(tc, d),
        lambda: fwd(tc, d),
        lambda: sample(tc, prompt, 8),
        lambda: fwd(tc, d),
    ]


def poisoned_script(tc, data) -> list[Callable[[], Any]]:
    """A session that asks for a step that would make its weights non-finite (refused), one with eps=0 (refused),
    then one with a learning rate (1e20) so large that its weights become huge: from then on its losses are not
    finite, so its forwards and samples are refused. None of it may show in the other sessions."""
    d, prompt = data["b"]
    return [
        lambda: fwd(tc, d),
        lambda: train(tc, d),
        lambda: fwd(tc, d),
        lambda: train(tc, d, learning_rate=3e38, weight_decay=1.0),
        lambda: fwd(tc, d),
        lambda: train(tc, d, eps=0.0),
        lambda: fwd(tc, d),
        lambda: train(tc, d),
        lambda: train(tc, d, learning_rate=1e20),
        lambda: fwd(tc, d),
        lambda: train(tc, d),
        lambda: sample(tc, prompt, 3),
    ]


def new_client(client, name: str):
    return client.create_lora_training_client(base_model=MODELS[name], rank=8, seed=SEEDS[name])


def run_alone(client, name: str, data, make=script) -> list[Any]:
    tc = new_client(client, name)
    steps = make(name, tc, data) if make is script else make(tc, data)
    return [outcome(step) for step in steps]


def assert_same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _same(g, w)


def _same(g: Any, w: Any) -> None:
    if isinstance(w, float):
        assert isinstance(g, float) and (g == pytest.approx(w, rel=1e-5, abs=1e-5) or (math.isnan(g) and math.isnan(w)))
    elif isinstance(w, (list, tuple)):
        assert type(g) is type(w) and len(g) == len(w), (g, w)
        for x, y in zip(g, w):
            _same(x, y)
    else:
        assert g == w


def interleave(order: str, scripts: dict[str, list[Callable[[], Any]]]) -> dict[str, list[Any]]:
    """Run the scripts' steps one at a time in `order` (e.g. "abba", repeated until every script is done)."""
    results: dict[str, list[Any]] = {name: [] for name in scripts}
    cursor = dict.fromkeys(scripts, 0)
    while any(cursor[n] < len(s) for n, s in scripts.items()):
        for name in order:
            if cursor[name] < len(scripts[name]):
                results[name].append(outcome(scripts[name][cursor[name]]))
                cursor[name] += 1
    return results


@pytest.fixture(scope="module")
def alone(client, data):
    return {name: run_alone(client, name, data) for name in CONVS}


@pytest.mark.parametrize("order", ["abab", "bbaa", "abba"])
def test_interleaved_orders_equal_each_session_alone(client, data, alone, order):
    tcs = {name: new_client(client, name) for name in "ab"}  # both models exist before either works
    results = interleave(order, {name: script(name, tcs[name], data) for name in "ab"})
    for name in "ab":
        assert_same(results[name], alone[name])


def test_concurrent_clients_under_asyncio_gather(services, data, alone):
    """Two ServiceClients, each driving its session with the async API, on one event loop at once."""
    render_address, train_address, _ = services
    clients = {n: bios.ServiceClient(train_address=train_address, render_address=render_address) for n in "abc"}

    async def run(name: str) -> list[Any]:
        tc = new_client(clients[name], name)
        d, prompt = data[name]
        out = []
        for kind in ("fwd", "train", "sample", "train", "train", "fwd", "sample", "fwd"):
            if kind == "fwd":
                result = await (await tc.forward_async(d))
                out.append(("forward", result.metrics["loss:sum"], result.loss_fn_outputs[0]["logprobs"].data))
            elif kind == "train":
                fb = await tc.forward_backward_async(d)
                opt = await tc.optim_step_async(types.AdamParams(learning_rate=5e-3))
                out.append(("train", (await fb).metrics["loss:sum"], (await opt).step))
            else:
                seed = 7 if sum(1 for o in out if o[0] == "sample") == 0 else 8
                params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=seed)
                result = await (await tc.sample_async(prompt, params, num_samples=2))
                out.append(("sample", [s.tokens for s in result.sequences], [s.logprobs for s in result.sequences]))
        return out

    async def both():
        return await asyncio.gather(*(run(n) for n in "abc"))

    try:
        results = asyncio.run(both())
    finally:
        for c in clients.values():
            c.close()
    for name, got in zip("abc", results):
        assert_same(got, alone[name])


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory):
    from render_service import server as render_server
    from train_service import server as train_server

    keys = ApiKeys({"key-a": "tenant-a", "key-b": "tenant-b"})
    loop = LoopThread.named("test-isolation-tenants")
    render = loop.run(render_server.start("127.0.0.1", 0, keys))
    train = loop.run(train_server.start("127.0.0.1", 0, str(tmp_path_factory.mktemp("ckpt")), keys, device="cpu"))
    yield f"127.0.0.1:{render.port}", f"127.0.0.1:{train.port}"
    loop.run(render.stop(None))
    loop.run(train.stop(None))


def test_two_tenants_in_threads_equal_each_alone(two_tenants, data, alone):
    render_address, train_address = two_tenants
    clients = {
        n: bios.ServiceClient(train_address=train_address, render_address=render_address, api_key=f"key-{n}")
        for n in "ab"
    }
    results: dict[str, list[Any]] = {}
    tcs = {n: new_client(clients[n], n) for n in "ab"}

    def run(name: str) -> None:
        results[name] = [outcome(step) for step in script(name, tcs[name], data)]

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for name in "ab":
        assert_same(results[name], alone[name])
    # and neither tenant can reach the other's model
    with pytest.raises(bios.NotFoundError):
        clients["a"]._get_info(tcs["b"].model_id)
    for c in clients.values():
        c.close()


def test_a_model_deleted_between_steps(client, data, alone):
    a, b = new_client(client, "a"), new_client(client, "b")
    steps_a, steps_b = script("a", a, data), script("b", b, data)
    got_a = [outcome(steps_a[0])]
    outcome(steps_b[0])
    got_a.append(outcome(steps_a[1]))
    d_b = data["b"][0]
    queued = [b.forward_backward(d_b) for _ in range(3)]  # still queued or running when b goes away
    b.delete()
    got_a += [outcome(step) for step in steps_a[2:]]
    assert_same(got_a, alone["a"])
    for future in queued:  # each either ran before the delete or failed with NOT_FOUND; none hangs
        result = outcome(lambda f=future: f.result(60).metrics["loss:sum"])
        assert isinstance(result, float) or result[:2] == ("error", "NotFoundError"), result
    assert outcome(lambda: b.forward(d_b).result())[:2] == ("error", "NotFoundError")


def test_a_session_driven_to_refused_non_finite_steps(client, data, alone):
    poisoned = run_alone(client, "b", data, make=poisoned_script)
    # the refusals are what this test is about: check that they happened, and changed nothing
    assert poisoned[3][2][:2] == ("error", "InvalidArgumentError")  # the update would be non-finite
    assert_same(poisoned[4], poisoned[2])  # ... so the weights are as they were
    assert poisoned[5][2][:2] == ("error", "InvalidArgumentError")  # eps = 0
    assert_same(poisoned[6], poisoned[2])
    assert isinstance(poisoned[8][2], int)  # lr 1e20: finite, taken
    assert poisoned[9][:2] == ("error", "InvalidArgumentError")  # ... and now the loss is not finite
    assert poisoned[10][1][:2] == ("error", "InvalidArgumentError")
    assert poisoned[10][2][:2] == ("error", "FailedPreconditionError")  # no gradient to apply
    assert poisoned[11][:2] == ("error", "FailedPreconditionError")  # no finite logits to sample from
    a, b = new_client(client, "a"), new_client(client, "b")
    results = interleave("ab", {"a": script("a", a, data), "b": poisoned_script(b, data)})
    assert_same(results["a"], alone["a"])
    assert_same(results["b"], poisoned)
