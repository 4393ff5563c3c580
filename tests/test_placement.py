"""Several train replicas: ids name the pod that issued them, and a client follows its session to that pod.

Two real train servers on loopback stand in for two StatefulSet pods. Each one's ordinal is its own port
number, so the pod address template is simply `127.0.0.1:{pod}`.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from conftest import NODE_DIR

from bios import placement
from bios.errors import FailedPreconditionError


def test_ids_and_paths_name_their_pod():
    assert placement.pod_of(placement.new_id("session", 3)) == 3
    assert placement.pod_of("bios://model-p12-0123456789ab/state/step-10") == 12
    assert placement.pod_of(placement.new_id("model")) is None  # a single server: no ordinal
    assert placement.pod_of("bios://model-0123456789ab/state/x") is None
    assert placement.pod_ordinal("bios-train-7") == 7 and placement.pod_ordinal("laptop") is None
    assert placement.pod_ordinal(None) is None
    assert placement.pod_address("bios-train-{pod}.bios-train-headless.bios.svc:50052", 4) == (
        "bios-train-4.bios-train-headless.bios.svc:50052"
    )
    with pytest.raises(ValueError, match="train_pod_address"):
        placement.pod_address("bios-train:50052", 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEMPLATE = "127.0.0.1:{pod}"


@pytest.fixture(scope="module")
def two_pods(tmp_path_factory):
    """{ordinal: server} for two train servers whose ordinals are their ports."""
    from bios.futures import LoopThread
    from train_service import server as train_server

    loop = LoopThread.named("test-pods")
    pods = {}
    for _ in range(2):
        port = free_port()
        pods[port] = loop.run(train_server.start("127.0.0.1", port, str(tmp_path_factory.mktemp("pod")), pod=port))
    yield pods
    for pod in pods.values():
        loop.run(pod.stop(None))


def test_a_client_follows_its_session_to_its_pod(two_pods):
    import bios

    a, b = two_pods
    placed = bios.ServiceClient(train_address=f"127.0.0.1:{b}", train_pod_address=TEMPLATE)  # "any pod": b
    try:
        tc = placed.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4)
        assert placement.pod_of(placed.session_id) == b and placement.pod_of(tc.model_id) == b
        assert placed.train_address == f"127.0.0.1:{b}"
        saved = tc.save_state(name="placed").result()
        assert placement.pod_of(saved.path) == b and tc.model_id in two_pods[b].sessions.models
    finally:
        placed.close()

    # A fresh client whose placement address is pod a's resumes on pod b, where the checkpoint is.
    resumer = bios.ServiceClient(train_address=f"127.0.0.1:{a}", train_pod_address=TEMPLATE)
    try:
        resumed = resumer.create_training_client_from_state(saved.path)
        assert placement.pod_of(resumer.session_id) == b and resumed.model_id in two_pods[b].sessions.models
        assert resumer.train_address == f"127.0.0.1:{b}"
        assert not two_pods[a].sessions.sessions  # pod a was never asked to hold anything
    finally:
        resumer.close()

    # A client whose session is already on pod a is told plainly that the checkpoint is elsewhere.
    elsewhere = bios.ServiceClient(train_address=f"127.0.0.1:{a}", train_pod_address=TEMPLATE)
    try:
        assert placement.pod_of(elsewhere.session_id) == a
        with pytest.raises(FailedPreconditionError, match=rf"model_path: .* is on train pod {b}.* on pod {a}"):
            elsewhere.create_sampling_client(model_path=saved.path)
    finally:
        elsewhere.close()


def test_a_pod_address_template_needs_the_placeholder():
    import bios

    with pytest.raises(ValueError, match=r"train_pod_address: .* no \{pod\}"):
        bios.ServiceClient(train_address="127.0.0.1:1", train_pod_address="bios-train:50052")


NODE_ROUTING = """
const { BiosClient, podOf } = require(process.argv[1]);
const [placementB, placementA, template] = process.argv.slice(2);
(async () => {
  const first = new BiosClient({ train: placementB, trainPod: template });
  const session = await first.createSession(); // opened by whichever pod the placement address reaches: b
  // A second client whose placement address reaches pod a still finds the session, by its id.
  const second = new BiosClient({ train: placementA, trainPod: template });
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
    a, b = two_pods
    done = subprocess.run(
        [node_client, "-e", NODE_ROUTING, str(NODE_DIR / "bios.js"), f"127.0.0.1:{b}", f"127.0.0.1:{a}", TEMPLATE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout)
    # Pod b issued the model id: createModel reached it although this client's placement address is pod a's.
    assert placement.pod_of(result["session"]) == placement.pod_of(result["model"]) == result["pod"] == b
    assert result["session"] not in two_pods[b].sessions.sessions  # closeSession was routed there too
    assert not two_pods[a].sessions.models and not two_pods[a].sessions.sessions
