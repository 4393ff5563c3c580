"""Reinforcement learning on bios: sample groups, score them with a reward, centre the rewards per group, and take
an importance_sampling (or ppo) step: the loop of seed 000's "SL, RL, deployment", on the embedded default.

    python examples/rl_arithmetic.py [--iterations 10] [--loss importance_sampling|ppo]

The task: "7+4: even or odd?", answered with one word; the reward is 1 for the right word, else 0.

Why a two-word answer: the stand-in models are tiny random networks whose LM head LoRA cannot change, so their
output distribution can hold at most about two likely tokens at once (train_service/tiny_model.py explains the
bound). A short supervised warm-up on *both* answers of every problem teaches the format (a single word, then the
end of the turn) and leaves the choice at chance: the reward starts near 0.5, and only the reward can tell the
policy which word is right. On a real model the warm-up is unnecessary.

Each iteration prints the mean reward, the groups that carried a signal (a group whose samples all scored the same
has no advantage to learn from) and the step's loss:sum and loss per sampled token.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import bios
from bios import types
from bios.compose import to_datum

ANSWERS = ("even", "odd")


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct numbers, half of them even (a policy that always says one word scores 0.5, no better)."""
    rng = random.Random(seed)
    numbers = rng.sample(range(10, 1000), 4 * n)
    chosen = [x for x in numbers if x % 2 == 0][: n - n // 2] + [x for x in numbers if x % 2 == 1][: n // 2]
    rng.shuffle(chosen)
    return [(f"Is {x} even or odd?", ANSWERS[x % 2]) for x in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ultrasafe/usf-mini")
    parser.add_argument("--problems", type=int, default=8, help="distinct problems (each sampled every iteration)")
    parser.add_argument("--group-size", type=int, default=16, help="samples per problem; advantages are per group")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--loss", choices=("ppo", "importance_sampling"), default="ppo")
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=4,
        help="optimizer steps on each iteration's samples (ppo's clip keeps them close to the sampler)",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the RL steps")
    parser.add_argument("--warmup-lr", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=20, help="supervised steps on both answers (format only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per iteration")
    args = parser.parse_args()
    started = time.time()

    service = bios.ServiceClient()
    training = service.create_lora_training_client(base_model=args.model, rank=8, seed=args.seed)
    info = training.get_info()
    renderer = service.render_client(info.renderer, info.tokenizer)
    tasks = problems(args.problems, args.seed)
    prompts = [renderer.build_generation_prompt([{"role": "user", "content": q}]) for q, _ in tasks]
    stop = renderer.get_stop_sequences()

    # Warm-up: every problem with both answers, equally. It teaches the answer format, and nothing about which is right.
    warmup = [
        to_datum(
            *renderer.build_supervised_example([{"role": "user", "content": q}, {"role": "assistant", "content": word}])
        )
        for q, _ in tasks
        for word in ANSWERS
    ]
    for step in range(args.warmup_steps):
        # the second half at a tenth of the rate settles near 50/50 (at the full rate the choice swings step to step)
        lr = args.warmup_lr if step < args.warmup_steps // 2 else args.warmup_lr / 10
        result = training.train(warmup, learning_rate=lr)
    print(
        f"warm-up: {args.warmup_steps} steps on both answers, loss:mean {result.metrics['loss:mean']:.3f} "
        f"(ln 2 = 0.693 is a 50/50 choice)",
        flush=True,
    )

    rewards_seen = []
    for iteration in range(1, args.iterations + 1):
        params = types.SamplingParams(
            max_tokens=3, temperature=args.temperature, stop=stop, seed=args.seed * 1000 + iteration
        )
        futures = [training.sample(prompt, params, num_samples=args.group_size) for prompt in prompts]
        data, rewards, groups_with_signal, sampled_tokens = [], [], 0, 0
        for (_question, answer), prompt, future in zip(tasks, prompts, futures):
            sequences = future.result().sequences
            scores = [
                1.0 if renderer.parse_response(s.tokens)[0]["content"].strip() == answer else 0.0 for s in sequences
            ]
            rewards += scores
            baseline = sum(scores) / len(scores)
            if all(score == baseline for score in scores):
                continue  # no advantage in this group
            groups_with_signal += 1
            context = prompt.to_ints()
            for sequence, score in zip(sequences, scores):
                tokens, n = context + sequence.tokens, len(context)
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * (n - 1) + list(sequence.logprobs),
                            "advantages": [0.0] * (n - 1) + [score - baseline] * len(sequence.tokens),
                        },
                    )
                )
                sampled_tokens += len(sequence.tokens)
        loss = 0.0
        for _ in range(args.inner_steps if data else 0):
            output = training.forward_backward(data, args.loss).result()
            training.optim_step(types.AdamParams(learning_rate=args.lr)).result()
            loss = output.metrics["loss:sum"]  # the last inner step's: below 0 once the policy moved its way
        reward = sum(rewards) / len(rewards)
        rewards_seen.append(reward)
        per_token = loss / sampled_tokens if sampled_tokens else 0.0
        if args.json:
            print(
                json.dumps(
                    {
                        "iteration": iteration,
                        "reward": reward,
                        "groups_with_signal": groups_with_signal,
                        "loss:sum": loss,
                        "loss:mean": per_token,
                    }
                ),
                flush=True,
            )
        else:
            print(
                f"iteration {iteration:2d}: reward {reward:.3f}  groups with signal {groups_with_signal}/"
                f"{len(tasks)}  loss:sum {loss:8.3f}  loss:mean {per_token:7.4f} (per sampled token)",
                flush=True,
            )
    print(
        f"reward {rewards_seen[0]:.3f} -> {rewards_seen[-1]:.3f} in {args.iterations} iterations "
        f"({args.loss}, {time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
