"""Seed 004 (Datum format), run against the embedded default with its real Llama 3.1 tokenizer.

The seed's code lost its indentation in the document (every line is flattened), so its examples are
transcribed here with indentation restored and `tinker` read as `bios` — otherwise unchanged. The Llama
tokenizer comes from the fixture directory through $BIOS_MODELS_DIR; the base model name is mapped by a
registry file to a tiny random Llama-3-architecture stand-in, since no Llama weights exist offline.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import SEEDS, need_fixtures

LOAD_DATASET = '''
import json
from bios import types
from bios_cookbook import renderers, tokenizer_utils

def load_dataset(jsonl_path: str, model_name: str) -> list[types.Datum]:
    """Load JSONL and convert to Tinker Datum objects."""

    tokenizer = tokenizer_utils.get_tokenizer(model_name)
    renderer = renderers.get_renderer("llama3", tokenizer)

    data = []
    with open(jsonl_path) as f:
        for line in f:
            example = json.loads(line)
            messages = example["messages"]

            model_input, weights = renderer.build_supervised_example(messages)

            # Get token sequences
            input_tokens = model_input.to_ints()
            target_tokens = input_tokens[1:] # Shift for next-token prediction
            input_tokens = input_tokens[:-1]
            weights = weights[1:] # Align weights with targets

            datum = types.Datum(
                model_input=types.ModelInput.from_ints(tokens=input_tokens),
                loss_fn_inputs={
                    "target_tokens": target_tokens,
                    "weights": weights
                }
            )
            data.append(datum)

    return data
'''

TRAIN_LOOP = '''
import bios
from bios import types

async def train_on_book_dataset(
    dataset: list[types.Datum],
    model_name: str,
    learning_rate: float = 1e-4,
    epochs: int = 1
):
    """Train on book SFT dataset."""

    service_client = bios.ServiceClient()
    training_client = await service_client.create_lora_training_client_async(
        base_model=model_name,
        rank=32
    )

    for epoch in range(epochs):
        for batch_start in range(0, len(dataset), 1): # Batch size 1
            batch = dataset[batch_start:batch_start + 1]

            # Forward-backward with cross-entropy loss
            fwd_bwd_future = await training_client.forward_backward_async(
                batch,
                loss_fn="cross_entropy"
            )

            # Optimizer step with aggressive learning rate
            optim_future = await training_client.optim_step_async(
                types.AdamParams(learning_rate=learning_rate * 2.0)
            )

            # Wait for completion
            fwd_bwd_result = await fwd_bwd_future
            optim_result = await optim_future
    return training_client, fwd_bwd_result, optim_result  # (added: lets the test look at the outcome)
'''

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def llama_env(tmp_path, monkeypatch):
    fixtures = need_fixtures()
    if not (SEEDS / "004-datum-format.txt").is_file():
        pytest.skip(f"seed documents not found at {SEEDS}")
    tokenizer_dir = fixtures / "tokenizers" / "meta-llama--Llama-3.1-8B-Instruct"
    registry = tmp_path / "registry.json"
    registry.write_text(
        json.dumps(
            {
                "models": [
                    {"name": MODEL, "weights": "tiny:llama3", "tokenizer": str(tokenizer_dir), "renderer": "llama3.1"}
                ]
            }
        )
    )
    monkeypatch.setenv("BIOS_MODELS_DIR", str(fixtures / "tokenizers"))
    monkeypatch.setenv("BIOS_MODEL_REGISTRY", str(registry))
    monkeypatch.delenv("BIOS_TRAIN_ADDRESS", raising=False)
    monkeypatch.delenv("BIOS_RENDER_ADDRESS", raising=False)
    return tmp_path


def test_seed004_text_matches_the_transcription():
    """Every transcribed line is in the seed (modulo its lost indentation and tinker -> bios)."""
    if not (SEEDS / "004-datum-format.txt").is_file():
        pytest.skip(f"seed documents not found at {SEEDS}")
    text = (SEEDS / "004-datum-format.txt").read_text().replace("tinker", "bios")
    for line in (LOAD_DATASET + TRAIN_LOOP).splitlines():
        code = line.strip()
        if code and "(added:" not in code:
            assert code.replace("Tinker", "Bios") in text.replace("Tinker", "Bios"), code


def test_seed004_tokenizer_resolves_through_models_dir(llama_env, monkeypatch):
    from bios_cookbook import tokenizer_utils

    monkeypatch.delenv("BIOS_MODEL_REGISTRY")
    tokenizer = tokenizer_utils.get_tokenizer(MODEL)
    assert tokenizer.encode("hi") == [128000, 6151]


def test_seed004_jsonl_to_datum_and_async_training_loop(llama_env):
    path = llama_env / "book.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a creative writer."},
                {"role": "user", "content": "Write an opening line."},
                {"role": "assistant", "content": "The lighthouse kept its secrets."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Another one."},
                {"role": "assistant", "content": "Rain remembered every street."},
            ]
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ns: dict = {}
    exec(LOAD_DATASET, ns)  # noqa: S102 - the seed's code
    exec(TRAIN_LOOP, ns)  # noqa: S102
    dataset = ns["load_dataset"](str(path), MODEL)
    assert len(dataset) == 2
    first = dataset[0]
    assert first.model_input.to_ints()[0] == 128000  # <|begin_of_text|>
    assert len(first.loss_fn_inputs["target_tokens"].data) == len(first.model_input.to_ints())
    assert sum(first.loss_fn_inputs["weights"].data) > 0

    client, fwd_bwd, optim = asyncio.run(ns["train_on_book_dataset"](dataset, MODEL, epochs=2))
    assert optim.step == 4 and fwd_bwd.metrics["loss:sum"] > 0
    assert client.get_info().base_model == MODEL
