"""Corrected features on disk: every image's patch tokens, per variant, in safetensors shards.

:func:`extract` runs the token pipeline (:func:`~soapvit.features.iter_tokens`) over an image
source and writes, for every image, the patch tokens ``(h, w, D)`` of the chosen blocks for the
``original`` variant and one variant per correction (optionally the prefix tokens ``(P, D)``), as
fp16 or fp32. Layout of the output folder::

    manifest.json                               backbone id, weights digest, head, settings
    shard-r000-of-001-00000.safetensors         tensors ``{index}/{variant}/tokens/{block}``
    …                                           (and ``…/prefix/{block}``)
    index.json                                  per image: name, shard, grid, dtype, byte offsets

A shard is closed before its tensor data would exceed ``shard_mb`` (the JSON header adds a few
KiB; an image larger than the bound gets a shard of its own) and written to a unique temporary
file, then renamed: a killed run leaves no half-written shard. Each shard records in its metadata the images it holds and where the
pipeline resumes after it, so a rerun of the same command skips the finished shards and writes
byte-identical files (the shard boundaries depend only on the data). Under ``torchrun`` every
rank encodes its share of the batches and writes its own shards; rank 0 writes the index.

:func:`open` reads such a folder: tokens by image name, or every image as a stream (each shard is
memory-mapped by safetensors' ``safe_open``).
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .backbones.base import Backbone
from .errors import SoapvitError
from .runlog import Progress, RunLog

FORMAT = "soapvit-extract/1"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MANIFEST, INDEX = "manifest.json", "index.json"


def shard_name(rank: int, world: int, number: int) -> str:
    return f"shard-r{rank:03d}-of-{world:03d}-{number:05d}.safetensors"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the head file recorded in the manifest)."""
    import hashlib

    digest = hashlib.sha256()
    with builtins.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict) -> None:
    """One safetensors file, written to a unique temporary file then renamed. A single metadata
    key keeps the header byte-identical from run to run (safetensors orders several keys by hash)."""
    from safetensors.torch import save_file

    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, partial, metadata={"soapvit": json.dumps(metadata, sort_keys=True)})
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def read_header(path: Path) -> tuple[dict, dict, int]:
    """``(tensor entries, soapvit metadata, byte offset of the data)`` of a shard, header only."""
    with builtins.open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    meta = json.loads(header.pop("__metadata__", {}).get("soapvit", "{}"))
    return header, meta, 8 + length


class _Named:
    """A source whose target is the item's name (so names reach the writer from any worker)."""

    def __init__(self, source) -> None:
        self.source = source
        if hasattr(source, "stream"):
            self.limit = source.limit
            self.stream = self._stream

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def image_size(self, index: int):
        return self.source.image_size(index)

    def load(self, index: int):
        return self.source.load(index)[0], self.source.name(index)

    def _stream(self, reader: int, readers: int):
        for index, name, load in self.source.stream(reader, readers):
            yield index, name, (lambda load=load, name=name: (load()[0], name))


@dataclass
class ExtractReport:
    """What a run did: images written (by this process), shards written and kept, seconds."""

    out: Path
    images: int = 0
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log: RunLog = field(default_factory=RunLog)

    @property
    def warnings(self) -> list[str]:
        return self.log.warnings


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SoapvitError(f"{path} cannot be read ({err}): delete the folder to start over") from None
    differ = [k for k in sorted(set(existing) | set(manifest)) if existing.get(k) != manifest.get(k)]
    if differ:
        raise SoapvitError(f"--out {out} holds another extraction (its {', '.join(differ)} differ): delete the folder "
                           "to start over, or choose another --out")


def _finished_shards(out: Path, rank: int, world: int) -> list[tuple[Path, dict]]:
    """This rank's complete shards, in order, with their metadata (a gap ends the run of them)."""
    shards = []
    for number in range(10**5):
        path = out / shard_name(rank, world, number)
        if not path.is_file():
            break
        try:
            shards.append((path, read_header(path)[1]))
        except (OSError, ValueError, struct.error):
            break  # not ours to trust: it is written again
    return shards


