"""Render-service benchmark: renderer.render (full attribution) vs HF apply_chat_template, per family.

For every registered renderer family that has a fixture tokenizer, a fixed, seeded set of ~200 varied
multi-turn conversations (tool calls and reasoning where the family has them) is rendered, in the same
run and interleaved, as

    warm    renderer.render(messages, tools)                ids + the full attribution (as runs), steady
                                                            state: the piece cache kept across passes
    cold    the same right after emptying the piece cache   only repeats within one pass (shared system
                                                            prompts, tool blocks, role headers) are cached
    lists   cold, plus reading the per-token lists          what a caller pays who wants message_indices,
                                                            message_roles, sampled_mask, is_content per token
    before  the same with fast_tokenize switched off        one HF offsets call per render (the old path)
    HF      tokenizer.apply_chat_template(tokenize=True)    ids only

each timed over the whole set after a warm-up. Rates are medians over several passes; each ratio (warm/HF,
cold/HF: target >= 8 on first-time conversations; lists/HF; before/HF) is the median of per-pass ratios, every
pass timed next to an HF pass, so a load spike from another process skews one pass, not the result. Also
reported: whether every conversation's ids equal HF's, and whether the full attribution equals the slow path's.
Conversations that a family's own HF template rejects are left out (counted in the JSON).

    python -m benchmarks.render_bench [family ...]
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"
N_CONVERSATIONS = 200
REPEATS = 7
TARGET = 8.0

# renderer name -> where its tokenizer comes from and what it supports.
#   options: renderer options that are also the template kwargs; renderer_options: renderer only
FAMILIES: dict[str, dict[str, Any]] = {
    "ultrasafe": {"builtin": "ultrasafe/usf-mini"},
    "qwen2.5": {"fixture": "Qwen--Qwen2.5-7B-Instruct", "tools": True},
    "qwen3": {"fixture": "Qwen--Qwen3-8B", "tools": True, "reasoning": True},
    "llama3.1": {
        "fixture": "meta-llama--Llama-3.1-8B-Instruct",
        "tools": True,
        "options": {"date_string": "26 Jul 2024"},
    },
    "llama3.2": {
        "fixture": "meta-llama--Llama-3.2-1B-Instruct",
        "tools": True,
        "options": {"date_string": "26 Jul 2024"},
    },
    "mistral-nemo": {"fixture": "mistralai--Mistral-Nemo-Instruct-2407", "tools": True},
    "gpt-oss": {
        "fixture": "openai--gpt-oss-20b",
        "tools": True,
        "reasoning": True,
        "renderer_options": {"current_date": "2025-01-15"},
        "pin_date": dt.datetime(2025, 1, 15),
    },
    # The fixture template concatenates arguments as text and renders several tool rounds inconsistently.
    "deepseek-v3": {
        "fixture": "deepseek-ai--DeepSeek-V3",
        "tools": True,
        "string_arguments": True,
        "max_tool_turns": 1,
    },
}

# ---- the conversations ---------------------------------------------------------------------------------

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out about who get "
    "model data train loss token batch weight layer value function return result error file system time "
    "people because however between through during without against another example different important "
    "Paris Oslo Tokyo Berlin Python JSON HTTP API GPU CPU Monday January"
).split()
SNIPPETS = [
    "```python\ndef f(x: int) -> int:\n    return x ** 2  # square\n```",
    '```json\n{"name": "bios", "version": [0, 1, 0], "ok": true}\n```',
    "- first item\n- second item\n  - nested item\n1. one\n2. two",
    "中文的句子在这里，还有标点。日本語の文章もあります。한국어 문장도 있습니다.",
    "Emoji 👍🏽 🎉 👨‍👩‍👧 and café, naïve, coöperation, Ελληνικά, Кириллица.",
    "Numbers: 3.14159, 1,000,000, 2024-06-01T12:00:00Z, $19.99, 42%.",
    "See https://example.com/path?q=1&r=two#frag or mail a.b@example.org.",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "   indented line\n\n\n\ttabbed line   ",
    "It's what we'd've done; they're here, aren't they? I'M SURE.",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful assistant. Answer concisely and cite sources when you can.",
    "You are an expert Python programmer. Explain your reasoning step by step, then give working code. "
    "Prefer the standard library; mention edge cases; keep functions small and well named. " * 3,
    "Tu es un assistant serviable. Réponds en français, poliment et précisément.",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a timezone.",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web and return the top results.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer", "description": "At most this many"},
                },
                "required": ["query"],
            },
        },
    },
]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = []
    for _ in range(rng.randint(lo, hi)):
        r = rng.random()
        if r < 0.02:
            words.append("\n\n" + rng.choice(SNIPPETS) + "\n\n")
        elif r < 0.08:
            words.append(rng.choice(WORDS).capitalize() + rng.choice([".", ",", "?", "!", ":"]))
        elif r < 0.10:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        else:
            words.append(rng.choice(WORDS))
    return " ".join(words).strip() or "ok"


def _call(rng: random.Random, k: int, string_arguments: bool) -> dict:
    name, args = rng.choice(
        [
            ("get_weather", {"city": rng.choice(["Paris", "Oslo", "Tokyo", "São Paulo", "Zürich"])}),
            ("get_time", {"tz": rng.choice(["UTC", "Europe/Paris", "Asia/Tokyo"])}),
            ("search", {"query": _text(rng, 2, 8), "limit": rng.randint(1, 10)}),
        ]
    )
    call_id = f"call{k:05d}"[:9].ljust(9, "0")  # 9 alphanumerics: what Mistral's template demands
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args) if string_arguments else args},
    }


def conversations(spec: dict, n: int = N_CONVERSATIONS, seed: int = 1234) -> list[tuple[list[dict], list | None]]:
    """The same seeded set for every family, shaped by what the family supports."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages: list[dict] = []
        with_tools = spec.get("tools") and rng.random() < 0.35
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        tool_turns, calls = 0, 0
        for _turn in range(rng.choice([1, 1, 2, 2, 3, 4, 6])):
            long = rng.random() < 0.1
            messages.append({"role": "user", "content": _text(rng, 5, 400 if long else 60)})
            if with_tools and tool_turns < spec.get("max_tool_turns", 9) and rng.random() < 0.5:
                tool_turns += 1
                calls += 1
                call = _call(rng, calls, spec.get("string_arguments", False))
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "content": json.dumps({"result": _text(rng, 1, 12), "ok": True}),
                    }
                )
            answer: dict[str, Any] = {"role": "assistant", "content": _text(rng, 3, 600 if long else 120)}
            if spec.get("reasoning") and rng.random() < 0.3:
                answer["reasoning_content"] = _text(rng, 5, 80)
            messages.append(answer)
        out.append((messages, TOOLS if with_tools else None))
    return out


