"""Training probe heads on cached tokens: LARS (the MAE linear-probe recipe) or AdamW, warm-up
then cosine learning rate, top-1/top-5 accuracy; and a weighted kNN classifier.

MAE linear-probe recipe (He et al., CVPR 2022): LARS, 90 epochs, base lr 0.1 scaled by ``batch / 256`` at batch
16384 (peak 6.4), 10 warm-up epochs, weight decay 0. LARS steps are relative to each layer's
norm (``lr · η`` per step), so the peak rate 6.4 is kept at our much smaller batches rather than
rescaled (rescaled to batch 256 it would be 0.1, and on a few thousand images the head barely
moves in 90 epochs). AdamW defaults to 1e-3. Parameter-free pools (CLS, mean) are pooled once
before training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runlog import Progress
from ..schedule import learning_rate
from ..validation import COUNT, Interval, Options, validate
from .cache import TokenCache
from .heads import ProbeClassifier

OPTIMIZERS = ("lars", "adamw")
DEFAULT_LR = {"lars": 0.1 * 16384 / 256, "adamw": 1e-3}


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, as in MAE's probe).

    For every parameter with more than one dimension the step ``g + wd·p`` is rescaled by
    ``η‖p‖ / ‖g + wd·p‖`` (1 when either norm is 0); vectors (biases) take the plain step and no
    weight decay. Then ``m ← μ m + step``, ``p ← p − lr m``.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = p.grad
                if p.ndim > 1:
                    step = step.add(p, alpha=group["weight_decay"])
                    p_norm, s_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(step)
                    ratio = torch.where((p_norm > 0) & (s_norm > 0), group["trust_coefficient"] * p_norm / s_norm,
                                        torch.ones_like(p_norm))
                    step = step * ratio
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.mul_(group["momentum"]).add_(step)
                p.add_(buf, alpha=-group["lr"])
        return loss


PROBE_TRAINING_CONSTRAINTS = {
    "optimizer": Options(OPTIMIZERS), "epochs": COUNT, "batch_size": Interval(int, 2), "lr": Interval(
        float, 0, open_low=True, optional=True), "warmup_epochs": Interval(float, 0), "weight_decay": Interval(float, 0),
    "seed": Interval(int),
}


@dataclass
class ProbeConfig:
    """Probe training settings; ``lr`` is the peak learning rate (None → 6.4 for LARS, 1e-3 for AdamW)."""

    optimizer: str = "lars"
    epochs: int = 90
    batch_size: int = 256
    lr: float | None = None
    warmup_epochs: float = 10
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self.__dict__, PROBE_TRAINING_CONSTRAINTS)

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


@dataclass
class ProbeScore:
    """Top-1/top-5 accuracy (fractions) and, for weighted pools, patch-weight statistics."""

    top1: float
    top5: float
    weight_entropy: float | None = None
    weight_count90: float | None = None
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> list[float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each ``k``."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [float(hit[:, :k].any(dim=1).float().mean()) for k in ks]


def _batch_inputs(cache: TokenCache, rows: Tensor, pooled: Tensor | None, device: torch.device | None = None) -> tuple:
    """The rows of a (host) cache as float inputs on ``device`` (the pooled features are there already)."""
    if pooled is not None:
        return (pooled[rows.to(pooled.device)].float(),)
    return tuple(t[rows].to(device or t.device, non_blocking=True).float() for t in (cache.prefix, cache.patches))


def _pool_all(classifier: ProbeClassifier, cache: TokenCache, chunk: int = 1024) -> Tensor:
    out = []
    for start in range(0, cache.prefix.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, cache.prefix.shape[0]))
        out.append(classifier.pool(*_batch_inputs(cache, rows, None, _device(classifier)))[0])
    return torch.cat(out)


def _logits(classifier: ProbeClassifier, inputs: tuple) -> tuple[Tensor, Tensor | None]:
    if len(inputs) == 1:
        return classifier.classify(inputs[0]), None
    return classifier(*inputs)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def train_probe(classifier: ProbeClassifier, train: TokenCache, val: TokenCache, config: ProbeConfig | None = None,
                progress: Progress | None = None, device: torch.device | str | None = None) -> ProbeScore:
    """Train ``classifier`` on ``train`` (a random view per image each epoch) and score it on
    the plain view of ``val``, on ``device`` (the backbone's; default: where the classifier is).
    The caches may stay on the host: each batch is moved to the device. The loss is summed on
    the device and read once per epoch (no host sync per step)."""
    config = config or ProbeConfig()
    if device is not None:
        classifier.to(device)
    device = _device(classifier)
    start_time = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    trainable_pool = any(p.requires_grad for p in classifier.pool.parameters())
    train_pooled = None if trainable_pool else _pool_all(classifier, train)
    params = [p for p in classifier.parameters() if p.requires_grad]
    if config.optimizer == "lars":
        optimizer = LARS(params, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
    n = len(train)
    steps_per_epoch = max(1, n // config.batch_size)  # drop the last partial batch (BatchNorm needs ≥ 2)
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch * config.warmup_epochs
    history = []
    step = 0
    classifier.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        views = torch.randint(0, train.views, (n,), generator=generator)
        epoch_loss = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            images = order[b * config.batch_size : (b + 1) * config.batch_size]
            rows = images * train.views + views[images]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, warmup, config.peak_lr)
            logits, _ = _logits(classifier, _batch_inputs(train, rows, train_pooled, device))
            loss = F.cross_entropy(logits, train.labels[images].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            step += 1
        history.append(float(epoch_loss) / steps_per_epoch)
        if progress:
            progress("training", epoch + 1, config.epochs)
    score = evaluate_probe(classifier, val)
    score.history = history
    score.seconds = time.perf_counter() - start_time
    return score


@torch.no_grad()
def evaluate_probe(classifier: ProbeClassifier, data: TokenCache, batch_size: int = 512) -> ProbeScore:
    """Top-1/top-5 on the plain view of ``data``; mean entropy and 90 %-mass patch count of the
    pool's weights when it has them."""
    from .attention import distribution_statistics

    classifier.eval()
    plain = data.plain()
    scores, entropies, counts = [], [], []
    for start in range(0, len(plain), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(plain)))
        logits, weights = classifier(*_batch_inputs(plain, rows, None, _device(classifier)))
        scores.append(logits.cpu())
        if weights is not None:
            e, c = distribution_statistics(weights)
            entropies.append(e.cpu())
            counts.append(c.float().cpu())
    top1, top5 = topk_accuracy(torch.cat(scores), plain.labels)
    if entropies:
        return ProbeScore(top1, top5, float(torch.cat(entropies).mean()), float(torch.cat(counts).mean()))
    return ProbeScore(top1, top5)


@torch.no_grad()
def knn_scores(train_features: Tensor, train_labels: Tensor, query: Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Weighted kNN class scores ``(Q, C)``: cosine similarity, the ``k`` nearest training
    samples vote for their label with weight ``exp(sim / temperature)`` (DINO's kNN)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)
