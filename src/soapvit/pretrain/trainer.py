"""Training loop with checkpoint/resume, and export of the trained encoder as a zoo backbone.

A run is reproducible from its checkpoint alone: the data order of epoch ``e`` is a
permutation seeded by ``(seed, e)`` and every step's augmentation/masking generator is seeded
by ``(seed, step)``, so resuming gives exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones.vit import ViTConfig, VisionTransformerBackbone
from ..errors import SoapvitError
from ..features import autocast
from ..io import write_with
from ..validation import COUNT, POSITIVE, Interval, validate
from ..schedule import learning_rate
from .mim import MAE, SemanticMIM, SimMIM
from .objective import Objective
from .selfdistill import DINO
from .supervised import Supervised

OBJECTIVES = ("mae", "maskfeat", "semanticmim", "supervised", "dino", "ibot")
RECONSTRUCTION_OBJECTIVES = ("mae", "maskfeat", "semanticmim")
"""predict the pixels or HOG of masked patches (AdamW betas 0.9/0.95, as in MAE)."""
SELF_DISTILLATION_OBJECTIVES = ("dino", "ibot")
MIM_OBJECTIVES = (*RECONSTRUCTION_OBJECTIVES, "ibot")
"""trained by masked patch prediction (iBOT predicts the teacher's patch tokens of masked
patches): the MIM class of the SOAP paper."""


TRAIN_CONSTRAINTS = {"epochs": POSITIVE, "batch_size": COUNT, "lr": Interval(float, 0, open_low=True, optional=True),
                     "min_lr": Interval(float, 0), "warmup_fraction": Interval(float, 0, 1),
                     "weight_decay": Interval(float, 0), "clip_grad": POSITIVE, "seed": Interval(int, 0),
                     "cpu_budget_s": Interval(float, 0, open_low=True, optional=True)}
VIT_CONSTRAINTS = {"image_size": COUNT, "patch_size": COUNT, "embed_dim": COUNT, "depth": COUNT, "num_heads": COUNT,
                   "mlp_ratio": POSITIVE, "num_prefix_tokens": Interval(int, 0)}
"""Checked when a run is defined, before any data is read."""


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in its checkpoints)."""

    objective: str
    epochs: float = 1.0
    batch_size: int = 128
    lr: float | None = None
    """peak learning rate; ``None`` = objective default (1e-3, self-distillation 5e-4)."""
    min_lr: float = 1e-5
    warmup_fraction: float = 0.05
    weight_decay: float = 0.05
    clip_grad: float = 3.0
    seed: int = 0
    vit: dict[str, Any] = field(default_factory=dict)
    """:class:`ViTConfig` overrides; SemanticMIM defaults to 8 prefix (proxy) tokens."""
    options: dict[str, Any] = field(default_factory=dict)
    """keyword overrides for the objective (e.g. ``mask_ratio``)."""
    cpu_budget_s: float | None = None
    """when set, the schedule runs on the CPU time this process consumes (equal compute per
    run on a shared machine): learning-rate and EMA progress = CPU seconds / budget, the run ends
    at the budget (``epochs`` is then only a cap). Resumes of such runs are not bit-identical."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SoapvitError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        validate(self.__dict__, TRAIN_CONSTRAINTS)
        unknown = sorted(set(self.vit) - set(ViTConfig.__dataclass_fields__))
        if unknown:
            raise SoapvitError(f"unknown architecture option(s) {', '.join(unknown)}")
        vit = asdict(self.vit_config())
        validate(vit, VIT_CONSTRAINTS)
        if vit["image_size"] % vit["patch_size"]:
            raise SoapvitError(f"--image-size {vit['image_size']} is not a multiple of --patch-size {vit['patch_size']}")
        if vit["embed_dim"] % vit["num_heads"]:
            raise SoapvitError(f"--embed-dim {vit['embed_dim']} is not a multiple of --num-heads {vit['num_heads']}")

    def vit_config(self) -> ViTConfig:
        defaults = {"num_prefix_tokens": 8} if self.objective == "semanticmim" else {}
        return ViTConfig(**{**defaults, **self.vit})

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.objective in SELF_DISTILLATION_OBJECTIVES else 1e-3


def build_objective(config: TrainConfig, num_classes: int) -> Objective:
    vit, opts, name = config.vit_config(), dict(config.options), config.objective
    if name == "mae":
        return MAE(vit, **{"target": "pixels", "masking": "random", "mask_ratio": 0.75, **opts})
    if name == "maskfeat":
        return SimMIM(vit, **{"target": "hog", "masking": "block", "mask_ratio": 0.4, **opts})
    if name == "semanticmim":
        return SemanticMIM(vit, **{"target": "hog", "masking": "random", "mask_ratio": 0.6, **opts})
    if name == "supervised":
        return Supervised(vit, num_classes=num_classes, **opts)
    return DINO(vit, **{"patch_loss": name == "ibot", **opts})


@dataclass
class TrainState:
    """Where a run stands (also what the log callback receives)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    elapsed_s: float
    images_per_s: float


