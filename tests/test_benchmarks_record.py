"""benchmarks/record.py: a benchmark replaces its own section of BENCHMARKS.md; a --quick run records nothing."""

import json

from benchmarks import record as R


def test_a_full_run_replaces_its_section_and_a_quick_run_records_nothing(tmp_path, monkeypatch, capsys):
    target = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(R, "BENCHMARKS_MD", target)
    R.record("demo", "Demo", "python -m benchmarks.demo", {"seconds": 1.0, "quick": False}, "| a |", headline="one")
    R.record("audit", "Audit", "python -m benchmarks.audit", {"seconds": 2.0, "quick": False}, "| b |", headline="two")
    R.record("demo", "Demo", "python -m benchmarks.demo", {"seconds": 3.0, "quick": False}, "| c |", headline="three")
    text = target.read_text()
    assert text.count("<!-- demo:start -->") == 1 and "| c |" in text and "| a |" not in text
    assert "| demo | three |" in text and "| audit | two |" in text  # the summary table follows the sections
    R.record("demo", "Demo", "python -m benchmarks.demo --quick", {"seconds": 0.1, "quick": True}, "| d |")
    assert target.read_text() == text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds"] == 0.1  # still printed
