"""The `bios` CLI, driven as a user would: every command in a subprocess against `bios serve all` on loopback
(itself a subprocess), each user error (one line, exit 2, the file:line and field named), --help of every command,
colours only where asked, and `bios sft` on records with tools training on exactly the renderer's tokens."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO

CONVS = [
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Define teal."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "lookup", "arguments": {"word": "teal"}}}],
    },
    {"role": "tool", "content": "a blue-green colour"},
    {"role": "assistant", "content": "A blue-green colour."},
]
HELP = [
    (),
    ("render",),
    ("sft",),
    ("sample",),
    ("chat",),
    ("export",),
    ("checkpoints",),
    ("checkpoints", "list"),
    ("checkpoints", "delete"),
    ("info",),
    ("serve",),
    ("serve", "render"),
    ("serve", "train"),
    ("serve", "tinker"),
    ("serve", "all"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOS_", "TINKER_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default", **extra}


def bios(
    *args: str, env: dict | None = None, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bios_server.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=env if env is not None else base_env(),
    )


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`bios serve all` on loopback ports; `env` points every CLI call at it."""
    tmp = tmp_path_factory.mktemp("cli")
    ports = {name: free_port() for name in ("render_metrics", "train_metrics")}
    command = [
        sys.executable,
        "-m",
        "bios_server.cli",
        "serve",
        "all",
        "--host",
        "127.0.0.1",
        "--render-port",
        "0",
        "--train-port",
        "0",
        "--tinker-port",
        "0",
        "--render-metrics-port",
        str(ports["render_metrics"]),
        "--train-metrics-port",
        str(ports["train_metrics"]),
        "--checkpoint-dir",
        str(tmp / "checkpoints"),
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = []
    deadline = time.monotonic() + 180
    while len(lines) < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    assert len(lines) == 3, (lines, proc.stderr.read() if proc.poll() is not None else "")
    render, train = (re.search(r"on 127\.0\.0\.1:(\d+)", line).group(1) for line in lines[:2])
    env = base_env(BIOS_RENDER_ADDRESS=f"127.0.0.1:{render}", BIOS_TRAIN_ADDRESS=f"127.0.0.1:{train}")
    files = tmp / "files"
    files.mkdir()
    yield type("Stack", (), {"env": env, "lines": lines, "ports": ports, "proc": proc, "tmp": tmp, "files": files})
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def write(directory: Path, name: str, *lines: object) -> str:
    path = directory / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_help_of_every_command_shows_the_defaults():
    def run(path):
        return path, bios(*path, "--help", timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, HELP))
    for path, done in results:
        assert done.returncode == 0, (path, done.stderr[-2000:])
        assert done.stdout.startswith(f"usage: bios {' '.join(path)}".rstrip()), (path, done.stdout[:200])
        assert done.stderr == "", (path, done.stderr)
        if path in (("render",), ("sft",), ("sample",), ("chat",), ("export",), ("serve", "train")):
            assert "(default: " in done.stdout, path
    by_path = dict(results)
    sft = " ".join(by_path[("sft",)].stdout.split())
    for flag in (
        "--tools",
        "--train-on-what",
        "--batch-size",
        "--epochs",
        "--steps",
        "--checkpoint-every",
        "--resume",
        "--renderer",
        "--color",
        "--debug",
        "--verbose",
    ):
        assert flag in sft, flag
    assert "default: 8" in sft and "default: last_assistant_message" in sft
    assert bios("--version").stdout.strip() == "bios 0.1.0"


