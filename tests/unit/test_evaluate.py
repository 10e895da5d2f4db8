"""The probes behind ``bimdist eval``: deterministic, they separate what is separable, and C comes from data."""

import torch

from bimdist.evaluate import Probe, edge_warning, knn, linear_probe

CS = [0.001, 0.01, 0.1, 1.0]


def _blobs(n: int, *, seed: int, separable: bool, scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * scale
    x = torch.randn(n, 16, generator=g) + (centers[y] if separable else 0.0)
    return x, y


def test_linear_probe_is_a_function_of_its_inputs_and_seed():
    xtr, ytr = _blobs(600, seed=1, separable=True, scale=0.6)
    xte, yte = _blobs(300, seed=2, separable=True, scale=0.6)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = linear_probe(xtr, ytr, xte, yte, cs=CS, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # a different global state must not change the result
    assert linear_probe(xtr, ytr, xte, yte, cs=CS, seed=5) == first
    assert first.c in CS and set(first.held_out) == set(CS)
    assert first.held_out[first.c] == max(first.held_out.values())  # C is the held-out split's best


def test_probes_separate_blobs_and_stay_near_chance_on_noise():
    xtr, ytr = _blobs(800, seed=1, separable=True)
    xte, yte = _blobs(400, seed=2, separable=True)
    assert linear_probe(xtr, ytr, xte, yte, cs=CS).accuracy > 95.0
    assert knn(xtr, ytr, xte, yte, k=10) > 95.0
    ntr, nytr = _blobs(800, seed=3, separable=False)
    nte, nyte = _blobs(400, seed=4, separable=False)
    assert linear_probe(ntr, nytr, nte, nyte, cs=CS).accuracy < 40.0
    assert knn(ntr, nytr, nte, nyte, k=10) < 40.0


def test_edge_warning_names_the_grid_edge_only_when_accuracy_still_rose_there():
    rising = {0.01: 70.0, 0.1: 80.0, 1.0: 82.5}
    line = edge_warning(Probe(80.0, 1.0, rising))
    assert line is not None and "C=1 is the largest" in line and "add C=10" in line
    falling = {0.01: 83.0, 0.1: 80.0, 1.0: 79.0}
    line = edge_warning(Probe(80.0, 0.01, falling))
    assert line is not None and "C=0.01 is the smallest" in line and "add C=0.001" in line
    assert edge_warning(Probe(80.0, 0.1, {0.01: 70.0, 0.1: 82.0, 1.0: 81.0})) is None  # an interior optimum
    assert edge_warning(Probe(80.0, 0.01, {0.01: 80.0, 0.1: 80.0})) is None  # a tie at the edge: no evidence
    assert edge_warning(Probe(80.0, 1.0, {1.0: 80.0})) is None  # a single candidate has no neighbour
