"""The real tinker 0.38 SDK against the gateway (tinker_gateway/), each result checked against the same calls
made through the bios client on the same train service; the wire protocol's edges with raw HTTP."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import zstandard
from tinker_stack import MODEL, apply_environment, start_stack, tinker_environment, write_registry

import bios
from bios import types as btypes
from bios.futures import LoopThread
from bios_server.auth import ApiKeys

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402

pytestmark = pytest.mark.timeout(600)
TOL = dict(rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tinker")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOS_MODEL_REGISTRY", str(write_registry(directory)))
        loop = LoopThread.named("tinker-gateway-tests")
        # compress_fwdbwd: the SDK then sends forward_backward zstd-compressed, as Tinker's servers ask it to
        train, gateway = start_stack(loop, str(directory / "checkpoints"), compress_fwdbwd=True)
        base_url = f"http://127.0.0.1:{gateway.port}"
        apply_environment(mp, tinker_environment(directory, base_url))
        client = bios.ServiceClient(train_address=f"127.0.0.1:{train.port}")
        yield SimpleNamespace(base_url=base_url, bios=client, gateway=gateway.app.gateway)
        client.close()
        loop.run(gateway.stop())
        loop.run(train.stop(None, checkpoint=False))


def make_data(tokenizer, texts):
    """The same examples as Tinker datums and as bios datums."""
    tinker_data, bios_data = [], []
    for text in texts:
        ids = tokenizer.encode(text)
        inputs = {"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}
        tinker_data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs))
        bios_data.append(btypes.Datum(model_input=btypes.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs))
    return tinker_data, bios_data


def assert_same_output(tinker_out, bios_out):
    assert tinker_out.metrics["loss:sum"] == pytest.approx(bios_out.metrics["loss:sum"], **TOL)
    for t, b in zip(tinker_out.loss_fn_outputs, bios_out.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(t["logprobs"].to_numpy(), b["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5)


def square_loss(data, logprobs):
    loss = sum((lp**2).sum() for lp in logprobs) / 100
    return loss, {"custom/square:sum": float(loss.detach())}


def test_sdk_contract_matches_the_bios_client(stack):
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=3, train_unembed=False).result()
    bc = stack.bios.create_lora_training_client(base_model=MODEL, rank=8, seed=3)
    tokenizer = tc.get_tokenizer()
    data, bdata = make_data(tokenizer, ["The gateway speaks Tinker.", "Bios keeps the contract in protobuf, always."])
    adam = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)

    # forward_backward -> optim_step: same loss, logprobs and gradient norm
    t_fb, t_opt = tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(**adam))
    b_fb, b_opt = bc.forward_backward(bdata, "cross_entropy"), bc.optim_step(btypes.AdamParams(**adam))
    assert_same_output(t_fb.result(), b_fb.result())
    assert set(t_fb.result().metrics) >= {"loss:sum"} and all(k.count(":") == 1 for k in t_fb.result().metrics)
    assert t_opt.result().metrics["grad_norm:mean"] == pytest.approx(b_opt.result().metrics["grad_norm"], **TOL)
    assert all(k.count(":") == 1 for k in t_opt.result().metrics)

    # save_state: a tinker:// path over our bios:// one
    state = tc.save_state("contract", user_metadata={"purpose": "test"}).result()
    bstate = bc.save_state("contract").result()
    assert state.path == f"tinker://{tc.model_id}/weights/contract"
    listed = tinker.RestClient().list_checkpoints(tc.model_id).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type, c.user_metadata) for c in listed] == [
        ("weights/contract", "training", {"purpose": "test"})
    ]

    # the updated weights: same forward
    assert_same_output(tc.forward(data, "cross_entropy").result(), bc.forward(bdata, "cross_entropy").result())

    # save_weights_and_get_sampling_client -> sample + compute_logprobs (greedy, so deterministic)
    sampler = tc.save_weights_and_get_sampling_client().result()
    bsampler = bc.save_weights_and_get_sampling_client("contract-sampler")
    prompt_ids = tokenizer.encode("Tell me about the gateway")
    prompt, bprompt = types.ModelInput.from_ints(prompt_ids), btypes.ModelInput.from_ints(prompt_ids)
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    sampled = sampler.sample(prompt, 2, greedy).result()
    bsampled = bsampler.sample(bprompt, btypes.SamplingParams(max_tokens=6, temperature=0.0), num_samples=2).result()
    for t, b in zip(sampled.sequences, bsampled.sequences, strict=True):
        assert t.tokens == b.tokens and t.stop_reason == b.stop_reason == "length"
        np.testing.assert_allclose(t.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    assert all(s.sequence_id for s in sampled.sequences)
    logprobs, blogprobs = sampler.compute_logprobs(prompt).result(), bsampler.compute_logprobs(bprompt).result()
    assert logprobs[0] is None and blogprobs[0] is None
    np.testing.assert_allclose(logprobs[1:], blogprobs[1:], rtol=1e-5, atol=1e-5)
    # a stop token ends the sequence at once; stop=None stops at the tokenizer's EOS
    first = sampled.sequences[0].tokens[0]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[first])).result()
    assert stopped.sequences[0].tokens == [first] and stopped.sequences[0].stop_reason == "stop"
    eos_ids = {tuple(s.eos_token_ids) for s in stack.gateway.samplers.values()}
    assert eos_ids == {(tokenizer.eos_token_id,)}

    # forward_backward_custom: the loss runs on the client, the surrogate on the server
    t_custom = tc.forward_backward_custom(data, square_loss).result()
    b_custom = bc.forward_backward(bdata, square_loss).result()
    assert t_custom.metrics["loss:sum"] == pytest.approx(b_custom.metrics["loss:sum"], **TOL)
    tc.optim_step(types.AdamParams(**adam)).result()
    bc.optim_step(btypes.AdamParams(**adam)).result()
    assert_same_output(tc.forward(data, "cross_entropy").result(), bc.forward(bdata, "cross_entropy").result())

    # create_training_client_from_state_with_optimizer: weights and Adam moments as saved, on both sides
    resumed = service.create_training_client_from_state_with_optimizer(state.path).result()
    bresumed = stack.bios.create_training_client_from_state_with_optimizer(bstate.path)
    assert resumed.model_id.endswith(":train:1") and resumed.get_info().lora_rank == 8
    t_fb, b_fb = resumed.forward_backward(data, "cross_entropy"), bresumed.forward_backward(bdata, "cross_entropy")
    assert_same_output(t_fb.result(), b_fb.result())
    resumed.optim_step(types.AdamParams(**adam)).result()
    bresumed.optim_step(btypes.AdamParams(**adam)).result()
    assert_same_output(
        resumed.forward(data, "cross_entropy").result(), bresumed.forward(bdata, "cross_entropy").result()
    )
    run = tinker.RestClient().get_training_run_by_tinker_path(state.path).result()
    assert run.training_run_id == tc.model_id and run.base_model == MODEL and run.lora_rank == 8

    # close: the session ends; its heartbeat now answers 410 (the SDK stops heartbeating on that)
    session_id = service.holder.get_session_id()
    service.close("success").result()
    answer = httpx.post(
        f"{stack.base_url}/api/v1/session_heartbeat",
        json={"session_id": session_id},
        headers={"X-API-Key": "tml-bios-test"},
    )
    assert answer.status_code == 410


def test_losses_keep_tinker_semantics(stack):
    """ppo / cispo / gspo clip thresholds are ratios in Tinker (defaults 0.8/1.2, 0/4 and 0.8/1.2): the same
    losses as ours with distances from 1."""
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=5, train_unembed=False).result()
    bc = stack.bios.create_lora_training_client(base_model=MODEL, rank=8, seed=5)
    ids = tc.get_tokenizer().encode("policy gradients with a clipped ratio")
    rng = np.random.default_rng(0)
    inputs = {
        "target_tokens": ids[1:],
        "logprobs": (-rng.random(len(ids) - 1) * 20).astype(np.float32).tolist(),
        "advantages": rng.normal(size=len(ids) - 1).astype(np.float32).tolist(),
    }
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)]
    bdata = [btypes.Datum(model_input=btypes.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs)]
    cases = [
        ("ppo", None, {"clip_epsilon_low": 0.2, "clip_epsilon_high": 0.2}),
        (
            "ppo",
            {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5},
            {"clip_epsilon_low": 0.5, "clip_epsilon_high": 0.5},
        ),
        ("cispo", None, {"clip_epsilon_low": 1.0, "clip_epsilon_high": 3.0}),
        ("importance_sampling", None, None),
        ("dro", {"beta": 0.1}, {"beta": 0.1}),
        (
            "gspo",
            {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01},
            {"clip_epsilon_low": 0.01, "clip_epsilon_high": 0.01},
        ),
    ]
    # gspo without a sequence_ratio_mask: the ratio runs over the tokens with an advantage
    mask = (np.asarray(inputs["advantages"]) != 0).astype(np.float32).tolist()
    for loss_fn, tinker_config, bios_config in cases:
        t = tc.forward_backward(data, loss_fn, tinker_config).result()
        if loss_fn == "gspo":
            bdata = [
                btypes.Datum(model_input=d.model_input, loss_fn_inputs={**inputs, "sequence_ratio_mask": mask})
                for d in bdata
            ]
        assert_same_output(t, bc.forward_backward(bdata, loss_fn, bios_config).result())
        assert t.metrics["loss:sum"] != 0
    service.close("success").result()


def test_bad_requests_get_clear_errors_and_the_gateway_keeps_serving(stack):
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    data, _ = make_data(tc.get_tokenizer(), ["one small example"])

    with pytest.raises(tinker.BadRequestError, match="stable_reinforce is not supported"):
        tc.forward_backward(data, "stable_reinforce").result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn_config: ppo takes clip_low_threshold"):
        tc.forward(data, "ppo", {"clip_ratio": 0.3}).result()
    bad_token = [
        types.Datum(
            model_input=types.ModelInput.from_ints([10**7]), loss_fn_inputs={"target_tokens": [1], "weights": [1.0]}
        )
    ]
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary") as failed:
        tc.forward_backward(bad_token, "cross_entropy").result()
    assert failed.value.category == types.RequestErrorCategory.User
    # refused requests spent their sequence numbers: the model's next operations still run
    assert tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    assert "grad_norm:mean" in tc.optim_step(types.AdamParams(learning_rate=1e-4)).result().metrics

    def post(path, body=None, content=None, headers=None):
        return httpx.post(
            f"{stack.base_url}/api/v1/{path}",
            json=body,
            content=content,
            headers={"X-API-Key": "tml-bios-test", **(headers or {})},
        )

    answer = post("create_model", {"session_id": service.holder.get_session_id()})
    assert answer.status_code == 400 and "model_seq_id: Field required" in answer.json()["error"]
    answer = post("create_model", {"session_id": "session-0000", "model_seq_id": 0, "base_model": MODEL})
    assert answer.status_code == 404 and "session_id: unknown session" in answer.json()["error"]
    answer = post("forward_backward", content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"})
    assert answer.status_code == 400 and "not a tinker_public.ForwardBackwardRequest" in answer.json()["error"]
    answer = post(
        "forward_backward",
        content=b"\x28\xb5\x2f\xfdjunk",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert answer.status_code == 400 and "not valid zstd" in answer.json()["error"]
    answer = post("forward_backward", {"model_id": tc.model_id})
    assert answer.status_code == 415
    answer = post("retrieve_future", {"request_id": "model-nope:op:1"})
    assert answer.status_code == 404 and "request_id: unknown" in answer.json()["error"]
    answer = post(
        "asample",
        {
            "sampling_session_id": "sampler-nope",
            "seq_id": 0,
            "prompt": {"chunks": []},
            "sampling_params": {"max_tokens": 1},
        },
    )
    assert answer.status_code == 404
    answer = post("save_weights", {"model_id": tc.model_id, "path": "x", "seq_id": 99, "ttl_seconds": 5})
    assert answer.status_code == 400 and "ttl_seconds: must be between 3600" in answer.json()["error"]
    assert httpx.get(f"{stack.base_url}/api/v1/healthz").json() == {"status": "ok"}
    service.close("success").result()


def test_chunks_out_of_order_run_in_sequence_order(stack):
    """Tinker sends a forward_backward's chunks in parallel, the first one last: each waits for its turn."""
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    data, _ = make_data(tc.get_tokenizer(), ["out of order on the wire", "in order on the engine"])
    headers = {"X-API-Key": "tml-bios-test"}
    optim = httpx.post(
        f"{stack.base_url}/api/v1/optim_step",
        headers=headers,
        json={"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-4}},
    ).json()
    body = forward_backward_request_to_proto(
        types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
            model_id=tc.model_id,
            seq_id=1,
        )
    ).SerializeToString()
    fb = httpx.post(
        f"{stack.base_url}/api/v1/forward_backward",
        content=zstandard.ZstdCompressor().compress(body),
        headers={**headers, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    ).json()
    again = httpx.post(
        f"{stack.base_url}/api/v1/forward_backward",
        content=body,
        headers={**headers, "Content-Type": "application/x-protobuf"},
    ).json()
    assert again["request_id"] == fb["request_id"]  # a resubmitted seq_id answers with its first request

    def result(request_id):
        while True:
            answer = httpx.post(
                f"{stack.base_url}/api/v1/retrieve_future", headers=headers, timeout=60, json={"request_id": request_id}
            )
            if (
                answer.headers["content-type"].startswith("application/json")
                and answer.json().get("type") == "try_again"
            ):
                continue
            return answer

    # optim_step (seq 2) arrived first but ran second: it found the gradient of forward_backward (seq 1)
    assert "grad_norm:mean" in result(optim["request_id"]).json()["metrics"]
    assert result(fb["request_id"]).headers["content-type"] == "application/x-protobuf"
    service.close("success").result()


def test_api_keys_map_to_tenants_and_ids_are_checked(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": {"tml-alice": "alice", "tml-bob": "bob"}}))
    monkeypatch.setenv("BIOS_MODEL_REGISTRY", str(write_registry(tmp_path)))
    loop = LoopThread.named("tinker-tenant-tests")
    train, gateway = start_stack(loop, str(tmp_path / "checkpoints"), ApiKeys.from_file(keys_file))
    base_url = f"http://127.0.0.1:{gateway.port}"
    try:
        apply_environment(monkeypatch, tinker_environment(tmp_path, base_url, "tml-alice"))
        alice = tinker.ServiceClient()
        tc = alice.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
        path = tc.save_state("alice-only").result().path
        bob = {"X-API-Key": "tml-bob"}
        answer = httpx.post(f"{base_url}/api/v1/get_info", json={"model_id": tc.model_id}, headers=bob)
        assert answer.status_code == 404
        answer = httpx.post(
            f"{base_url}/api/v1/retrieve_future", json={"request_id": f"{tc.model_id}:op:1"}, headers=bob
        )
        assert answer.status_code == 404
        listed = httpx.get(f"{base_url}/api/v1/training_runs/{tc.model_id}/checkpoints", headers=bob).json()
        assert listed["checkpoints"] == []
        answer = httpx.post(
            f"{base_url}/api/v1/load_weights",
            headers=bob,
            json={"session_id": alice.holder.get_session_id(), "model_seq_id": 5, "path": path, "optimizer": False},
        )
        assert answer.status_code == 404
        for key in ("tml-mallory", None):
            answer = httpx.post(
                f"{base_url}/api/v1/create_session",
                headers={"X-API-Key": key} if key else {},
                json={"tags": [], "user_metadata": None, "sdk_version": "0.38.0"},
            )
            assert answer.status_code == 401 and "X-API-Key" in answer.json()["error"]
        alice.close("success").result()
    finally:
        loop.run(gateway.stop())
        loop.run(train.stop(None, checkpoint=False))


def test_a_gateway_forwards_to_the_gateway_of_the_pod_an_id_names(tmp_path, monkeypatch):
    """Two train pods, a gateway beside each (as in k8s/); each pod's ordinal is its gateway's port, so the
    peer template is http://127.0.0.1:{pod}. A request that reaches the other pod's gateway is forwarded."""
    from test_placement import free_port

    from tinker_gateway import server as gateway_server
    from train_service import server as train_server

    monkeypatch.setenv("BIOS_MODEL_REGISTRY", str(write_registry(tmp_path)))
    loop = LoopThread.named("tinker-placement-tests")
    pods, running = [free_port(), free_port()], []
    try:
        for pod in pods:
            train = loop.run(train_server.start("127.0.0.1", 0, str(tmp_path / f"pod{pod}"), pod=pod))
            gateway = loop.run(
                gateway_server.start(
                    "127.0.0.1", pod, f"127.0.0.1:{train.port}", pod=pod, peer_template="http://127.0.0.1:{pod}"
                )
            )
            running.append((train, gateway))
        a, b = (f"http://127.0.0.1:{pod}/api/v1" for pod in pods)
        headers = {"X-API-Key": "tml-bios-test"}
        session = httpx.post(
            f"{a}/create_session", headers=headers, json={"tags": [], "user_metadata": None, "sdk_version": "0.38.0"}
        ).json()["session_id"]
        assert f"-p{pods[0]}-" in session
        created = httpx.post(
            f"{b}/create_model",
            headers=headers,
            json={  # at the other pod's gateway
                "session_id": session,
                "model_seq_id": 0,
                "base_model": MODEL,
                "lora_config": {"rank": 4, "seed": 0},
            },
        )
        assert created.status_code == 200, created.text
        answer = httpx.post(
            f"{b}/retrieve_future", headers=headers, timeout=60, json={"request_id": created.json()["request_id"]}
        ).json()
        model_id = answer["model_id"]
        assert f"-p{pods[0]}-" in model_id
        info = httpx.post(f"{b}/get_info", headers=headers, json={"model_id": model_id}).json()
        assert info["model_data"]["model_name"] == MODEL
        owner, other = running[0][1].app.gateway, running[1][1].app.gateway
        assert model_id in owner.models and not other.models and not other.sessions  # b kept nothing
        assert httpx.post(f"{b}/session_heartbeat", headers=headers, json={"session_id": session}).status_code == 200
        assert httpx.post(f"{b}/sessions/{session}/finish", headers=headers, json={}).status_code == 200
        assert owner.sessions[session].finished
    finally:
        for train, gateway in running:
            loop.run(gateway.stop())
            loop.run(train.stop(None, checkpoint=False))


def test_checkpoints_keep_overwrite_ttl_and_user_metadata(stack):
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=4).result()
    rest = tinker.RestClient()
    first = tc.save_state("kept", user_metadata={"v": "1"}).result().path
    with pytest.raises(tinker.RequestFailedError, match="named 'kept' exists"):
        tc.save_state("kept").result()  # overwrite=False, Tinker's default
    assert tc.save_state("kept", overwrite=True, user_metadata={"v": "2"}).result().path == first
    sampler_path = tc.save_weights_for_sampler("snap", ttl_seconds=7200, user_metadata={"kind": "s"}).result().path
    assert sampler_path == f"tinker://{tc.model_id}/sampler_weights/snap"
    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed["weights/kept"].user_metadata == {"v": "2"} and listed["weights/kept"].expires_at is None
    assert listed["sampler_weights/snap"].user_metadata == {"kind": "s"}
    remaining = listed["sampler_weights/snap"].expires_at.timestamp() - __import__("time").time()
    assert 7100 < remaining <= 7200

    # an expired checkpoint is deleted when next listed (here one written with a past expiry through bios)
    bc = stack.bios.create_lora_training_client(base_model=MODEL, rank=4, seed=4)
    expired = bc.save_state("old", metadata={"tinker": {"expires_unix": 1.0}}).result()
    assert rest.list_checkpoints(bc.model_id).result().checkpoints == []
    assert all(c.path != expired.path for c in stack.bios.list_checkpoints(bc.model_id))

    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == ["weights/kept"]
    runs = rest.list_training_runs().result()
    assert tc.model_id in {r.training_run_id for r in runs.training_runs}
    # a sampler from a saved path, and its record
    sampler = service.create_sampling_client(model_path=first).result()
    assert sampler.get_base_model() == MODEL
    service.close("success").result()