@pytest.mark.parametrize(
    "service,module", [("render", "render_service"), ("train", "train_service"), ("tinker", "tinker_gateway")]
)
def test_serve_has_the_standalone_servers_flags_and_defaults(service, module):
    def flags(text: str) -> list[str]:
        return re.findall(r"^  (--[a-z-]+)", text, re.M)

    standalone = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, env=base_env(), timeout=120
    )
    ours = ok(bios("serve", service, "--help", timeout=120)).stdout
    expected = flags(standalone.stdout)
    assert expected and [f for f in flags(ours) if f not in ("--debug", "--color")] == expected
    for flag, default in (
        ("--port", "50051" if service == "render" else "50052"),
        ("--metrics-port", "9090" if service == "render" else "9091"),
        ("--tinker-port", "8000"),
    ):
        if flag in expected:
            assert re.search(rf"{flag} \S+\s+.*?\(default: {default}\)", ours, re.S), flag


def test_user_errors_are_one_line_naming_the_file_line_and_field(stack):
    d = stack.files
    chats = write(
        d,
        "chats.jsonl",
        {"messages": CONVS[0]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
    )
    no_messages = write(d, "no_messages.jsonl", {"messages": CONVS[0]}, "", {"conversation": CONVS[1]})
    not_a_list = write(d, "not_a_list.jsonl", {"messages": "hello"})
    not_json = write(d, "not_json.jsonl", {"messages": CONVS[0]}, "{oops")
    tools_record = write(d, "tools.jsonl", {"messages": CONVS[0], "tools": TOOLS})
    tool_calls = write(d, "tool_calls.jsonl", {"messages": TOOL_CHAT})
    bad_tools = write(d, "bad_tools.json", '{"not": "a list"}')
    good = write(d, "good.jsonl", *({"messages": c} for c in CONVS))
    occupied = d / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    env, local = stack.env, base_env()
    cases = [  # (args, env, the line must contain)
        (("render", chats), local, f"{chats}:2: messages[1].role: unknown role 'bot'"),
        (("render", no_messages), local, f"{no_messages}:3: messages: missing"),
        (("render", not_a_list), local, f"{not_a_list}:1: messages: expected a non-empty list"),
        (("render", not_json), local, f"{not_json}:2: not valid JSON"),
        (("render", str(d / "missing.jsonl")), local, "missing.jsonl: no such file"),
        (("render", good, "--renderer", "ultrasaf"), local, "--renderer: unknown renderer 'ultrasaf'"),
        (
            ("render", good, "--tokenizer", "ultrasafe/usf-mnii"),
            local,
            "--tokenizer: unknown model 'ultrasafe/usf-mnii'",
        ),
        (
            ("render", good, "--renderer", "llama3.2"),
            local,
            "--renderer: 'llama3.2' does not match the tokenizer 'ultrasafe/usf-mini (the default --tokenizer)'",
        ),
        (("render", good, "--train-on-what", "everything"), local, "argument --train-on-what: invalid choice"),
        (("render", tools_record), local, f"{tools_record}:1: tools: the ultrasafe renderer cannot represent tools"),
        (("render", tool_calls), local, f"{tool_calls}:1: messages[1].tool_calls: the ultrasafe renderer cannot"),
        (("render", good, "--tools", bad_tools), local, f"{bad_tools}: tools: expected a JSON list"),
        (("sft", chats), env, f"{chats}:2: messages[1].role: unknown role 'bot'"),
        (("sft", tools_record), env, f"{tools_record}:1: tools: the ultrasafe renderer cannot represent tools"),
        (("sft", good, "--model", "ultrasafe/usf-mnii"), env, "--model: unknown model 'ultrasafe/usf-mnii'"),
        (("sft", good, "--renderer", "llama3.2"), env, "--renderer: 'llama3.2' does not match the tokenizer"),
        (("sft", good, "--resume", "sft-epoch1"), env, "--resume: 'sft-epoch1' is not a state checkpoint path"),
        (
            ("sft", good, "--resume", "bios://model-0123/state/nope"),
            env,
            "--resume: no checkpoint at bios://model-0123/state/nope",
        ),
        (("sft", good, "--train-on-what", "all"), env, "argument --train-on-what: invalid choice: 'all'"),
        (("sft", good, "--name", "../x"), env, "--name: '../x' is not a valid checkpoint name"),
        (("sft", good, "--epochs", "0"), env, "argument --epochs: must be at least 1, got 0"),
        (("sft", good, "--epochs", "2", "--steps", "3"), env, "argument --steps: not allowed with argument --epochs"),
        (
            ("sample", "--model", "ultrasafe/usf-mini", "--prompt", "Hi", "--max-tokens", "0"),
            env,
            "argument --max-tokens: must be at least 1, got 0",
        ),
        (("sample", "--model", "ultrasafe/usf-mnii", "--prompt", "Hi"), env, "--model: unknown model"),
        (("sample", "--model", "bios://model-0123/sampler/nope", "--prompt", "Hi"), env, "--model: "),
        (
            ("sample", "--model", "ultrasafe/usf-mini", "--prompt", "Hi", "--temperature", "-1"),
            env,
            "argument --temperature: must be a finite number, 0 or more",
        ),
        (("export", "sft-step3", str(d / "out")), env, "CHECKPOINT: 'sft-step3' is not a checkpoint path"),
        (("export", "bios://model-0123/state/x", str(occupied)), env, "occupied holds files already"),
        (
            ("export", "bios://model-0123/state/x", str(d / "out"), "--format", "onnx"),
            env,
            "argument --format: invalid choice: 'onnx'",
        ),
        (
            ("checkpoints", "delete", "bios://model-0123/state/nope"),
            env,
            "no checkpoint at bios://model-0123/state/nope",
        ),
        (("chat", "--model", "ultrasafe/usf-mini", "--tools", str(d / "none.json")), env, "none.json: no such file"),
        (
            ("sft", good),
            base_env(BIOS_TRAIN_ADDRESS="127.0.0.1:9", BIOS_RENDER_ADDRESS="127.0.0.1:9"),
            "cannot reach the render service at 127.0.0.1:9 ($BIOS_RENDER_ADDRESS) within 5 s",
        ),
        (("serve", "everything"), local, "argument SERVICE: invalid choice: 'everything'"),
    ]

    def run(case):
        args, case_env, expected = case
        started = time.monotonic()
        return case, bios(*args, env=case_env, timeout=180), time.monotonic() - started

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, cases))
    for (args, _, expected), done, seconds in results:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.returncode, done.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, (args, done.stderr)
        assert lines[0].startswith(f"bios {args[0]}"), lines[0]
        if "cannot reach" in expected:
            assert seconds < 60, seconds  # not the client's ~17 s of silent retries for every call
    debug = bios("render", chats, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "unknown role 'bot'" in debug.stderr


def test_render_colours_only_where_asked_with_a_legend(stack):
    path = write(stack.files, "colour.jsonl", *({"messages": c} for c in CONVS))
    piped = ok(bios("render", path)).stdout  # not a terminal: no colour, markers instead
    assert "\033[" not in piped
    assert piped.startswith("legend: ⟦trained tokens (weight > 0)⟧") and "⟦Seven.<|im_end|>⟧" in piped
    coloured = ok(bios("render", path, "--color", "always")).stdout
    assert "\033[32mprompt (weight 0)\033[0m" in coloured and "\033[31mSeven.<|im_end|>\033[0m" in coloured
    assert "\033[" not in ok(bios("--color", "never", "render", path)).stdout
    rows = [json.loads(line) for line in ok(bios("render", path, "--json")).stdout.splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and sum(rows[0]["weights"]) == 3  # "Seven." + <|im_end|>
    fixture = REPO.parent / "shared" / "fixtures" / "tokenizers" / "meta-llama--Llama-3.2-1B-Instruct"
    if fixture.is_dir():  # the renderer follows the tokenizer: a Llama tokenizer gets the llama3.2 family
        llama = json.loads(ok(bios("render", path, "--json", "--tokenizer", str(fixture))).stdout.splitlines()[0])
        assert llama["token_ids"][0] == 128000  # <|begin_of_text|>, one token


def test_sft_resume_sample_chat_checkpoints_export(stack, tmp_path):
    env = stack.env
    path = write(stack.files, "train.jsonl", *({"messages": c} for c in CONVS * 2))
    done = ok(
        bios(
            "sft",
            path,
            "--epochs",
            "8",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--checkpoint-every",
            "4",
            "--name",
            "cli",
            "--json",
            env=env,
        )
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 17))
    assert [e["epoch"] for e in steps] == [1 + (s - 1) // 2 for s in range(1, 17)]
    for e in steps:  # both losses, the mean per trained token: "Seven." 3 tokens + "Teal." 4 tokens per batch
        assert e["trained_tokens"] == 7 and e["loss:mean"] == pytest.approx(e["loss:sum"] / 7, rel=1e-6)
    assert steps[-1]["loss:mean"] < steps[0]["loss:mean"] / 5
    saved = {(e["kind"], e["step"]): e["path"] for e in events if e["event"] == "checkpoint"}
    assert sorted(saved) == [("sampler", 16), ("state", 4), ("state", 8), ("state", 12), ("state", 16)]
    assert "resumed" not in done.stderr and "Warning" not in done.stderr and "it/s" not in done.stderr

    resumed = ok(
        bios(
            "sft",
            path,
            "--epochs",
            "8",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--resume",
            saved[("state", 8)],
            "--name",
            "cli-resumed",
            "--json",
            env=env,
        )
    )
    again = [json.loads(line) for line in resumed.stdout.splitlines() if '"step"' in line and '"event": "step"' in line]
    assert [e["step"] for e in again] == list(range(9, 17)) and again[0]["epoch"] == 5
    assert again[0]["loss:sum"] == pytest.approx(steps[8]["loss:sum"], rel=1e-4)  # the same state, the same data
    assert f"resumed {saved[('state', 8)]}: step 8, epoch 5 of 8" in resumed.stderr

    human = ok(bios("sft", path, "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--name", "human", env=env))
    assert re.search(
        r"^step 1/2  epoch 1/1  loss:mean \d+\.\d{4}  loss:sum [\d,]+\.\d\d  [\d,]+ tok/s$", human.stdout, re.M
    )
    assert re.search(
        r"^epoch 1/1: loss:mean \d+\.\d{4} \(loss:sum [\d,.]+ over 14 trained tokens, 2 steps", human.stdout, re.M
    )
    assert "on the train service's disk, under its --checkpoint-dir" in human.stdout

    sampler = saved[("sampler", 16)]
    sample = ok(bios("sample", "--model", sampler, "--prompt", "Name a prime.", env=env))
    assert sample.stdout.strip() == "Seven."
    chat = ok(
        bios("chat", "--model", sampler, "--temperature", "0", input="Name a prime.\n/reset\nName a colour.\n", env=env)
    )
    assert chat.stdout.splitlines() == ["assistant: Seven.", "assistant: Teal."]

    listing = ok(bios("checkpoints", "list", env=env)).stdout
    assert sampler in listing and saved[("state", 4)] in listing and listing.startswith("CHECKPOINT")
    rows = [json.loads(line) for line in ok(bios("checkpoints", "list", "--json", env=env)).stdout.splitlines()]
    assert {r["path"] for r in rows} >= set(saved.values())

    adapter = tmp_path / "adapter"
    ok(bios("export", sampler, str(adapter), env=env))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    vllm = ok(bios("export", saved[("state", 16)], str(tmp_path / "vllm"), "--format", "vllm", env=env))
    assert "vllm serve ultrasafe/usf-mini --enable-lora --max-lora-rank 16 --lora-modules vllm=" in vllm.stderr
    merged = ok(bios("export", sampler, str(tmp_path / "merged"), "--format", "merged", env=env))
    assert (tmp_path / "merged" / "config.json").is_file() and "Loading" not in merged.stderr
    assert "Warning" not in merged.stderr and "%|" not in merged.stderr  # no third-party bars or warnings

    ok(bios("checkpoints", "delete", saved[("state", 4)], env=env))
    assert saved[("state", 4)] not in ok(bios("checkpoints", "list", env=env)).stdout


def test_sft_with_tools_trains_on_the_tokens_the_renderer_gives_with_those_tools(stack):
    """The first step's loss is the base model's (a new LoRA adapter starts as the identity) on exactly the data
    the renderer makes of each record with its tools: inline tools, and --tools for records without them."""
    import bios as bios_client
    from bios.compose import to_datum

    records = [{"messages": TOOL_CHAT, "tools": TOOLS}, {"messages": CONVS[0]}]
    inline = write(stack.files, "with_tools.jsonl", *records)
    bare = write(stack.files, "bare.jsonl", {"messages": TOOL_CHAT}, {"messages": CONVS[0], "tools": []})
    tools_file = write(stack.files, "tools.json", json.dumps(TOOLS))
    render_address, train_address = (stack.env[k] for k in ("BIOS_RENDER_ADDRESS", "BIOS_TRAIN_ADDRESS"))
    service = bios_client.ServiceClient(render_address=render_address, train_address=train_address)
    renderer = service.render_client("qwen3", "ultrasafe/usf-mini")

    def first_step(*args):
        done = ok(
            bios("sft", *args, "--renderer", "qwen3", "--steps", "1", "--batch-size", "2", "--json", env=stack.env)
        )
        return next(json.loads(line) for line in done.stdout.splitlines() if '"event": "step"' in line)

    def expected(tools_of):
        data = [to_datum(*renderer.build_supervised_example(r["messages"], tools=tools_of(r))) for r in records]
        base = service.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=16)
        out = base.forward(data).result()
        return out.metrics["loss:sum"], out.metrics["tokens:sum"]

    with_tools = expected(lambda r: r.get("tools"))
    without = expected(lambda r: None)
    assert with_tools[1] > without[1] + 50  # the tools declaration is in the prompt
    for step in (first_step(inline), first_step(bare, "--tools", tools_file)):
        assert step["tokens"] == with_tools[1]
        assert step["loss:sum"] == pytest.approx(with_tools[0], rel=1e-4)
    service.close()


def test_serve_all_metrics_per_service_and_the_open_bind_warning(stack):
    import urllib.request

    ok(bios("render", write(stack.files, "m.jsonl", {"messages": CONVS[0]}), env=stack.env))  # a local render
    ok(bios("sample", "--model", "ultrasafe/usf-mini", "--prompt", "Hi", "--max-tokens", "2", env=stack.env))

    def scrape(port: int) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()

    render, train = scrape(stack.ports["render_metrics"]), scrape(stack.ports["train_metrics"])
    assert 'bios_grpc_requests_total{code="OK",method="GetStopSequences",service="render"}' in render
    assert "bios_train_" not in render and 'service="train"' not in render
    assert "bios_train_tokens_total" in train and 'service="render"' not in train and "bios_render_" not in train
    assert "process_resident_memory_bytes" in render and "process_resident_memory_bytes" in train
    assert stack.lines[0].endswith(f"metrics on :{stack.ports['render_metrics']}")

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bios_server.cli",
            "serve",
            "render",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--metrics-port",
            "0",
        ],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith(f"render service on 0.0.0.0:{port}, metrics off")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "render service: listening on 0.0.0.0 without API keys" in err


def test_info_names_models_renderers_and_devices():
    facts = json.loads(ok(bios("info", "--json")).stdout)
    assert {"ultrasafe/usf-mini", "ultrasafe/usf-healthcare"} <= {m["name"] for m in facts["models"]}
    assert {"ultrasafe", "qwen3", "llama3.2", "chat_template"} <= {r["name"] for r in facts["renderers"]}
    assert facts["devices"]["auto"] in ("cpu", *(c.split(" ")[0] for c in facts["devices"]["cuda"]))
    text = ok(bios("info")).stdout
    assert "--device auto = " in text and "renderer ultrasafe" in text