def extract(
    backbone: Backbone,
    source,
    out: str | Path,
    *,
    corrections: Mapping[str, Any] | None = None,
    blocks: int | str | Sequence[int] = "last",
    prefix: bool = False,
    dtype: str = "fp16",
    shard_mb: float = 256.0,
    batch_size: int = 32,
    image_transform=None,
    num_workers: int | None = None,
    describe: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    log: RunLog | None = None,
) -> ExtractReport:
    """Write the tokens of every image of ``source`` to ``out`` (module doc); resumable.

    ``corrections`` (name → correction, checked against the backbone by the caller) add a variant
    each; ``describe`` adds plain data to the manifest (the head file and its digest, the images)."""
    from .data.transforms import ImageTransform
    from .features import iter_tokens

    if dtype not in DTYPES:
        raise SoapvitError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not shard_mb > 0:
        raise SoapvitError(f"--shard-mb must be positive, not {shard_mb}")
    start = time.perf_counter()
    out = Path(out)
    corrections = dict(corrections or {})
    block_ids = backbone.resolve_blocks(blocks)
    transform = image_transform or ImageTransform.for_backbone(backbone)
    rank, world = distributed.rank(), distributed.world_size()
    manifest = {
        "format": FORMAT, "backbone": backbone.model_id, "weights_digest": backbone.weights_digest(),
        "variants": ["original", *corrections], "blocks": block_ids, "prefix": bool(prefix), "dtype": dtype,
        "shard_mb": float(shard_mb), "batch_size": int(batch_size), "world_size": world,
        "transform": {"size": transform.size, "mode": transform.mode, "resample": transform.resample,
                      "mean": list(transform.mean), "std": list(transform.std)},
        "grid_patch": backbone.patch_size, "embed_dim": backbone.embed_dim,
        "corrections": {name: {"method": c.method, "block": c.block_, "digest": c.digest()}
                        for name, c in corrections.items()},
        **dict(describe or {}),
    }
    manifest = json.loads(json.dumps(manifest, default=str))
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)
    distributed.barrier()
    if distributed.is_main() and not (out / MANIFEST).is_file():
        _atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    for stray in out.glob(f".shard-r{rank:03d}-of-{world:03d}-*.partial"):
        stray.unlink(missing_ok=True)  # what a killed run was writing

    report = ExtractReport(out=out, log=log if log is not None else RunLog())
    done = _finished_shards(out, rank, world)
    report.kept = [p.name for p, _ in done]
    resume = done[-1][1]["resume"] if done else {"step": 0, "skip": 0, "final": False}
    if resume.get("final"):
        report.seconds = time.perf_counter() - start
        _finish(out, manifest, report)
        return report
    number = len(done)
    limit = int(shard_mb * 2**20)
    target = DTYPES[dtype]
    pending: dict[str, Tensor] = {}
    entries: list[dict] = []
    size = 0
    step, seen = resume["step"], 0  # images of the current step already consumed

    def flush(resume_at: dict) -> None:
        nonlocal pending, entries, size, number
        path = out / shard_name(rank, world, number)
        _atomic_save(pending, path, {"format": FORMAT, "images": entries, "resume": resume_at})
        report.written.append(path.name)
        pending, entries, size, number = {}, [], 0, number + 1

    batches = iter_tokens(backbone, _Named(source), transform, blocks=block_ids, corrections=corrections,
                          batch_size=batch_size, num_workers=num_workers, across_ranks=True,
                          start_step=resume["step"], log=report.log, progress=progress, stage="extracting")
    for batch in batches:
        if batch.step != step:
            step, seen = batch.step, 0
        for j, (index, name) in enumerate(zip(batch.indices, batch.targets)):
            seen += 1
            if step == resume["step"] and seen <= resume["skip"]:
                continue  # written before the run was stopped
            tensors = {}
            for variant, feats in batch.variants.items():
                for b in block_ids:
                    tensors[f"{index}/{variant}/tokens/{b}"] = feats.tokens[b][j].to("cpu", target).clone()
                    if prefix:
                        tensors[f"{index}/{variant}/prefix/{b}"] = feats.prefix[b][j].to("cpu", target).clone()
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            if pending and size + nbytes > limit:
                flush({"step": step, "skip": seen - 1, "final": False})
            grid = list(batch.original.tokens[block_ids[0]].shape[1:3])
            entries.append({"name": str(name), "index": int(index), "grid": grid})
            pending.update(tensors)
            size += nbytes
            report.images += 1
    # the last shard says the run is complete (an empty source still gets one, without images)
    flush({"step": step + 1 if report.images or done else 0, "skip": 0, "final": True})
    report.seconds = time.perf_counter() - start
    _finish(out, manifest, report)
    return report


