"""Heads on the Hugging Face Hub: ``--head hf:user/repo[@revision]`` and ``soapvit push``.

:func:`resolve_head` finds a corrections file of a Hub repo in the local Hugging Face cache first
(``$HF_HUB_CACHE``; no network, so it answers offline in milliseconds), and downloads it only when
the hub is reachable (:func:`~soapvit.backbones.hf.hub_reachable`, as for ``hf:`` models) and
``HF_HUB_OFFLINE`` is not set. A spec may name the file: ``hf:user/repo/sub/head.safetensors``;
otherwise the first of :data:`FILENAMES` the repo has.

:func:`push_head` uploads a corrections file with a generated model card (:func:`model_card`):
backbone, images, generator, the SI and weight of every component the SOAP head removes, and
evaluation results when given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import SoapvitError

FILENAMES = ("corrections.safetensors", "head.safetensors")
"""Files a repo is searched for when the spec names none (``soapvit push`` writes the first)."""
PREFIX = "hf:"


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:user/repo[/path/in/repo.safetensors][@revision]`` → ``(repo, filename, revision)``."""
    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    text, _, revision = text.partition("@")
    parts = [p for p in text.split("/") if p]
    if len(parts) < 2 or (revision == "" and "@" in spec):
        raise SoapvitError(f"--head {spec}: a Hub head is hf:user/repo[@revision] (or hf:user/repo/file.safetensors)")
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    return repo, filename, revision or None


def _offline() -> bool:
    from .backbones.hf import hub_reachable

    return os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()


def resolve_head(spec: str) -> Path:
    """The local path of the corrections file a ``hf:`` spec names (module doc)."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename, revision = parse_spec(spec)
    candidates = (filename,) if filename else FILENAMES
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it once, at import
    for name in candidates:
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    if _offline():
        raise SoapvitError(f"--head {spec}: not in the local Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}; "
                           f"looked for {', '.join(candidates)}) and the hub is not reachable (or HF_HUB_OFFLINE=1)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    for name in candidates:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))
        except EntryNotFoundError:
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise SoapvitError(f"--head {spec}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        except (HfHubHTTPError, OSError) as err:
            raise SoapvitError(f"--head {spec}: download failed ({str(err).splitlines()[0]})") from None
    raise SoapvitError(f"--head {spec}: {repo} has none of {', '.join(candidates)}")


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def model_card(corrections, *, repo: str, filename: str = FILENAMES[0],
               evaluations: Sequence[tuple[str, dict]] = ()) -> str:
    """The README.md of a head's repo: YAML front matter and the head's facts (module doc)."""
    from .corrections.soap import removed

    meta = corrections.metadata
    backbone = meta.get("backbone", "unknown")
    lines = ["---", "library_name: soapvit", "tags:", "- soapvit", "- soap", "- vision-transformer",
             "- training-free"]
    if str(backbone).startswith("hf:") and not Path(str(backbone)[3:]).exists():
        lines.append(f"base_model: {str(backbone)[3:]}")
    lines += ["---", "", f"# {repo}", "",
              f"Training-free token corrections for `{backbone}` fitted with "
              "[soapvit](https://pypi.org/project/soapvit/) (SOAP: Hjelkrem-Tan et al., CVPR 2026).", "",
              "| | |", "| --- | --- |",
              f"| backbone | `{backbone}` |",
              f"| weights digest | `{meta.get('weights_digest', '?')}` |",
              f"| input size / patch grid | {meta.get('image_size', '?')} px / {meta.get('grid', '?')} |",
              f"| images | {meta.get('images', 'not recorded')} ({meta.get('n_real', '?')} real, "
              f"{meta.get('n_synthetic', '?')} synthetic) |",
              f"| generator | {meta.get('generator', '?')} (version {meta.get('generator_version', '?')}) |",
              f"| block features | {meta.get('block_features', 'residual')} |",
              f"| corrections | {', '.join(f'{n} ({c.method}, block {c.block_})' for n, c in corrections.items())} |",
              f"| soapvit | {meta.get('soapvit_version', '?')} |", ""]
    head = corrections.soap
    if head is not None:
        d = head.blocks[head.apply_block]
        cut = removed(d.weights)
        lines += [f"## Removed components (block {head.apply_block})", "",
                  f"Variant `{meta.get('variant')}`, weighting `{meta.get('weighting')}`, μ {meta.get('mu')}, "
                  f"τ {meta.get('tau')}: the projector `I − V W Vᵀ` removes the components below "
                  "(weight > 0.5).", "", "| component | SI | weight | variance share from position |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| PC{c + 1} | {float(d.si[c]):.3f} | {float(d.weights[c]):.3f} | "
                  f"{float(d.position_share[c]):.0%} |" for c in cut] or ["| none | | | |"]
        lines.append("")
    if evaluations:
        lines += ["## Evaluation", ""]
        for name, payload in evaluations:
            results = payload.get("results", {})
            metrics = sorted({k for r in results.values() if isinstance(r, dict) for k, v in r.items()
                              if isinstance(v, (int, float))})
            lines += [f"### {payload.get('kind', name)} (`{name}`)", "",
                      "| variant | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
            for variant, r in results.items():
                if isinstance(r, dict):
                    lines.append(f"| {variant} | " + " | ".join(_fmt(r.get(m, "")) for m in metrics) + " |")
            lines.append("")
    lines += ["## Use", "", "```bash",
              f"soapvit extract --model {backbone} --head hf:{repo} --images IMAGES --out features/",
              f"soapvit export --model {backbone} --head hf:{repo} --out model.onnx", "```", "",
              "```python", "from soapvit.backbones import load", "from soapvit.corrections import CorrectionSet, attach",
              "from soapvit.hub import resolve_head", "",
              f"backbone = load({backbone!r})",
              f"corrections = CorrectionSet.load(resolve_head('hf:{repo}'))",
              "corrected = attach(backbone, corrections['soap'])  # (B, h, w, D) corrected patch tokens", "```", ""]
    if filename != FILENAMES[0]:
        lines.insert(-1, f"The file is `{filename}`: name it in the spec, `hf:{repo}/{filename}`.")
    return "\n".join(lines)


def push_head(head: str | Path, repo: str, *, evaluations: Sequence[tuple[str, dict]] = (),
              revision: str | None = None, private: bool = False, filename: str = FILENAMES[0],
              token: str | None = None) -> str:
    """Create ``repo`` (if needed), upload the corrections file and its card; returns the repo URL."""
    from huggingface_hub import HfApi

    from .corrections import CorrectionSet

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SoapvitError(f"repo must be user/name, not {repo!r}")
    corrections = CorrectionSet.load(head)  # a damaged file fails here, before any request
    card = model_card(corrections, repo=repo, filename=filename, evaluations=evaluations)
    api = HfApi(token=token)
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    message = f"soapvit push: corrections for {corrections.metadata.get('backbone', 'unknown backbone')}"
    api.upload_file(path_or_fileobj=str(head), path_in_repo=filename, repo_id=repo, repo_type="model",
                    revision=revision, commit_message=message)
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo="README.md", repo_id=repo,
                    repo_type="model", revision=revision, commit_message=f"{message} (model card)")
    return str(url)
