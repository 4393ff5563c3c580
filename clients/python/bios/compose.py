"""The two services as one product: render + train (`train_on_conversations`), render + sample + parse (`chat`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tqdm import tqdm

from bios import types


@dataclass
class ChatResult:
    message: dict  # the parsed assistant message (content, reasoning_content, tool_calls)
    ok: bool  # the reply ended with a stop sequence and parsed cleanly
    tokens: list[int]  # the sampled tokens
    prompt_attribution: Any  # RenderedTokens of the prompt: message indices, roles, sampled/is_content masks


def _renderer(client: Any, renderer: Any, tokenizer: str, default: str) -> Any:
    """A renderer object: the one given, or a RenderClient (the render service) for a name or the default."""
    if renderer is not None and not isinstance(renderer, str):
        return renderer
    return client._service.render_client(renderer or default, tokenizer)


def to_datum(tokens: Sequence[int], weights: Sequence[float]) -> types.Datum:
    """Next-token shift (seed 004): input = tokens[:-1], target = tokens[1:], weights = weights[1:]."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": types.TensorData.coerce(list(tokens[1:])),
            "weights": types.TensorData.coerce(list(weights[1:])),
        },
    )


def train_on_conversations(
    training_client: Any,
    conversations: Sequence[Sequence[dict]],
    renderer: Any = None,
    epochs: int = 1,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    train_on_what: str = "last_assistant_message",
    progress: bool = True,
    **adam: Any,
) -> list[types.TrainingResult]:
    """Render every conversation (one batched render call), then train epochs x batches, pipelined."""
    info = training_client._info
    renderer = _renderer(training_client, renderer, info.tokenizer, info.renderer)
    if hasattr(renderer, "build_supervised_examples"):
        examples = renderer.build_supervised_examples(list(conversations), train_on_what=train_on_what)
    else:
        examples = [renderer.build_supervised_example(c, train_on_what=train_on_what) for c in conversations]
    data = [to_datum(tokens, weights) for tokens, weights in examples]
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    # Submit everything at once: the server runs the steps in order while results stream back.
    futures = [
        training_client.train_future(batch, learning_rate=learning_rate, **adam)
        for _ in range(epochs)
        for batch in batches
    ]
    results = []
    with tqdm(total=len(futures), desc="train", unit="step", disable=not progress) as bar:
        for future in futures:
            results.append(future.result())
            bar.set_postfix(loss=f"{results[-1].loss:.4f}")
            bar.update()
    return results


def chat(
    client: Any,
    messages: Sequence[dict],
    renderer: Any = None,
    sampling_params: types.SamplingParams | None = None,
    tools: list[dict] | None = None,
) -> ChatResult:
    """Render the generation prompt (with attribution), sample one reply, parse it back into a message."""
    tokenizer = getattr(client, "tokenizer_name", None) or client._info.tokenizer
    default = getattr(client, "renderer_name", None) or client._info.renderer
    renderer = _renderer(client, renderer, tokenizer, default)
    prompt = renderer.render(list(messages), tools=tools, add_generation_prompt=True)
    params = sampling_params or types.SamplingParams(max_tokens=256, temperature=0.0)
    if params.stop is None:
        params = params.model_copy(update={"stop": renderer.get_stop_sequences()})
    output = client.sample(types.ModelInput.from_ints(prompt.token_ids), params).result()
    tokens = output.sequences[0].tokens
    message, ok = renderer.parse_response(tokens, tools)
    return ChatResult(message, ok, tokens, prompt)
