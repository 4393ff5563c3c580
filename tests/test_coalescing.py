"""The multi-LoRA engine in-process: requests of many models on one base run as shared passes, and each gets
exactly what it would get alone. Passes are counted by the engine's Prometheus metrics, not inferred from timing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from bios import types, wire
from bios.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from bios.v1 import train_pb2
from train_service import passes, worker
from train_service.checkpoints import CheckpointStore
from train_service.engine import Engine
from train_service.sampler import SampleRequest, SamplingOptions
from train_service.scheduler import Limits, SampleWork
from train_service.sessions import SessionManager

MODEL = "ultrasafe/usf-mini"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    return SessionManager(CheckpointStore(tmp_path_factory.mktemp("ckpt")))


def new_model(sessions, seed: int, rank: int = 4, name: str = MODEL):
    session = sessions.create_session({}, "t")
    entry, base, lora = sessions.prepare_model(
        session.session_id, "t", name, types.LoraConfig(rank=rank, seed=seed), ""
    )
    model = sessions.create_model(session.session_id, "t", entry, base, lora, "", False)
    with torch.no_grad():  # B away from zero, so every adapter computes something different
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 100)) * 0.05)
    return model


def fb_input(seed: int, lengths=(12, 7), loss_fn: str = "cross_entropy", **inputs) -> train_pb2.ForwardBackwardInput:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        ids = rng.integers(0, 150_000, n + 1)
        fields = {"target_tokens": ids[1:].tolist(), "weights": rng.random(n).astype(np.float32)}
        fields.update({k: np.full(n, v, np.float32) for k, v in inputs.items()})
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()), loss_fn_inputs=fields))
    return train_pb2.ForwardBackwardInput(data=[wire.datum_to_pb(d) for d in data], loss_fn=loss_fn)


def pass_counts(kind: str = "forward_backward") -> tuple[float, float]:
    """(passes so far, requests those passes held)."""
    return (
        REGISTRY.get_sample_value("bios_train_passes_total", {"kind": kind}) or 0.0,
        REGISTRY.get_sample_value("bios_train_pass_requests_sum", {"kind": kind}) or 0.0,
    )


class Held:
    """Keeps the engine thread busy until released, so work can be queued in a known order."""

    def __init__(self, engine: Engine):
        self.gate, started = threading.Event(), threading.Event()
        engine.submit("gate", lambda: (started.set(), self.gate.wait(30)))
        started.wait(30)

    def release(self) -> None:
        self.gate.set()


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def clear(model) -> None:
    for p in model.parameters():
        p.grad = None
    model.has_gradient = False


def outputs(event) -> tuple[float, list[np.ndarray]]:
    out = wire.forward_backward_from_pb(event)
    return out.metrics["loss:sum"], [np.array(o["logprobs"].data) for o in out.loss_fn_outputs]


def assert_close_grads(got, want, rtol=1e-5):
    """Gradients equal up to float32 summation order: relative to the gradient's norm, per tensor."""
    for g, w in zip(got, want):
        assert float(torch.linalg.vector_norm(g - w)) <= rtol * float(torch.linalg.vector_norm(w)), (g - w).abs().max()


def assert_same(a, b, rtol=1e-5):
    (loss_a, lp_a), (loss_b, lp_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=rtol)
    for x, y in zip(lp_a, lp_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-5)


def alone(engine, model, request, backward=True):
    """The request run by itself (nothing else queued), with its gradient."""
    clear(model)
    event = engine.submit(model.model_id, model.forward_work(request, backward, engine.limits)).result(60)
    result = outputs(event), grads(model)
    clear(model)
    return result


def test_requests_of_many_models_share_one_pass_and_each_equals_its_own_pass(sessions):
    engine = Engine()
    try:
        models = [new_model(sessions, seed) for seed in range(4)]
        requests = [fb_input(seed, lengths=(5 + 3 * seed, 11)) for seed in range(4)]
        expected = [alone(engine, m, r) for m, r in zip(models, requests)]

        before = pass_counts()
        held = Held(engine)
        futures = [engine.submit(m.model_id, m.forward_work(r, True, engine.limits)) for m, r in zip(models, requests)]
        held.release()
        results = [outputs(f.result(60)) for f in futures]
        after = pass_counts()
        assert after[0] - before[0] == 1  # one pass over the base ...
        assert after[1] - before[1] == 4  # ... holding all four requests
        for m, result, (want, want_grads) in zip(models, results, expected):
            assert_same(result, want)
            assert_close_grads(grads(m), want_grads)
    finally:
        engine.stop(10)