# ---- measuring -----------------------------------------------------------------------------------------


def _load_tokenizer(spec: dict) -> Any:
    if "builtin" in spec:
        from render_service.tokenizers import get_tokenizer

        return get_tokenizer(spec["builtin"])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / spec["fixture"]))


def _pin_date(tokenizer: Any, day: dt.datetime) -> None:
    """The template reads today's date through the jinja global strftime_now; make it a fixed day."""
    from transformers.utils import chat_template_utils

    env = chat_template_utils._compile_jinja_template(tokenizer.chat_template).environment
    env.globals["strftime_now"] = day.strftime


def _timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_baseline(spec: dict) -> tuple[Any, Callable[[list[dict], list | None], Any]]:
    """A family's HF tokenizer and the baseline call, `hf(messages, tools)`: apply_chat_template(tokenize=True)
    with the template options, and the date pinned where the template reads today's."""
    tokenizer = _load_tokenizer(spec)
    if spec.get("pin_date"):
        _pin_date(tokenizer, spec["pin_date"])
    options = dict(spec.get("options", {}))

    def hf(messages, tools):
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=False, add_generation_prompt=False, **options
        )

    return tokenizer, hf


def bench_family(name: str, spec: dict, repeats: int = REPEATS) -> dict:
    from render_service.renderers import fast_tokenize, get_renderer

    tokenizer, hf = hf_baseline(spec)
    renderer = get_renderer(name, tokenizer, **spec.get("options", {}), **spec.get("renderer_options", {}))
    status = fast_tokenize.fast_path_status(tokenizer)

    convs, rejected, identical, same_attribution, tokens = [], 0, 0, 0, 0
    for messages, tools in conversations(spec):
        try:
            ref = list(hf(messages, tools))
        except Exception:  # noqa: BLE001 - the family's own template refuses this conversation (any HF error)
            rejected += 1
            continue
        ours = renderer.render(messages, tools)  # a renderer failure here is a real failure: let it raise
        with fast_tokenize.fast_path_disabled():
            same_attribution += ours == renderer.render(messages, tools)  # ids and every per-token field
        identical += ours.token_ids == ref
        tokens += len(ref)
        convs.append((messages, tools))
    if not convs:
        raise RuntimeError("HF's template rejected every conversation")

    def run_ours():
        for messages, tools in convs:
            renderer.render(messages, tools)

    def run_hf():
        for messages, tools in convs:
            hf(messages, tools)

    def run_lists():
        for messages, tools in convs:
            _ = renderer.render(messages, tools).message_indices  # builds all four per-token lists

    run_ours(), run_hf()  # warm up (encoder built above; jinja compiled)
    with fast_tokenize.fast_path_disabled():
        run_ours()
    t_warm, t_cold, t_lists, t_hf, t_before = [], [], [], [], []
    for _ in range(repeats):
        t_warm.append(_timed(run_ours))
        t_hf.append(_timed(run_hf))
        fast_tokenize.clear_piece_caches()
        t_cold.append(_timed(run_ours))
        fast_tokenize.clear_piece_caches()
        t_lists.append(_timed(run_lists))
        with fast_tokenize.fast_path_disabled():
            t_before.append(_timed(run_ours))
    n = len(convs)
    warm, cold, lists, hf_rate, before = (n / statistics.median(t) for t in (t_warm, t_cold, t_lists, t_hf, t_before))

    def ratio(ours: list[float]) -> float:  # per pass, against the HF pass next to it: robust to load drift
        return statistics.median(h / o for h, o in zip(t_hf, ours))

    return {
        "family": name,
        "tokenizer": spec.get("fixture") or spec.get("builtin"),
        "conversations": n,
        "rejected_by_template": rejected,
        "tokens_per_conversation": round(tokens / n, 1),
        "tokenize": status,
        "render_cps": round(warm, 1),
        "render_cold_cps": round(cold, 1),
        "render_lists_cps": round(lists, 1),
        "before_cps": round(before, 1),
        "hf_cps": round(hf_rate, 1),
        "ratio": round(ratio(t_warm), 2),
        "ratio_cold": round(ratio(t_cold), 2),
        "ratio_lists": round(ratio(t_lists), 2),
        "ratio_before": round(ratio(t_before), 2),
        "ids_identical": identical == n,
        "identical_count": identical,
        "attribution_identical_to_slow_path": same_attribution == n,
        "target": f">= {TARGET:g}",
    }


