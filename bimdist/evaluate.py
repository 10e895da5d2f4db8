"""``bimdist eval``: frozen features at every depth -> linear probe and kNN accuracy, with a raw-pixel baseline
and, with ``eval.untrained``, the run's initial weights as a second one.

The features at depth k are those of ``bimdist export --depth k`` loaded into timm: its pooled output (the mean of
the final-normed patch tokens). The linear probe is scikit-learn's ``LogisticRegression`` (L-BFGS) on standardised
features, with C chosen on a held-out tenth of the train features and then refitted on all of them: the standard
protocol, so the numbers mean what they mean elsewhere. kNN is DINO's (cosine, similarity-weighted votes).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bimdist.config import Config, ConfigError
from bimdist.data.batches import eval_images
from bimdist.data.stream import DataStats
from bimdist.data.synthetic import synthetic_image
from bimdist.model.backbone import Backbone
from bimdist.model.unit import normalize_images
from bimdist.runs import initial_units, load_units, run_config

log = logging.getLogger("bimdist.eval")


@dataclass
class Row:
    name: str
    layers: int
    linear: float
    knn: float
    c: float | None = None  # the probe's chosen inverse regularisation strength
    held_out: dict[str, float] | None = None  # each candidate C (as text) -> its held-out accuracy, percent


def labelled_split(cfg: Config, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of the train or test split, the first ``limit`` (None: all). Synthetic runs draw
    disjoint index ranges, ``data.synthetic_size`` images each by default."""
    if cfg.data.source == "synthetic":
        base = 0 if split == "train" else 10**6
        pairs = [synthetic_image(base + i, size=cfg.model.img_size, chans=cfg.model.in_chans, seed=cfg.run.seed)
                 for i in range(limit or cfg.data.synthetic_size)]
        return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    pattern = cfg.data.train_shards if split == "train" else cfg.data.test_shards
    if not pattern:
        raise ValueError(f"data.{split}_shards is not set; eval needs labelled {split} shards")
    return eval_images(cfg, pattern, limit=limit, stats=DataStats())


@torch.no_grad()
def depth_features(backbone: Backbone, images: torch.Tensor, *, batch: int, pool: str) -> list[torch.Tensor]:
    """Pooled features [N, D] at every depth."""
    chunks: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        feats = backbone.features(images[i : i + batch])  # per depth [n, 1+L, D]
        chunks.append([f[:, 1:].mean(1) if pool == "avg" else f[:, 0] for f in feats])
    return [torch.cat([c[d] for c in chunks]) for d in range(len(chunks[0]))]