def _finish(out: Path, manifest: dict, report: ExtractReport) -> None:
    """Every rank done: rank 0 writes the index of every shard."""
    distributed.barrier()
    if distributed.is_main():
        write_index(out, manifest)
    distributed.barrier()


def write_index(out: Path, manifest: dict | None = None) -> Path:
    """``index.json`` from the shards' headers: per image its name, shard, grid, dtype and, per
    tensor, the key, shape and absolute byte offsets in the shard."""
    manifest = manifest or json.loads((out / MANIFEST).read_text())
    world = manifest["world_size"]
    images = []
    for rank in range(world):
        for path, _ in _finished_shards(out, rank, world):
            header, meta, data_start = read_header(path)
            for entry in meta["images"]:
                key = f"{entry['index']}/"
                tensors = {k[len(key):]: {"key": k, "shape": v["shape"],
                                          "offsets": [data_start + v["data_offsets"][0], data_start + v["data_offsets"][1]]}
                           for k, v in header.items() if k.startswith(key)}
                images.append({**entry, "shard": path.name, "rank": rank, "dtype": manifest["dtype"],
                               "tensors": dict(sorted(tensors.items()))})
    images.sort(key=lambda e: e["index"])
    payload = {"format": FORMAT, "images": images}
    _atomic_write_bytes(out / INDEX, (json.dumps(payload, indent=None, sort_keys=True) + "\n").encode())
    return out / INDEX


@dataclass
class Record:
    """One image's tokens: ``tokens[variant][block]`` ``(h, w, D)``, ``prefix[variant][block]`` ``(P, D)``."""

    name: str
    index: int
    grid: tuple[int, int]
    tokens: dict[str, dict[int, Tensor]]
    prefix: dict[str, dict[int, Tensor]]


class ExtractedFeatures(Mapping[str, Record]):
    """A folder written by :func:`extract`: ``features[name]`` → :class:`Record`; iterating gives
    the names in source order; :meth:`stream` yields every record, shard by shard."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
            index = json.loads((self.folder / INDEX).read_text())
        except FileNotFoundError as err:
            raise SoapvitError(f"{self.folder} is not a finished soapvit extract folder ({Path(err.filename).name} "
                               "is missing)") from None
        self.entries = {e["name"]: e for e in index["images"]}
        self._handles: dict[str, Any] = {}

    @property
    def variants(self) -> list[str]:
        return list(self.manifest["variants"])

    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["blocks"])

    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, name: str) -> Record:
        entry = self.entries[name]
        handle = self._handle(entry["shard"])
        tokens: dict[str, dict[int, Tensor]] = {}
        prefix: dict[str, dict[int, Tensor]] = {}
        for rest, tensor in entry["tensors"].items():
            variant, kind, block = rest.rsplit("/", 2)
            (tokens if kind == "tokens" else prefix).setdefault(variant, {})[int(block)] = handle.get_tensor(tensor["key"])
        return Record(entry["name"], entry["index"], tuple(entry["grid"]), tokens, prefix)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def stream(self) -> Iterator[Record]:
        """Every record, shard by shard (one memory-mapped shard open at a time)."""
        by_shard: dict[str, list[str]] = {}
        for name, entry in self.entries.items():
            by_shard.setdefault(entry["shard"], []).append(name)
        for shard, names in sorted(by_shard.items()):
            for name in names:
                yield self[name]
            self._handles.pop(shard, None)


def open(folder: str | Path) -> ExtractedFeatures:  # noqa: A001  (soapvit.extract.open, as the issue names it)
    """Read a folder written by :func:`extract`."""
    return ExtractedFeatures(folder)
