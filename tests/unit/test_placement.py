"""Choosing a replica count per stage from measured stage costs (pure)."""

import itertools

import pytest

from bimdist.config import ConfigError
from bimdist.distributed.placement import choose_counts, rate


def test_a_slow_stage_gets_the_spare_devices():
    layout = choose_counts([0.9, 0.3], devices=3, batch=16)  # stage 0 three times as slow
    assert layout.counts == (2, 1) and layout.slowest == 0
    assert layout.samples_per_s == pytest.approx(2 / 0.9)
    assert rate([0.9, 0.3], (1, 2))[0] < layout.samples_per_s  # the other way round is worse


def test_the_choice_is_the_best_of_every_composition_that_divides_the_batch():
    costs, batch = [1.0, 2.5, 0.7, 1.6], 24
    for devices in (4, 6, 9, 12):
        best = choose_counts(costs, devices, batch)
        assert sum(best.counts) == devices and all(batch % c == 0 for c in best.counts)
        brute = max(rate(costs, c)[0] for c in itertools.product(range(1, devices + 1), repeat=4)
                    if sum(c) == devices and all(batch % x == 0 for x in c))
        assert best.samples_per_s == pytest.approx(brute)


def test_impossible_layouts_are_named():
    with pytest.raises(ConfigError, match="3 devices cannot hold 4 stages"):
        choose_counts([1, 1, 1, 1], devices=3, batch=16)
    with pytest.raises(ConfigError, match="no replica counts for 5 devices divide data.batch_size=7"):
        choose_counts([1, 1], devices=5, batch=7)


def test_many_devices_and_a_batch_of_few_divisors_still_balance():
    costs = [1.0] * 7 + [4.0]  # the last stage four times as slow
    best = choose_counts(costs, devices=64, batch=4096)  # the counts must be powers of two
    assert sum(best.counts) == 64 and all(4096 % c == 0 for c in best.counts)
    assert best.samples_per_s == pytest.approx(4.0)  # 16 replicas on the slow stage, at least 4 on each other one
    assert rate(costs, (8,) * 8)[0] == pytest.approx(2.0)  # equal counts: half the rate