@dataclass
class Probe:
    accuracy: float  # percent, on the test features
    c: float  # the C chosen on the held-out split
    held_out: dict[float, float]  # C -> held-out accuracy (percent)


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *,
                 cs: list[float], holdout: float = 0.1, search_samples: int | None = 10000, seed: int = 0,
                 max_iter: int = 1000) -> Probe:
    """Standardised features, multinomial logistic regression (L-BFGS). C is chosen from ``cs`` by accuracy on a
    held-out ``holdout`` of the train features (each candidate fitted on at most ``search_samples`` of the rest:
    a skinny problem like this is memory-bound, so the search would otherwise cost as much as many full fits), then
    the probe is refitted on all train features. A function of its inputs and ``seed``."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ConfigError("bimdist eval needs scikit-learn: pip install 'bimdist[eval]'") from None
    x, xt = xtr.float().numpy(), xte.float().numpy()  # float32 halves the memory traffic; sklearn keeps it
    y, yt = ytr.numpy(), yte.numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(round(len(x) * holdout)))
    val, fit = order[:cut], order[cut:][:search_samples]

    def fitted(model: LogisticRegression, xs: np.ndarray, ys: np.ndarray, scaler: StandardScaler):  # noqa: ANN202
        with warnings.catch_warnings():  # a probe that stops at max_iter is still a probe; logged below
            warnings.simplefilter("ignore", category=UserWarning)
            model.fit(scaler.transform(xs), ys)
        if model.n_iter_.max() >= max_iter:
            log.warning("linear probe: L-BFGS stopped at max_iter=%d (C=%g) before converging", max_iter, model.C)
        return model

    held: dict[float, float] = {}
    scaler = StandardScaler().fit(x[fit])
    search = LogisticRegression(max_iter=max_iter, tol=1e-4, warm_start=True)  # each C starts from the last one's
    for c in sorted(cs):
        fitted(search.set_params(C=c), x[fit], y[fit], scaler)
        held[c] = 100.0 * float(search.score(scaler.transform(x[val]), y[val]))
    best = max(cs, key=lambda c: (held[c], -c))  # ties: the stronger regularisation
    scaler = StandardScaler().fit(x)
    model = fitted(LogisticRegression(C=best, max_iter=max_iter, tol=1e-4), x, y, scaler)
    return Probe(100.0 * float(model.score(scaler.transform(xt), yt)), best, held)


def edge_warning(probe: Probe) -> str | None:
    """A line for the log when the chosen C is the grid's largest or smallest candidate and beat its neighbour
    there: the held-out accuracy was still rising at the edge, so a wider ``eval.probe_c`` might probe higher."""
    cs = sorted(probe.held_out)
    if len(cs) < 2:
        return None
    for edge, inner, side, wider in ((cs[-1], cs[-2], "largest", f"{cs[-1] * 10:g}"),
                                     (cs[0], cs[1], "smallest", f"{cs[0] / 10:g}")):
        if probe.c == edge and probe.held_out[edge] > probe.held_out[inner]:
            return (f"the chosen C={edge:g} is the {side} of eval.probe_c {cs} and beat C={inner:g} on the held-out "
                    f"split ({probe.held_out[edge]:.2f}% vs {probe.held_out[inner]:.2f}%): add C={wider} to "
                    "eval.probe_c to see whether the probe gains")
    return None


@torch.no_grad()
def knn(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *, k: int,
        temperature: float = 0.07) -> float:
    """Cosine-similarity kNN with similarity-weighted votes (as in DINO); accuracy in percent."""
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    classes = int(max(ytr.max(), yte.max())) + 1
    correct = 0
    for i in range(0, len(xte), 1000):
        sim = xte[i : i + 1000] @ xtr.T  # [b, Ntr]
        top, idx = sim.topk(min(k, len(xtr)), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, ytr[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == yte[i : i + 1000]).sum())
    return 100.0 * correct / len(xte)


def evaluate(cfg: Config, backbone: Backbone, *, train_samples: int | None = None,
             test_samples: int | None = None) -> tuple[list[Row], int, int]:
    """The table's rows, and the train and test image counts they come from."""
    e = cfg.eval
    img_tr, ytr = labelled_split(cfg, "train", train_samples or e.train_samples)
    img_te, yte = labelled_split(cfg, "test", test_samples or e.test_samples)
    log.info("eval: %d train / %d test images, %d depths; linear probe C from %s on a held-out %.0f%%",
             len(img_tr), len(img_te), len(backbone.cuts), e.probe_c, 100 * e.holdout)
    pix_tr = normalize_images(img_tr, backbone.mean, backbone.std).flatten(1)
    pix_te = normalize_images(img_te, backbone.mean, backbone.std).flatten(1)

    def row(name: str, layers: int, a: torch.Tensor, b: torch.Tensor) -> Row:
        t0 = time.perf_counter()
        probe = linear_probe(a, ytr, b, yte, cs=e.probe_c, holdout=e.holdout, search_samples=e.probe_search_samples,
                             seed=cfg.run.seed, max_iter=e.probe_max_iter)
        r = Row(name, layers, probe.accuracy, knn(a, ytr, b, yte, k=e.knn_k), c=probe.c,
                held_out={f"{c:g}": v for c, v in sorted(probe.held_out.items())})
        log.info("eval %s: linear %.2f%% (C=%g), kNN %.2f%% (%.0f s)", name, r.linear, probe.c, r.knn,
                 time.perf_counter() - t0)
        if (edge := edge_warning(probe)) is not None:
            log.warning("eval %s: %s", name, edge)
        return r

    rows = [row("raw pixels", 0, pix_tr, pix_te)]
    if e.untrained:  # the same architecture and seed as the run, before its first step
        t0 = time.perf_counter()
        init = Backbone(cfg, initial_units(cfg)).eval()
        a, b = (depth_features(init, imgs, batch=e.batch_size, pool=e.pool)[-1] for imgs in (img_tr, img_te))
        log.info("eval: untrained features of %d images (%.0f s)", len(img_tr) + len(img_te), time.perf_counter() - t0)
        rows.append(row(f"untrained, depth {len(init.cuts)}", init.cuts[-1], a, b))
    t0 = time.perf_counter()
    ftr = depth_features(backbone, img_tr, batch=e.batch_size, pool=e.pool)
    fte = depth_features(backbone, img_te, batch=e.batch_size, pool=e.pool)
    log.info("eval: features of %d images at %d depths (%.0f s)", len(img_tr) + len(img_te), len(backbone.cuts),
             time.perf_counter() - t0)
    for d, (a, b) in enumerate(zip(ftr, fte), start=1):
        rows.append(row(f"depth {d}", backbone.cuts[d - 1], a, b))
    return rows, len(img_tr), len(img_te)


def table(rows: list[Row], *, title: str = "") -> str:
    lines = ([f"{title}", ""] if title else []) + [
        "| features | layers | linear probe % | kNN % |", "|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.layers} | {r.linear:.2f} | {r.knn:.2f} |" for r in rows]
    return "\n".join(lines)


def counts_line(cfg: Config, n_train: int, n_test: int) -> str:
    e = cfg.eval
    return (f"{n_train} train / {n_test} test images; linear probe: scikit-learn LogisticRegression (L-BFGS) on "
            f"standardised features, C from {e.probe_c} by accuracy on a held-out {100 * e.holdout:.0f}% of the "
            f"train features (candidates fitted on up to {e.probe_search_samples} of the rest), refitted on all; "
            f"kNN: cosine, k={e.knn_k}, similarity-weighted votes")


def evaluate_run(run_dir: Path, *, train_samples: int | None = None, test_samples: int | None = None,
                 overrides: list[str] | None = None) -> list[Row]:
    """``overrides`` (``--eval.pool=cls`` ...) change the eval section only; the model comes from the run."""
    bad = [o for o in overrides or [] if not o.startswith("--eval.")]
    if bad:
        raise ConfigError(f"bimdist eval only takes --eval.* overrides, got {bad}")
    cfg = run_config(run_dir, overrides)
    units, step = load_units(cfg, run_dir)
    rows, n_train, n_test = evaluate(cfg, Backbone(cfg, units).eval(), train_samples=train_samples,
                                     test_samples=test_samples)
    md = table(rows, title=f"{cfg.method} run {run_dir} at step {step}") + "\n\n" + counts_line(cfg, n_train, n_test)
    (Path(run_dir) / "eval.md").write_text(md + "\n")
    (Path(run_dir) / "eval.json").write_text(json.dumps({"step": step, "method": cfg.method, "train_images": n_train,
                                                         "test_images": n_test, "rows": [asdict(r) for r in rows]},
                                                        indent=1))
    print(md, flush=True)
    return rows
