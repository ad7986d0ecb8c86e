"""Resumable fits: what a fit has accumulated on one process and where it is in the data.

:class:`FitCheckpoint` writes a :class:`FitState` every few loader batches to one file per rank
(``rank-R-of-W.safetensors``: the accumulators as tensors, the position, the log and a
fingerprint of the fit as JSON in the file's metadata; never pickle), atomically (a temporary file,
then :func:`os.replace`), so a kill at any moment leaves the previous checkpoint intact. The same
command reads it back and continues; a checkpoint of another fit is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import distributed
from .errors import SoapvitError
from .io import save_safetensors
from .runlog import RunLog
from .safetensors_io import read_safetensors
from .stats import NormHistogram, ResponseCounts, StreamingMoments

CHECKPOINT_FORMAT = "soapvit-fit-checkpoint/1"
ACCUMULATORS = ("moments", "position", "real", "fake", "norms")


@dataclass
class FitState:
    """One process's accumulators and position. ``stage`` is the pass in progress: ``moments``
    (pass 1; this process's moments) or ``responses`` (pass 2; moments, position sums and
    ``n_real`` of all processes). ``real_steps`` and ``synthetic_steps`` count the loader batches
    of the current pass this process has finished."""

    moments: dict[int, StreamingMoments]
    position_sum: dict[int, Tensor]
    real: dict[int, ResponseCounts]
    fake: dict[int, ResponseCounts]
    log: RunLog = field(default_factory=RunLog)
    stage: str = "moments"
    n_real: int = 0
    real_steps: int = 0
    synthetic_steps: int = 0
    norms: dict[int, NormHistogram] = field(default_factory=dict)

    @classmethod
    def fresh(cls, blocks, grid: tuple[int, int], dim: int, device: torch.device) -> FitState:
        return cls({b: StreamingMoments(dim, device) for b in blocks},
                   {b: torch.zeros(*grid, dim, dtype=torch.float64, device=device) for b in blocks},
                   {b: ResponseCounts.zeros(grid, dim, device) for b in blocks},
                   {b: ResponseCounts.zeros(grid, dim, device) for b in blocks},
                   norms={b: NormHistogram(device=device) for b in blocks})

    def finish_moments(self) -> None:
        """End pass 1: merge moments, position sums and counts across ranks; start pass 2."""
        self.moments = {b: m.across_ranks() for b, m in self.moments.items()}
        self.position_sum = {b: distributed.all_reduce_sum(s) for b, s in self.position_sum.items()}
        self.norms = {b: h.across_ranks() for b, h in self.norms.items()}
        self.n_real = int(distributed.all_reduce_sum(torch.tensor([self.n_real])))
        self.stage, self.real_steps, self.synthetic_steps = "responses", 0, 0

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for b in self.moments:
            out |= {f"moments.{b}.{k}": v for k, v in self.moments[b].state_dict().items()}
            out[f"position.{b}"] = self.position_sum[b]
            out |= {f"real.{b}.{k}": v for k, v in self.real[b].state_dict().items()}
            out |= {f"fake.{b}.{k}": v for k, v in self.fake[b].state_dict().items()}
            out |= {f"norms.{b}.{k}": v for k, v in self.norms[b].state_dict().items()}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def position(self) -> dict:
        return {"stage": self.stage, "n_real": self.n_real, "real_steps": self.real_steps,
                "synthetic_steps": self.synthetic_steps, "log": self.log.to_dict()}

    @classmethod
    def restore(cls, tensors: dict[str, Tensor], position: dict, device: torch.device) -> FitState:
        blocks = sorted({int(k.split(".")[1]) for k in tensors})

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        log = RunLog(**position["log"])
        return cls({b: StreamingMoments.from_state_dict(part(f"moments.{b}."), device) for b in blocks},
                   {b: tensors[f"position.{b}"].to(device) for b in blocks},
                   {b: ResponseCounts.from_state_dict(part(f"real.{b}."), device) for b in blocks},
                   {b: ResponseCounts.from_state_dict(part(f"fake.{b}."), device) for b in blocks},
                   log, position["stage"], position["n_real"], position["real_steps"], position["synthetic_steps"],
                   {b: NormHistogram.from_state_dict(part(f"norms.{b}."), device) for b in blocks})


STATE_KEYS = ("moments.{b}.count", "moments.{b}.mean", "moments.{b}.scatter", "position.{b}", "real.{b}.centred",
              "real.{b}.raw", "real.{b}.images", "fake.{b}.centred", "fake.{b}.raw", "fake.{b}.images",
              "norms.{b}.counts", "norms.{b}.range")
COUNTS = ("n_real", "real_steps", "synthetic_steps")


def state_digest(tensors: dict[str, Tensor], position: dict) -> str:
    """SHA-256 over a state's tensors and position: written with the state, checked on load, so an
    edited or corrupted checkpoint is refused rather than resumed."""
    import hashlib

    from .backbones.wheels import tensor_digest

    return hashlib.sha256((tensor_digest(tensors) + json.dumps(position, sort_keys=True)).encode()).hexdigest()


def state_damage(tensors: dict[str, Tensor], info: dict) -> str | None:
    """Why a checkpoint's content cannot be a saved :class:`FitState`, or None."""
    position = info.get("position")
    if not isinstance(position, dict):
        return "its metadata has no position"
    if position.get("stage") not in ("moments", "responses"):
        return f"its stage is {position.get('stage')!r}, not moments or responses"
    for key in COUNTS:
        value = position.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"its {key} is {value!r}, not a count"
    if not isinstance(position.get("log"), dict):
        return "its metadata has no log"
    blocks = info["fingerprint"].get("blocks")
    try:
        found = sorted({int(k.split(".")[1]) for k in tensors})
    except (IndexError, ValueError):
        return "it holds tensors of another layout"
    if not found or (isinstance(blocks, list) and found != sorted(blocks)):
        return f"it holds blocks {found}, the fit has {blocks}"
    for b in found:
        missing = [k.format(b=b) for k in STATE_KEYS if k.format(b=b) not in tensors]
        if missing:
            return f"it lacks {', '.join(missing)}"
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"tensor {key} holds NaN or inf values"
        if not value.is_floating_point() and bool((value < 0).any()):
            return f"tensor {key} holds negative counts"
    if "digest" in info:
        if info["digest"] != state_digest(tensors, position):
            return "its content does not match the digest written with it (edited or corrupted)"
    elif position["stage"] == "moments":  # files without a digest: the counts must agree with the moments
        for b in found:
            tokens = int(tensors[f"moments.{b}.count"])
            grid = tensors[f"position.{b}"].shape[:2].numel()
            if tokens != position["n_real"] * grid:
                return f"its n_real {position['n_real']} does not match the {tokens} tokens of block {b}'s moments"
    return None


