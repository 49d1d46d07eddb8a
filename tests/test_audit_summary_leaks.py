"""The shareable summary's leak check finds exactly the names a plain substring search finds, in linear time."""

from __future__ import annotations

import numpy as np

from pixcell_fed.audit.report_json import _occurring


def test_leak_check_finds_what_a_substring_search_finds():
    rng = np.random.default_rng(0)
    alphabet = list("ab./-_ x0Z\"é")
    for _ in range(300):
        text = "".join(rng.choice(alphabet, int(rng.integers(0, 80))))
        needles = {"".join(rng.choice(alphabet, int(rng.integers(5, 9)))) for _ in range(int(rng.integers(1, 6)))}
        needles |= {text[i:i + 6] for i in rng.integers(0, max(1, len(text) - 6), 2) if len(text) >= 6}
        assert _occurring(text, needles) == sorted(n for n in needles if n in text), (text, needles)
    summary = '{"tiles": [{"sha256": "9f86d0", "note": "from /srv/site/work/runs/run-1/synthetic/4a1b.png"}]}'
    assert _occurring(summary, {"4a1b.png", "/srv/site/work", "other.png"}) == ["/srv/site/work", "4a1b.png"]