def test_each_models_submission_order_is_kept(sessions):
    """A: fb, optim, fb; B: fb, fb, optim, fb -- all queued at once. Each model's operations run in its own order
    (A's second forward_backward sees A's update; B's two first ones accumulate), and every result equals the
    same sequence run alone, one operation at a time."""
    opt = train_pb2.OptimStepRequest(adam_params=wire.adam_params_to_pb(types.AdamParams(learning_rate=1e-2)))
    scripts = {10: [1, "opt", 2], 11: [3, 4, "opt", 5]}

    def run(engine, model, script, wait: bool):
        futures = []
        for op in script:
            work = (
                (lambda: model.optim_step(opt))
                if op == "opt"
                else model.forward_work(fb_input(op), True, engine.limits)
            )
            futures.append(engine.submit(model.model_id, work))
            if wait:
                futures[-1].result(60)
        return futures

    engine = Engine()
    try:
        expected = {
            seed: [f.result() for f in run(engine, new_model(sessions, seed), script, wait=True)]
            for seed, script in scripts.items()
        }
        models = {seed: new_model(sessions, seed) for seed in scripts}  # the same seeds: the same starting weights
        before = pass_counts()
        held = Held(engine)
        futures = {seed: run(engine, models[seed], script, wait=False) for seed, script in scripts.items()}
        held.release()
        for seed in scripts:
            for got, want in zip([f.result(60) for f in futures[seed]], expected[seed]):
                if isinstance(want, train_pb2.ForwardBackwardOutput):
                    assert_same(outputs(got), outputs(want))
                else:
                    assert got.step == want.step
                    assert got.metrics["grad_norm"] == pytest.approx(want.metrics["grad_norm"], rel=1e-5)
        a = [f.result() for f in futures[10]]
        assert outputs(a[0])[0] != pytest.approx(outputs(a[2])[0], rel=1e-3)  # A's update happened in between
        assert pass_counts()[1] - before[1] == 5 and pass_counts()[0] - before[0] < 5  # 5 requests, some shared a pass
    finally:
        engine.stop(10)


def test_a_request_bigger_than_a_pass_is_split_and_others_run_between(sessions):
    engine = Engine(Limits(max_pass_tokens=64))
    try:
        big_model, small_model = new_model(sessions, 20), new_model(sessions, 21)
        big = fb_input(5, lengths=(20,) * 10)  # 200 tokens, at most 3 rows of 20 per pass
        small = fb_input(6, lengths=(8,))
        whole = Engine(Limits(max_pass_tokens=1024))
        try:
            expected = alone(whole, big_model, big)
        finally:
            whole.stop(10)
        before = pass_counts()
        order = []
        held = Held(engine)
        f_big = engine.submit(big_model.model_id, big_model.forward_work(big, True, engine.limits))
        f_small = engine.submit(small_model.model_id, small_model.forward_work(small, True, engine.limits))
        f_big.add_done_callback(lambda _: order.append("big"))
        f_small.add_done_callback(lambda _: order.append("small"))
        held.release()
        result = outputs(f_big.result(60))
        f_small.result(60)
        assert pass_counts()[0] - before[0] >= 4
        assert order == ["small", "big"]  # the small request did not wait for all of the big one
        assert_same(result, expected[0])
        assert_close_grads(grads(big_model), expected[1])
    finally:
        engine.stop(10)


