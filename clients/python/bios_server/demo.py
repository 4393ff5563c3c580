"""`make demo`: supervised fine-tuning end to end on the embedded default.

Renders conversations, trains a LoRA adapter on the tiny usf-healthcare stand-in through the train service
until it reproduces the answers, samples, parses the samples back into messages and saves the state.
"""

from __future__ import annotations

import time

from tqdm import tqdm

import bios
from bios import types
from bios.compose import to_datum
from bios_cookbook import renderers
from bios_cookbook.utils.format_colorized import format_colorized

CONVERSATIONS = [
    [
        {"role": "system", "content": "Provide medical information accurately."},
        {"role": "user", "content": "What causes Type 2 diabetes?"},
        {"role": "assistant", "content": "Mostly insulin resistance, driven by genes, weight and inactivity."},
    ],
    [
        {"role": "system", "content": "Provide medical information accurately."},
        {"role": "user", "content": "What are symptoms of hypoglycemia?"},
        {"role": "assistant", "content": "Shaking, sweating, confusion and a fast heartbeat."},
    ],
]


def main(max_steps: int = 60) -> None:
    started = time.time()
    service_client = bios.ServiceClient()
    training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-healthcare", rank=16)
    tokenizer = training_client.get_tokenizer()
    renderer = renderers.get_renderer("ultrasafe", tokenizer)
    print(
        f"services up in {time.time() - started:.1f}s: train {service_client.train_address}, "
        f"render {service_client.render_address}\n"
    )

    examples = [renderer.build_supervised_example(conv) for conv in CONVERSATIONS]
    print("Rendered example (green = prompt, weight 0; red = completion, weight 1):")
    print(format_colorized(*examples[0], tokenizer) + "\n")
    batch = [to_datum(tokens, weights) for tokens, weights in examples]

    stop = renderer.get_stop_sequences()
    prompts = [renderer.build_generation_prompt(conv[:-1]) for conv in CONVERSATIONS]
    answers = [conv[-1]["content"] for conv in CONVERSATIONS]
    progress = tqdm(range(1, max_steps + 1), desc="sft", unit="step")
    first_loss = None
    for step in progress:
        result = training_client.train(batch, loss_fn="cross_entropy", learning_rate=1e-2)
        first_loss = first_loss or result.loss
        progress.set_postfix(loss=f"{result.loss:.3f}")
        tqdm.write(f"step {result.step:3d}  loss {result.loss:8.4f}")
        if step % 10 == 0 and _reproduces(training_client, prompts, answers, stop, renderer):
            break
    progress.close()

    checkpoint = training_client.save_state(name="demo", metadata={"loss": result.loss}).result()
    sampling_client = training_client.save_weights_and_get_sampling_client(name="demo-sampler")
    print(f"\nloss {first_loss:.3f} -> {result.loss:.3f} in {result.step} steps; state saved at {checkpoint.path}")
    for prompt, conv in zip(prompts, CONVERSATIONS):
        output = sampling_client.sample(
            prompt, types.SamplingParams(max_tokens=40, temperature=0.0, stop=stop)
        ).result()
        message, ok = renderer.parse_response(output.sequences[0].tokens)
        print(f"\nuser:      {conv[-2]['content']}\nassistant: {message['content']}   (parse ok: {ok})")
    print(f"\ndone in {time.time() - started:.1f}s")


def _reproduces(client, prompts, answers, stop, renderer) -> bool:
    for prompt, answer in zip(prompts, answers):
        output = client.sample(prompt, types.SamplingParams(max_tokens=40, temperature=0.0, stop=stop)).result()
        message, ok = renderer.parse_response(output.sequences[0].tokens)
        if not ok or message["content"] != answer:
            return False
    return True


if __name__ == "__main__":
    main()