@dataclass
class TrainResult:
    checkpoint: Path
    step: int
    total_steps: int
    elapsed_s: float
    final_loss: float
    """mean loss of the last 20 steps."""
    history: list[float]
    finished: bool
    """the schedule is complete (steps or CPU budget)."""
    cpu_s: float = 0.0


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _batch_indices(step: int, batch: int, n: int, seed: int) -> Tensor:
    per_epoch = n // batch
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[within * batch : (within + 1) * batch]


def _save(path: Path, payload: dict) -> None:
    write_with(path, lambda tmp: torch.save(payload, tmp), "training checkpoint")


def load_checkpoint(path: str | Path, what: str = "--resume") -> dict:
    """A training checkpoint, read with torch's safe unpickler (tensors and plain data only: a
    file that would run code when loaded is refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise SoapvitError(f"{what}: checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SoapvitError(f"{what}: {path} holds objects other than tensors and plain data; refused") from err
    except Exception as err:
        raise SoapvitError(f"{what}: {path} is not a soapvit training checkpoint ({type(err).__name__})") from err
    if not isinstance(payload, dict) or "train_config" not in payload:
        raise SoapvitError(f"{what}: {path} is not a soapvit training checkpoint")
    return payload


def train(
    config: TrainConfig,
    images: Tensor,
    labels: Tensor,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    device: torch.device | str = "cpu",
    max_seconds: float | None = None,
    max_steps: int | None = None,
    checkpoint_every_s: float = 180.0,
    log: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train (or continue) ``config`` on uint8 ``images`` (N, 3, H, W) with ``labels``.

    Checkpoints go to ``out`` every ``checkpoint_every_s`` seconds and at the end; the run stops
    after ``max_seconds`` / ``max_steps`` (this call) or when its schedule is done."""
    device = torch.device(device)
    out = Path(out)
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        config = TrainConfig(**state["train_config"])
    num_classes = int(labels.max()) + 1
    if images.shape[0] < config.batch_size:
        raise SoapvitError(f"--data: {images.shape[0]} images are fewer than one batch of {config.batch_size}")
    model = build_objective(config, state["num_classes"] if state else num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    betas = (0.9, 0.95) if config.objective in RECONSTRUCTION_OBJECTIVES else (0.9, 0.999)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.peak_lr(), betas=betas,
    )
    step, elapsed, cpu, history = 0, 0.0, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed_s"], list(state["history"])
        cpu = state.get("cpu_s", 0.0)
    n = images.shape[0]
    total = max(1, math.ceil(config.epochs * n / config.batch_size))

    def payload() -> dict:
        return {
            "train_config": asdict(config), "num_classes": state["num_classes"] if state else num_classes,
            "num_images": n,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "elapsed_s": elapsed, "cpu_s": cpu, "history": history, "total_steps": total,
        }

    model.train()
    start = last_save = time.monotonic()
    base_elapsed, base_cpu, cpu_start, steps_this_call = elapsed, cpu, time.process_time(), 0
    budget = config.cpu_budget_s

    def progress(next_step: int) -> float:
        return min(1.0, cpu / budget) if budget else next_step / total

    def done() -> bool:
        return step >= total or (budget is not None and cpu >= budget)

    while not done():
        t0 = time.monotonic()
        idx = _batch_indices(step, config.batch_size, n, config.seed)
        batch, batch_labels = images[idx].to(device), labels[idx].to(device)
        lr = learning_rate(progress(step + 1), 1.0, config.warmup_fraction, config.peak_lr(), config.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device):
            loss = model.loss(batch, batch_labels, _step_generator(config.seed, step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{config.objective}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
        opt.step()
        step += 1
        steps_this_call += 1
        history.append(loss.item())
        now = time.monotonic()
        elapsed, cpu = base_elapsed + (now - start), base_cpu + (time.process_time() - cpu_start)
        model.after_step(progress(step))
        if log is not None:
            log(TrainState(step, total, history[-1], lr, elapsed, config.batch_size / max(now - t0, 1e-9)))
        if now - last_save >= checkpoint_every_s:
            _save(out, payload())
            last_save = now
        if (max_seconds is not None and now - start >= max_seconds) or (max_steps is not None and steps_this_call >= max_steps):
            break
    _save(out, payload())
    tail = history[-20:]
    return TrainResult(out, step, total, elapsed, sum(tail) / max(1, len(tail)), history, done(), cpu)


def export_backbone(checkpoint: str | Path, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write the trained encoder of a training checkpoint as an fp16 zoo safetensors file;
    the card gets the objective and recipe."""
    state = load_checkpoint(checkpoint, "export")
    config = TrainConfig(**state["train_config"])
    model = build_objective(config, state["num_classes"])
    model.load_state_dict(state["model"])
    encoder = model.exported_encoder()
    tail = state["history"][-20:]
    full_card = {
        "objective": config.objective,
        "recipe": asdict(config),
        "steps": state["step"],
        "epochs_done": round(state["step"] * config.batch_size / state["num_images"], 4),
        "train_wall_s": round(state["elapsed_s"], 1),
        "train_cpu_s": round(state.get("cpu_s", 0.0), 1),
        "images_seen": state["step"] * config.batch_size,
        "final_loss": round(sum(tail) / max(1, len(tail)), 5),
        **(card or {}),
    }
    backbone = VisionTransformerBackbone(encoder.config, f"vit:{config.objective}", network=encoder)
    return backbone.save(path, full_card)
