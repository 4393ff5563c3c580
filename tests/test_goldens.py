"""The fixture goldens reproduce through our renderers (not only through HF): digests of token ids."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import need_fixtures
from parity_cases import fixture_tokenizer

from bios_cookbook import renderers
from render_service.renderers.base import Segment, tokenize_segments

RENDERER_OF = {
    "Qwen--Qwen2.5-7B-Instruct": "qwen2.5",
    "Qwen--Qwen3-8B": "qwen3",
    "meta-llama--Llama-3.1-8B-Instruct": "llama3.1",
    "meta-llama--Llama-3.2-1B-Instruct": "llama3.2",
    "openai--gpt-oss-20b": "gpt-oss",
    "mistralai--Mistral-Nemo-Instruct-2407": "mistral-nemo",
}


def digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


def goldens(name: str) -> dict:
    return json.loads((need_fixtures() / "golden" / name).read_text(encoding="utf-8"))


def cases(key: str) -> list:
    try:
        return goldens("renderer_digests.json")[key]
    except (FileNotFoundError, pytest.skip.Exception):
        return []


@pytest.mark.parametrize("case", cases("text_cases"), ids=lambda c: f"{c['tokenizer']}-{c['golden_case']}-{c['field']}")
def test_text_goldens_through_our_tokenization(case):
    tok = fixture_tokenizer(case["tokenizer"])
    ids = tokenize_segments(tok, [Segment(case["text"])], []).token_ids
    assert len(ids) == case["token_count"] and digest(ids) == case["token_ids_sha256"]


@pytest.mark.parametrize(
    "case", cases("template_cases"), ids=lambda c: f"{c['tokenizer']}-{c['golden_case']}-{c['field']}"
)
def test_template_goldens_through_our_renderers(case):
    tok = fixture_tokenizer(case["tokenizer"])
    kwargs = dict(case["kwargs"])
    add_generation_prompt = kwargs.pop("add_generation_prompt", False)
    if case["tokenizer"].startswith("openai--"):
        kwargs["current_date"] = "2025-01-15"  # the goldens pin the template's strftime_now date
    renderer = renderers.get_renderer(RENDERER_OF[case["tokenizer"]], tok, **kwargs)
    ids = renderer.render(
        case["messages"], tools=case["tools"] or None, add_generation_prompt=add_generation_prompt
    ).token_ids
    ids += tok.encode(case["append_after_render"], add_special_tokens=False) if case["append_after_render"] else []
    assert len(ids) == case["token_count"] and digest(ids) == case["token_ids_sha256"]


def test_mistral_common_references_through_our_renderer():
    refs = goldens("reference_digests.json")
    for case in refs["cases"]:
        tok = fixture_tokenizer(case["tokenizer"])
        ids = renderers.get_renderer("mistral-nemo", tok).render(case["messages"], tools=case["tools"]).token_ids
        assert len(ids) == case["token_count"] and digest(ids) == case["token_ids_sha256"], case["case"]
