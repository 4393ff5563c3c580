"""32 concurrent clients against the render service as its own process (load_drill.py): every answer right, every
malformed request INVALID_ARGUMENT, memory flat."""

from __future__ import annotations

import load_drill


def test_32_concurrent_clients_get_right_answers_and_memory_stays_flat():
    report = load_drill.drill(rounds=20, clients=32)
    assert report.errors == []
    assert report.requests == 20 * 32 * load_drill.REQUESTS_PER_ROUND
    assert report.seconds < 180  # a bound, not a speed target: a stall fails here, not in CI's global timeout
    warm, late = report.rss_mb[1:4], report.rss_mb[-3:]
    assert max(late) - min(warm) <= 4.0, report.rss_mb  # ~7,000 requests after warm-up: a 1 KB/request leak shows