def main(families: list[str] | None = None) -> list[dict]:
    """Bench every family (or those named); print the table and a JSON line; return the rows."""
    from render_service.renderers import list_renderers

    wanted = set(families or ())
    registered = {name for name, _aliases, _desc in list_renderers()}
    rows, notes = [], []
    for name in sorted(registered | set(FAMILIES)):
        if wanted and name not in wanted:
            continue
        spec = FAMILIES.get(name)
        if spec is None:
            notes.append(f"{name}: skipped (no fixture tokenizer mapped for this renderer)")
            continue
        if name not in registered:
            notes.append(f"{name}: skipped (renderer not registered yet)")
            continue
        if "fixture" in spec and not (FIXTURES / spec["fixture"]).is_dir():
            notes.append(f"{name}: skipped (fixture {spec['fixture']} not found under {FIXTURES})")
            continue
        try:
            rows.append(bench_family(name, spec))
        except Exception as exc:  # noqa: BLE001 - one family cannot break the bench; reported in the table
            notes.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            rows.append({"family": name, "error": f"{type(exc).__name__}: {exc}"})

    print(
        f"\n== render service: renderer.render (full attribution) vs apply_chat_template(tokenize=True); "
        f"{N_CONVERSATIONS} conversations, median of {REPEATS} passes =="
    )
    print(
        "   warm: steady state over the set (piece cache kept across passes); cold: piece cache emptied "
        "before the pass (target: cold >= 8x);\n   lists: cold + reading the per-token lists; before: fast_tokenize "
        "off (one HF offsets call per render).\n   ratios: median over passes of (HF pass time / our pass time)"
    )
    header = (
        f"{'family':13s} {'convs':>5s} {'tok/conv':>8s} {'HF/s':>7s} {'warm/s':>7s} {'cold/s':>7s} "
        f"{'lists/s':>7s} {'before/s':>8s} {'warm':>5s} {'cold':>5s} {'lists':>5s} {'before':>6s}  "
        f"{'ids = HF':9s} {'attr = slow':11s} tokenize path"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            continue
        same = "yes" if r["ids_identical"] else f"NO {r['identical_count']}/{r['conversations']}"
        attr = "yes" if r["attribution_identical_to_slow_path"] else "NO"
        flag = "" if r["ratio_cold"] >= TARGET else "  [below target]"
        print(
            f"{r['family']:13s} {r['conversations']:5d} {r['tokens_per_conversation']:8.0f} {r['hf_cps']:7.0f} "
            f"{r['render_cps']:7.0f} {r['render_cold_cps']:7.0f} {r['render_lists_cps']:7.0f} {r['before_cps']:8.0f} "
            f"{r['ratio']:5.2f} {r['ratio_cold']:5.2f} {r['ratio_lists']:5.2f} {r['ratio_before']:6.2f}  "
            f"{same:9s} {attr:11s} {r['tokenize']}{flag}"
        )
    for note in notes:
        print(note)
    print(json.dumps({"render_bench": rows}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
