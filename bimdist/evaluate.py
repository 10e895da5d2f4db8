"""``bimdist eval``: frozen features at every depth -> linear probe and kNN accuracy, with a raw-pixel baseline."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bimdist.config import Config, ConfigError
from bimdist.data.batches import eval_images
from bimdist.data.stream import DataStats
from bimdist.data.synthetic import synthetic_image
from bimdist.model.backbone import Backbone
from bimdist.model.unit import normalize_images
from bimdist.runs import load_units, run_config

log = logging.getLogger("bimdist.eval")


@dataclass
class Row:
    name: str
    layers: int
    linear: float
    knn: float


def labelled_split(cfg: Config, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of the train or test split (synthetic runs draw disjoint index ranges)."""
    if cfg.data.source == "synthetic":
        base = 0 if split == "train" else 10**6
        pairs = [synthetic_image(base + i, size=cfg.model.img_size, chans=cfg.model.in_chans, seed=cfg.run.seed)
                 for i in range(limit)]
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


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *, epochs: int,
                 seed: int = 0) -> float:
    """Standardised features, one linear layer, AdamW with a cosine schedule; test accuracy in percent.

    Deterministic for a given ``seed``: the head starts at zero (the problem is convex, so nothing is lost) and
    only ``seed`` orders the mini-batches; the global RNG is neither read nor advanced."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes = int(max(ytr.max(), yte.max())) + 1
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.utils.skip_init(torch.nn.Linear, xtr.shape[1], classes)  # no random init drawn
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    batch = 256
    total = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * float((head(xte).argmax(1) == yte).float().mean())


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
             test_samples: int | None = None) -> list[Row]:
    e = cfg.eval
    img_tr, ytr = labelled_split(cfg, "train", train_samples or e.train_samples)
    img_te, yte = labelled_split(cfg, "test", test_samples or e.test_samples)
    log.info("eval: %d train / %d test images, %d depths", len(img_tr), len(img_te), len(backbone.cuts))
    pix_tr = normalize_images(img_tr, backbone.mean, backbone.std).flatten(1)
    pix_te = normalize_images(img_te, backbone.mean, backbone.std).flatten(1)
    rows = [Row("raw pixels", 0, linear_probe(pix_tr, ytr, pix_te, yte, epochs=e.probe_epochs, seed=cfg.run.seed),
                knn(pix_tr, ytr, pix_te, yte, k=e.knn_k))]
    ftr = depth_features(backbone, img_tr, batch=e.batch_size, pool=e.pool)
    fte = depth_features(backbone, img_te, batch=e.batch_size, pool=e.pool)
    for d, (a, b) in enumerate(zip(ftr, fte), start=1):
        rows.append(Row(f"depth {d}", backbone.cuts[d - 1],
                        linear_probe(a, ytr, b, yte, epochs=e.probe_epochs, seed=cfg.run.seed),
                        knn(a, ytr, b, yte, k=e.knn_k)))
    return rows


def table(rows: list[Row], *, title: str = "") -> str:
    lines = ([f"{title}", ""] if title else []) + [
        "| features | layers | linear probe % | kNN % |", "|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.layers} | {r.linear:.2f} | {r.knn:.2f} |" for r in rows]
    return "\n".join(lines)


def evaluate_run(run_dir: Path, *, train_samples: int | None = None, test_samples: int | None = None,
                 overrides: list[str] | None = None) -> list[Row]:
    """``overrides`` (``--eval.pool=cls`` ...) change the eval section only; the model comes from the run."""
    bad = [o for o in overrides or [] if not o.startswith("--eval.")]
    if bad:
        raise ConfigError(f"bimdist eval only takes --eval.* overrides, got {bad}")
    cfg = run_config(run_dir, overrides)
    units, step = load_units(cfg, run_dir)
    rows = evaluate(cfg, Backbone(cfg, units).eval(), train_samples=train_samples, test_samples=test_samples)
    md = table(rows, title=f"{cfg.method} run {run_dir} at step {step}")
    (Path(run_dir) / "eval.md").write_text(md + "\n")
    (Path(run_dir) / "eval.json").write_text(json.dumps({"step": step, "method": cfg.method,
                                                         "rows": [asdict(r) for r in rows]}, indent=1))
    print(md, flush=True)
    return rows