class FitCheckpoint:
    """This rank's checkpoint file in ``folder``, written every ``every`` finished loader batches;
    ``fingerprint`` (JSON-able) names everything the accumulated numbers depend on."""

    def __init__(self, folder: str | Path, every: int, fingerprint: dict) -> None:
        if every < 1:
            raise SoapvitError(f"--checkpoint-every must be at least 1, not {every}")
        self.folder, self.every = Path(folder), every
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.path = self.folder / f"rank-{distributed.rank()}-of-{distributed.world_size()}.safetensors"
        self.steps = 0
        self.resumed_from: str | None = None
        """The digest of the state :meth:`load` resumed (recorded in the head)."""

    def load(self, device: torch.device) -> FitState | None:
        """The saved state, or None when this rank has none yet."""
        if not self.path.is_file():
            others = sorted(p.name for p in self.folder.glob("rank-*-of-*.safetensors")
                            if not p.name.endswith(f"-of-{distributed.world_size()}.safetensors"))
            if others:
                raise SoapvitError(f"--checkpoint {self.folder} holds a fit run by another number of processes "
                                   f"({others[0]}): resume it with as many processes, or use another folder")
            return None
        tensors, metadata = read_safetensors(self.path, "--checkpoint file")

        def damaged(reason: str) -> SoapvitError:
            return SoapvitError(f"damaged --checkpoint file {self.path}: {reason}; delete it to start the fit again")

        try:
            info = json.loads(metadata.get("soapvit", "{}"))
        except ValueError:
            raise damaged("its metadata is not JSON") from None
        if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
            raise SoapvitError(f"--checkpoint file {self.path} is not a {CHECKPOINT_FORMAT} file")
        if not isinstance(info.get("fingerprint"), dict):
            raise damaged("its metadata has no fingerprint of the fit")
        changed = sorted(k for k in {*info["fingerprint"], *self.fingerprint}
                         if info["fingerprint"].get(k) != self.fingerprint.get(k))
        if changed:
            raise SoapvitError(f"--checkpoint {self.folder} holds another fit (its {', '.join(changed)} differ): "
                               "rerun the same command, or use another folder")
        reason = state_damage(tensors, info)
        if reason:
            raise damaged(reason)
        try:
            state = FitState.restore(tensors, info["position"], device)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise damaged(f"incomplete ({type(err).__name__}: {err})") from None
        self.resumed_from = info.get("digest")
        return state

    def save(self, state: FitState) -> None:
        """Write ``state`` atomically."""
        tensors, position = state.tensors(), state.position()
        info = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "position": position,
                "digest": state_digest(tensors, position)}
        save_safetensors(tensors, self.path, {"soapvit": json.dumps(info)}, "--checkpoint file")

    def step_done(self, state: FitState) -> None:
        """Count a finished loader batch; save every ``every`` of them."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.save(state)


def align_stages(state: FitState) -> FitState:
    """After a resume, bring every rank to the same pass: a kill between the end of pass 1 and
    the next checkpoint can leave some ranks in pass 1 while others hold the merged moments;
    those are sent to the ranks behind, which start pass 2 from its first batch."""
    stages = distributed.all_gather_objects(state.stage)
    if "responses" not in stages or "moments" not in stages:
        return state
    source = stages.index("responses")
    merged = distributed.broadcast_object(
        (state.tensors(), state.position()) if distributed.rank() == source else None, source)
    if state.stage == "responses":
        return state
    device = state.position_sum[next(iter(state.position_sum))].device
    ahead = FitState.restore(*merged, device)
    fresh = FitState.fresh(ahead.moments, tuple(ahead.real[next(iter(ahead.real))].raw.shape[:2]),
                           ahead.moments[next(iter(ahead.moments))].dim, device)
    return FitState(ahead.moments, ahead.position_sum, fresh.real, fresh.fake, state.log, "responses", ahead.n_real,
                    norms=ahead.norms)
