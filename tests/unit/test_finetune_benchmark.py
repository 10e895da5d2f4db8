"""The fine-tuning benchmark's arithmetic and its merge guard (the runs themselves: test_benchmarks.py)."""

import json
import math

import pytest

from benchmarks.finetune import gap, gap_line, jobs_text, merge_source, merges, passes, seed_text


def runs(arm, values, depth=4, labels=1.0):
    return [{"arm": arm, "depth": depth, "labels": labels, "seed": i, "top1": v} for i, v in enumerate(values)]


def test_gap_pools_the_spread_and_lets_a_single_seed_borrow_the_other_side():
    record = {"runs": runs("BIM", [86.0, 87.0, 88.0]) + runs("MAE", [85.0, 86.0, 87.0]) + runs("from scratch", [80.0])}
    assert gap(record, ("BIM", 4, 1.0), ("MAE", 4, 1.0)) == pytest.approx((1.0, 1.0))
    # one seed has no spread of its own: the three-seed arm's stands for both, not half of it
    assert gap(record, ("BIM", 4, 1.0), ("from scratch", 4, 1.0)) == pytest.approx((7.0, 1.0))
    # neither arm has a spread: none is made up (a NaN, said as unknown), so no gap is called noise or not
    record["runs"] += runs("MAE", [79.0], depth=1) + runs("BIM", [80.0], depth=1)
    g, sd = gap(record, ("BIM", 1, 1.0), ("MAE", 1, 1.0))
    assert g == pytest.approx(1.0) and math.isnan(sd)
    assert gap_line(record, ("BIM", 1, 1.0), ("MAE", 1, 1.0)) == \
        "BIM - MAE at 1 block, 100% labels: +1.00 points, one seed each: spread unknown"
    record["runs"] = record["runs"][:-2]
    assert seed_text(record["runs"]) == "3 seed(s) for BIM 4 blocks 100%, MAE 4 blocks 100%; 1 seed(s) for " \
                                        "from scratch 4 blocks 100%"


def test_merge_refuses_other_settings_and_runs_it_already_has(tmp_path):
    settings = {"pretrain_steps": 1013, "batch": 256, "model": "m", "epochs": {1.0: 5, 0.1: 20}, "recipe": {"lr": 1},
                "depths": [4, 1], "fractions": [1.0, 0.1]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({**settings, "runs": runs("BIM", [87.0, 86.0]) + runs("MAE", [85.0])}))
    both = {("BIM", 4, 1.0), ("MAE", 4, 1.0)}
    assert merge_source(path, settings, range(2, 4), both)["runs"][0]["top1"] == 87.0
    with pytest.raises(SystemExit, match=r"already has run\(s\) \[\('BIM', 4, 1.0, 1\)\]"):
        merge_source(path, settings, range(1, 3), both)
    # seed 1 of MAE alone is new, though BIM has a seed 1
    assert merge_source(path, settings, range(1, 3), {("MAE", 4, 1.0)})["runs"][2]["arm"] == "MAE"
    with pytest.raises(SystemExit, match="its pretrain_steps is 1013, this run's 500"):
        merge_source(path, {**settings, "pretrain_steps": 500}, range(2, 4), both)


def test_each_pass_keeps_its_provenance_and_its_runs_at_a_time():
    legacy = {"jobs": "2 (earlier seeds), 1 (these)", "merge": {"file": "seed0.json"}}
    assert passes(legacy) == [2, 1] and jobs_text(legacy) == "2, 1 (by pass)"
    assert merges(legacy) == [{"file": "seed0.json"}]
    assert jobs_text({"jobs": [2, 2, 2]}) == "2" and passes({"jobs": 3}) == [3] and merges({"jobs": 3}) == []
