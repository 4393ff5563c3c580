"""Several train replicas: ids name the pod that issued them, and a client follows its session to that pod.

Two real train servers stand in for the StatefulSet's pods 1 and 2, on 127.0.0.1 and 127.0.0.2 (both loopback
on Linux) at one port, so the pod address template is `127.0.0.{pod}:<port>`.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from bios import placement
from bios.errors import FailedPreconditionError
from conftest import NODE_DIR


def test_ids_and_paths_name_their_pod():
    assert placement.pod_of(placement.new_id("session", 3)) == 3
    assert placement.pod_of("bios://model-p12-0123456789ab/state/step-10") == 12
    assert placement.pod_of(placement.new_id("model")) is None  # a single server: no ordinal
    assert placement.pod_of("bios://model-0123456789ab/state/x") is None
    assert placement.pod_ordinal("bios-train-7") == 7 and placement.pod_ordinal("laptop") is None
    assert placement.pod_ordinal(None) is None
    assert placement.pod_address("bios-train-{pod}.bios-train-headless.bios.svc:50052", 4) == (
        "bios-train-4.bios-train-headless.bios.svc:50052")
    with pytest.raises(ValueError, match="train_pod_address"):
        placement.pod_address("bios-train:50052", 1)


@pytest.fixture(scope="module")
def two_pods(tmp_path_factory):
    from bios.futures import LoopThread
    from train_service import server as train_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = LoopThread.named("test-pods")
    pods = {k: loop.run(train_server.start(f"127.0.0.{k}", port, str(tmp_path_factory.mktemp(f"pod{k}")), pod=k))
            for k in (1, 2)}
    yield pods, port
    for pod in pods.values():
        loop.run(pod.stop(None))


def test_a_client_follows_its_session_to_its_pod(two_pods):
    import bios

    pods, port = two_pods
    template = f"127.0.0.{{pod}}:{port}"
    placed = bios.ServiceClient(train_address=f"127.0.0.2:{port}", train_pod_address=template)  # "any pod": 2
    try:
        tc = placed.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
        assert placement.pod_of(placed.session_id) == 2 and placement.pod_of(tc.model_id) == 2
        assert placed.train_address == f"127.0.0.2:{port}"
        saved = tc.save_state(name="placed").result()
        assert placement.pod_of(saved.path) == 2 and tc.model_id in pods[2].sessions.models
    finally:
        placed.close()

    # A fresh client whose placement address is pod 1 resumes on pod 2, where the checkpoint is.
    resumer = bios.ServiceClient(train_address=f"127.0.0.1:{port}", train_pod_address=template)
    try:
        resumed = resumer.create_training_client_from_state(saved.path)
        assert placement.pod_of(resumer.session_id) == 2 and resumed.model_id in pods[2].sessions.models
        assert not pods[1].sessions.sessions  # pod 1 was never asked to hold anything
    finally:
        resumer.close()

    # A client whose session is already on pod 1 is told plainly that the checkpoint is elsewhere.
    elsewhere = bios.ServiceClient(train_address=f"127.0.0.1:{port}", train_pod_address=template)
    try:
        assert placement.pod_of(elsewhere.session_id) == 1
        with pytest.raises(FailedPreconditionError, match=r"model_path: .* is on train pod 2.* on pod 1"):
            elsewhere.create_sampling_client(model_path=saved.path)
    finally:
        elsewhere.close()


def test_a_pod_address_template_needs_the_placeholder():
    import bios

    with pytest.raises(ValueError, match=r"train_pod_address: .* no \{pod\}"):
        bios.ServiceClient(train_address="127.0.0.1:1", train_pod_address="bios-train:50052")


NODE_ROUTING = """
const { BiosClient, podOf } = require(process.argv[1]);
const [placementPod2, placementPod1, template] = process.argv.slice(2);
(async () => {
  const first = new BiosClient({ train: placementPod2, trainPod: template });
  const session = await first.createSession(); // opened by whichever pod the placement address reaches: pod 2
  // A second client whose placement address reaches pod 1 still finds the session, by its id.
  const second = new BiosClient({ train: placementPod1, trainPod: template });
  const model = await second.createModel(session, 'ultrasafe/usf-mini', { rank: 4, train_attn: true, train_mlp: true });
  const stream = second.operate(model.model_id);
  const saved = await stream.saveState('node');
  await stream.close();
  await second.closeSession(session);
  first.close(); second.close();
  console.log(JSON.stringify({ session, model: model.model_id, path: saved.path, pod: podOf(saved.path) }));
})().catch((err) => { console.error(err); process.exit(1); });
"""


def test_the_node_client_routes_calls_by_id(two_pods, node_client):
    pods, port = two_pods
    done = subprocess.run([node_client, "-e", NODE_ROUTING, str(NODE_DIR / "bios.js"), f"127.0.0.2:{port}",
                           f"127.0.0.1:{port}", f"127.0.0.{{pod}}:{port}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    # Pod 2 issued the model id: createModel reached it although this client's placement address is pod 1's.
    assert placement.pod_of(result["session"]) == placement.pod_of(result["model"]) == result["pod"] == 2
    assert result["session"] not in pods[2].sessions.sessions  # closeSession was routed there too
    assert not pods[1].sessions.models and not pods[1].sessions.sessions