def test_a_non_finite_part_fails_alone_and_leaves_no_gradient(sessions):
    engine = Engine()
    try:
        good, bad = new_model(sessions, 30), new_model(sessions, 31)
        request = fb_input(7)
        expected = alone(engine, good, request)
        poison = fb_input(8, loss_fn="importance_sampling", logprobs=-1e4, advantages=1.0)  # exp(logp + 1e4) = inf
        engine.submit(bad.model_id, bad.forward_work(fb_input(9), True, engine.limits)).result(60)
        bad_before = grads(bad)
        held = Held(engine)
        f_good = engine.submit(good.model_id, good.forward_work(request, True, engine.limits))
        f_bad = engine.submit(bad.model_id, bad.forward_work(poison, True, engine.limits))
        held.release()
        assert_same(outputs(f_good.result(60)), expected[0])
        with pytest.raises(InvalidArgumentError, match="loss is not finite"):
            f_bad.result(60)
        for g, w in zip(grads(bad), bad_before):  # the earlier gradient, untouched
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    finally:
        engine.stop(10)


def test_out_of_memory_retries_alone_then_refuses_only_that_request(sessions, monkeypatch):
    engine = Engine()
    try:
        a, b = new_model(sessions, 40), new_model(sessions, 41)
        ra, rb = fb_input(10), fb_input(11, lengths=(30,))
        expected = [alone(engine, a, ra), alone(engine, b, rb)]
        real = passes.run_pass

        def fake(base, parts, backward):  # a device too small for two requests at once, or for B's 30 tokens
            if len(parts) > 1 or max(len(p.rows.ids[p.first]) for p in parts) >= 30:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return real(base, parts, backward)

        monkeypatch.setattr(passes, "run_pass", fake)
        held = Held(engine)
        fa = engine.submit(a.model_id, a.forward_work(ra, True, engine.limits))
        fb = engine.submit(b.model_id, b.forward_work(rb, True, engine.limits))
        held.release()
        assert_same(outputs(fa.result(60)), expected[0][0])
        with pytest.raises(ResourceExhaustedError, match="out of memory"):
            fb.result(60)
        assert all(p.grad is None for p in b.parameters())
        monkeypatch.setattr(passes, "run_pass", real)
        clear(a)
        assert_same(
            outputs(engine.submit(b.model_id, b.forward_work(rb, True, engine.limits)).result(60)), expected[1][0]
        )  # the session keeps working
    finally:
        engine.stop(10)


def test_samples_of_many_adapters_decode_together_as_if_alone(sessions):
    engine = Engine()
    try:
        models = [new_model(sessions, 50 + i) for i in range(3)]
        prompts = [[1000, 2000, 3000, 4000, 5000], [7, 8], [42] * 9]
        params = [
            types.SamplingParams(max_tokens=6, temperature=1.0, seed=5),
            types.SamplingParams(max_tokens=4, temperature=0.0),
            types.SamplingParams(max_tokens=8, temperature=0.7, top_k=50, seed=9),
        ]
        counts = [2, 1, 3]

        def work(i):
            options = SamplingOptions.from_pb(wire.sampling_params_to_pb(params[i]))
            request = SampleRequest(
                prompts[i],
                options,
                counts[i],
                models[i].adapter,
                sessions.tokenizer(models[i].entry),
                include_prompt_logprobs=True,
            )
            return SampleWork(models[i].base, request)

        expected = [engine.submit(m.model_id, work(i)).result(60) for i, m in enumerate(models)]
        rows_before = REGISTRY.get_sample_value("bios_train_decode_rows_sum") or 0.0
        steps_before = REGISTRY.get_sample_value("bios_train_decode_steps_total") or 0.0
        held = Held(engine)
        futures = [engine.submit(m.model_id, work(i)) for i, m in enumerate(models)]
        held.release()
        results = [f.result(60) for f in futures]
        steps = REGISTRY.get_sample_value("bios_train_decode_steps_total") - steps_before
        rows = REGISTRY.get_sample_value("bios_train_decode_rows_sum") - rows_before
        assert steps == 8  # the longest request's 8 steps: the others decoded in the same steps
        assert rows == 6 * 4 + 5 * 2 + 3 * 2  # 6 rows for 4 steps, 5 (one request done) for 2, 3 for the last 2
        for got, want in zip(results, expected):
            assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
            for s, t in zip(got.sequences, want.sequences):
                np.testing.assert_allclose(s.logprobs, t.logprobs, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], rtol=1e-5, atol=1e-5)
    finally:
        engine.stop(10)


