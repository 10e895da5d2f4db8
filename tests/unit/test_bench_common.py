"""The benchmark plumbing that builds the README tables: newest full result per script, verdicts from checks()."""

import json

from benchmarks.common import Check, headline_table, newest_result, replace_block


def flops_record(date: str, saving: float) -> dict:
    variant = {"variant": "v", "once_for_all_saving": saving, "once_for_all_saving_incremental": saving - 0.1}
    return {"date": date, "machine": {"cpu": "Test CPU", "cores": 2}, "variants": [variant]}


def test_headline_uses_the_newest_full_result_and_ignores_quick_runs(tmp_path):
    (tmp_path / "flops_cpu2_2026-01-01.json").write_text(json.dumps(flops_record("2026-01-01T10:00:00", 0.5)))
    (tmp_path / "flops_cpu2_2026-02-01.json").write_text(json.dumps(flops_record("2026-02-01T10:00:00", 0.8)))
    (tmp_path / "flops_cpu2_2026-03-01_quick.json").write_text(json.dumps(flops_record("2026-03-01T10:00:00", 0.1)))
    path, record = newest_result("flops", tmp_path)
    assert path.name == "flops_cpu2_2026-02-01.json" and record["variants"][0]["once_for_all_saving"] == 0.8
    table = headline_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| [flops]")]
    assert len(rows) == 2 and all(row.endswith("| met |") for row in rows)
    assert "[flops]: benchmarks/results/flops_cpu2_2026-02-01.md" in table
    assert "Test CPU (2 cores): flops 2026-02-01" in table


def test_a_missed_target_is_marked_and_blocks_are_replaced_in_place(tmp_path):
    (tmp_path / "flops_cpu2_2026-01-01.json").write_text(json.dumps(flops_record("2026-01-01T10:00:00", 0.5)))
    assert "**not met**" in headline_table(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nbottom\n")
    replace_block(readme, "x", "new")
    replace_block(readme, "y", "added")
    text = readme.read_text()
    assert "old" not in text and "<!-- bench:x -->\nnew\n<!-- /bench:x -->\nbottom" in text
    assert text.rstrip().endswith("<!-- bench:y -->\nadded\n<!-- /bench:y -->")


def test_check_verdicts():
    assert Check("x", 0.2, 0.3, at_most=True).met and not Check("x", 0.2, 0.3).met
    assert Check("ratio", 1.5, 1.3).line() == "- ratio: met (1.5 >= 1.3 wanted)"
