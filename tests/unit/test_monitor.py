"""The live accuracy monitor's cost: presets turn it on only where it costs under 2% of the training compute."""

from bimdist.config import load_config


def test_presets_turn_the_live_monitor_on_only_where_it_costs_under_two_percent():
    from bimdist.config import preset_names
    from bimdist.train.monitor import monitor_cost

    for name in preset_names():
        cfg = load_config(name)
        cost = monitor_cost(cfg)
        assert (cfg.eval.monitor_every == 0) == (cost == 0), name
        assert cost <= 0.02, f"{name}: the monitor costs {100 * cost:.2f}% of training"
    assert monitor_cost(load_config("fmnist-tiny", ["--eval.monitor_every=10"])) > 0.02  # the check can fail