def test_deleting_a_model_fails_its_queued_work_only(sessions):
    engine = Engine()
    try:
        keep, gone = new_model(sessions, 60), new_model(sessions, 61)
        expected = alone(engine, keep, fb_input(12))
        held = Held(engine)
        f_gone = [engine.submit(gone.model_id, gone.forward_work(fb_input(13), True, engine.limits)) for _ in range(3)]
        f_keep = engine.submit(keep.model_id, keep.forward_work(fb_input(12), True, engine.limits))
        engine.drop(gone.model_id, NotFoundError(f"model_id: model {gone.model_id} was deleted"))
        held.release()
        for f in f_gone:
            with pytest.raises(NotFoundError, match="was deleted"):
                f.result(60)
        assert_same(outputs(f_keep.result(60)), expected[0])
    finally:
        engine.stop(10)


def test_limits_are_refused_naming_the_limit(sessions):
    model = new_model(sessions, 70)
    limits = Limits(max_request_tokens=100, max_pass_tokens=40)
    with pytest.raises(ResourceExhaustedError, match=r"max_request_tokens \(100\)"):
        model.forward_work(fb_input(1, lengths=(30, 30, 30, 30)), True, limits)
    with pytest.raises(ResourceExhaustedError, match=r"data\[0\].model_input: 50 tokens exceed max_pass_tokens \(40\)"):
        model.forward_work(fb_input(1, lengths=(50,)), True, limits)
    with pytest.raises(InvalidArgumentError, match=r"data\[1\].model_input: 5000 tokens exceed the model context"):
        model.forward_work(fb_input(1, lengths=(3, 5000)), True, Limits(max_pass_tokens=10_000))


def test_pass_plan_runs_without_an_engine(sessions):
    """The worker runs a plan directly (what the benchmarks' in-process baseline does)."""
    model = new_model(sessions, 80)
    work = model.forward_work(fb_input(3), False, Limits())
    from train_service.scheduler import PassPlan

    answered = worker.run_plan(PassPlan(False, [(work, 0, len(work.rows))]))
    assert answered == [work] and work.future.result().metrics["tokens:sum"] == 19


def test_activation_checkpointing_gives_the_same_results_and_gradients():
    """--activation-checkpointing recomputes decoder layers in backward: same numbers, and sampling (which
    needs the KV cache that checkpointing would drop) still works on the same base."""
    from render_service.model_registry import resolve
    from train_service.device import DeviceConfig
    from train_service.losses import get_loss
    from train_service.models import BaseModelPool
    from train_service.sampler import DecodeGroup

    results = {}
    for checkpointing in (False, True):
        base = BaseModelPool(DeviceConfig.resolve("cpu", checkpointing)).get(resolve(MODEL))
        adapter = base.new_adapter("ac", base.peft_config(types.LoraConfig(rank=4, seed=1)), seed=1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        loss, _ = get_loss("cross_entropy", {})
        work = SessionsFree.rows(fb_input(4))
        out = passes.run_pass(base, [passes.Part(adapter, work, 0, len(work), loss, {})], backward=True)[0]
        group = DecodeGroup(
            base, [SampleWork(base, SampleRequest([1, 2, 3], SamplingOptions(max_tokens=3, seed=1), 2, adapter, None))]
        )
        while group.active:
            group.step()
        results[checkpointing] = (out.loss, [p.grad.clone() for p in adapter.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert_close_grads(results[True][1], results[False][1], rtol=1e-6)


class SessionsFree:
    """Request data decoded without a session (for tests on a bare base model)."""

    @staticmethod
    def rows(request):
        from train_service.data import decode_data

        return decode_data(list(request.data), 151936, ("weights",), 4096, Limits())


def test_device_resolution():
    from bios.errors import InvalidArgumentError as Invalid
    from train_service.device import DeviceConfig

    auto = DeviceConfig.resolve("auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = DeviceConfig.resolve("cpu")
    assert (cpu.dtype, cpu.dtype_name, cpu.describe()) == (torch.float32, "float32", "cpu")
    with pytest.raises(Invalid, match="device: expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        DeviceConfig.resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(Invalid, match="device: cuda:1 requested but CUDA is not available"):
            DeviceConfig.resolve("cuda:1")
