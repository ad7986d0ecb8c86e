"""One self-contained HTML page per set of SOAP heads: card, SI per block, positional variance,
removed components, optional token maps and evaluation tables.

The page opens from disk with no network: figures are PNG data URIs, the stylesheet is inline,
there is no script, and the string ``http`` appears nowhere in the file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

from .errors import SoapvitError
from .plots import (NULL_DIRECTION, draw_si_curve, null_components, plot_max_si_per_block, render_head_figures,
                    response_maps_figure)
from .io import write_text
from .corrections.soap import REMOVED_WEIGHT, SI_THRESHOLD, SoapHead, high_si, removed

#: Section headings of every head's part of the page, in order.
HEAD_SECTIONS = ("Card", "Semantic invariance per block", "Positional variance", "Removed components",
                 "Tokens before and after the head")
#: Top-level section headings, in order (each head's own section comes between the two).
PAGE_SECTIONS = ("Models compared", "Evaluations")

_STYLE = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1b1b1b; --muted: #555555; --line: #d0d0d0;
        --panel: #f4f4f4; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #16181c; --fg: #e8e8e8; --muted: #a8a8a8; --line: #3a3d44; --panel: #22252b; }
}
body { background: var(--bg); color: var(--fg); font: 16px/1.5 system-ui, sans-serif; margin: 0 auto;
       max-width: 72rem; padding: 1rem 1.5rem 3rem; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-top: 2px solid var(--line); padding-top: 1rem; margin-top: 2.5rem; }
nav ul { columns: 2; }
.muted { color: var(--muted); }
dl.card { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; background: var(--panel);
          padding: .8rem 1rem; border-radius: 6px; }
dl.card dt { font-weight: 600; }
dl.card dd { margin: 0; }
table { border-collapse: collapse; margin: .8rem 0; }
caption { text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid var(--line); padding: .2rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; background: #ffffff; border-radius: 4px; }
figcaption { color: var(--muted); max-width: 60rem; }
"""


def _data_uri(png: bytes) -> str:
    """PNG bytes as a data URI. ``http`` must not appear even by chance inside the base64 text:
    when it does, the same pixels are re-encoded at another zlib level."""
    for level in range(10):
        text = base64.b64encode(png).decode("ascii")
        if "http" not in text:
            return f"data:image/png;base64,{text}"
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).save(buffer, "PNG", compress_level=level)
        png = buffer.getvalue()
    raise SoapvitError("could not encode a figure without the string 'http'")


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return _data_uri(buffer.getvalue())


def _figure(uri: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _relative_depth(head: SoapHead, block: int) -> float:
    depth = head.metadata.get("backbone_config", {}).get("num_blocks", max(head.blocks) + 1)
    return (block + 1) / depth


def removed_components(head: SoapHead, block: int | None = None) -> list[int]:
    """Components (descending-eigenvalue index) removed at ``block`` (default: the block the head
    applies to)."""
    return removed(head.blocks[head.apply_block if block is None else block].weights)


# -- figures ------------------------------------------------------------------------------------
def si_small_multiples_figure(head: SoapHead):
    """One panel per fitted block: SI of every component sorted in descending order, the
    LayerNorm null direction marked apart (:func:`~soapvit.plots.draw_si_curve`)."""
    blocks = sorted(head.blocks)
    cols = min(4, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, b in zip(axes.flat, blocks):
        d = head.blocks[b]
        draw_si_curve(ax, d, lw=1.2)
        ax.axhline(SI_THRESHOLD, color="grey", lw=0.8, ls=":")
        marker = " (head)" if b == head.apply_block else ""
        above = high_si(d.si).numel()
        ax.set_title(f"block {b}{marker}: max {d.si.max().item():.2f}, {above} ≥ {SI_THRESHOLD}", fontsize=8)
        ax.set_ylim(0, 1.02)
    for ax in axes.flat[len(blocks):]:
        ax.set_axis_off()
    fig.supxlabel("rank by SI", fontsize=9)
    fig.supylabel("semantic invariance", fontsize=9)
    fig.tight_layout()
    if any(null_components(head.blocks[b]) for b in blocks):
        cross = Line2D([], [], linestyle="none", marker="x", mew=1.5, color="grey")
        fig.legend([cross], [f"{NULL_DIRECTION} (no variance: SI undefined)"], loc="upper center", fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def si_small_multiples(head: SoapHead) -> str:
    """:func:`si_small_multiples_figure` as a data URI."""
    return _figure_uri(si_small_multiples_figure(head))


def components_above_threshold_vs_depth(heads: Mapping[str, SoapHead]) -> str:
    """Number of components with SI ≥ the threshold in each block, against relative depth."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, head in heads.items():
        blocks = sorted(head.blocks)
        counts = [high_si(head.blocks[b].si).numel() for b in blocks]
        ax.plot([_relative_depth(head, b) for b in blocks], counts, marker="o", ms=3, label=label)
    ax.set(xlabel="relative depth", ylabel=f"components with SI ≥ {SI_THRESHOLD}", ylim=(0, None),
           title="non-semantic components vs depth")
    ax.legend(fontsize=8)
    return _figure_uri(fig)


def position_share_map(head: SoapHead, count: int = 24) -> str:
    """Blocks × leading components: share of each component's variance explained by patch
    position; dots mark components with SI ≥ the threshold."""
    blocks = sorted(head.blocks)
    count = min(count, min(len(head.blocks[b].si) for b in blocks))
    share = np.stack([head.blocks[b].position_share[:count].numpy() for b in blocks])
    high = np.stack([head.blocks[b].si[:count].numpy() >= SI_THRESHOLD for b in blocks])
    null = np.zeros_like(high)
    for row, b in enumerate(blocks):
        null[row, [c for c in null_components(head.blocks[b]) if c < count]] = True
    share[null] = np.nan  # no variance: no share to show
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * count + 2), 0.3 * len(blocks) + 1.6))
    image = ax.imshow(share, vmin=0, vmax=1, cmap="magma", aspect="auto")
    rows, cols = np.nonzero(high)
    ax.scatter(cols, rows, s=10, c="cyan", edgecolors="black", linewidths=0.4)
    title = f"variance share from patch position (dots: SI ≥ {SI_THRESHOLD}"
    if null.any():
        rows, cols = np.nonzero(null)
        ax.scatter(cols, rows, s=18, marker="x", c="grey", linewidths=1.2)
        title += f"; ×: {NULL_DIRECTION}"
    ax.set_xticks(range(count), [f"{c + 1}" for c in range(count)], fontsize=7)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set(xlabel="principal component (descending eigenvalue)", ylabel="block", title=title + ")")
    fig.colorbar(image, ax=ax, label="variance share from position", fraction=0.04)
    return _figure_uri(fig)


def removed_response_maps(head: SoapHead, components: Sequence[int]) -> str:
    """For each removed component: response probability per position on real (P) and on
    synthetic (Q) images."""
    fig = response_maps_figure(head, components)
    return _figure_uri(fig)


def _png_file_uri(path: Path) -> str:
    return _data_uri(path.read_bytes())


# -- evaluations --------------------------------------------------------------------------------
def evaluation_variants(payload: Mapping, name: str = "evaluation") -> dict[str, dict[str, float]]:
    """Variant → numeric metrics from the ``"results"`` mapping of a ``soapvit eval … --out`` JSON.
    Non-numeric entries (per-class tables, per-image examples) are left out."""
    results = payload.get("results")
    if not isinstance(results, Mapping):
        raise SoapvitError(f"{name} has no 'results' mapping: not a file written by soapvit eval --out")
    return {
        variant: {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for variant, metrics in results.items() if isinstance(metrics, Mapping)
    }


def read_evaluation(path: Path) -> Mapping:
    """The JSON object of a ``soapvit eval … --out`` file; anything else (unreadable, not JSON, a
    list, no ``"results"`` mapping) is a one-line :class:`SoapvitError` naming the file."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise SoapvitError(f"--eval {path}: cannot read it: {getattr(err, 'strerror', None) or err}") from None
    except json.JSONDecodeError as err:
        raise SoapvitError(f"--eval {path} is not JSON ({err.msg} at line {err.lineno}): give a file written by "
                           "soapvit eval … --out") from None
    if not isinstance(payload, Mapping):
        raise SoapvitError(f"--eval {path} holds a JSON {type(payload).__name__}, not an object: give a file "
                           "written by soapvit eval … --out")
    evaluation_variants(payload, f"--eval {path}")
    return payload


#: Readable names of the metrics ``soapvit eval … --out`` writes (a key not listed: its words).
METRIC_NAMES = {
    "maxFbeta": "max Fβ", "iou": "IoU", "acc": "pixel accuracy", "miou": "mIoU", "corloc": "CorLoc",
    "pck@0.05": "PCK@0.05", "pck@0.1": "PCK@0.1", "same_position": "same-position rate", "n_images": "images",
    "n_patches": "patches", "first_loss": "first loss", "final_loss": "final loss", "k": "k",
    "position_probe_acc": "position-probe accuracy", "chance": "position-probe chance",
    "cos_same_position": "cosine, same position", "cos_other_position": "cosine, other positions",
    "high_norm_share": "high-norm share", "effective_rank": "effective rank",
}
#: What each ``kind`` of evaluation file measured.
EVALUATION_NAMES = {"tokencut": "TokenCut", "knnseg": "kNN segmentation", "linseg": "linear segmentation probe",
                    "warp": "warp consistency", "artifacts": "token artifacts"}


def metric_name(key: str) -> str:
    """The column heading of metric ``key``."""
    return METRIC_NAMES.get(key, key.replace("_", " "))


def evaluation_title(payload: Mapping, name: str) -> str:
    """What an evaluation file measured, of which model, with which head: ``TokenCut (soap
    protocol) — model zoo:mae, head mae.safetensors — tokencut.json``. A file without
    ``settings`` (not written by this version) says what it does not record."""
    settings = payload.get("settings") if isinstance(payload.get("settings"), Mapping) else {}
    kind = payload.get("kind")
    what = EVALUATION_NAMES.get(kind, str(kind)) if kind is not None else "evaluation"
    protocol = settings.get("protocol")
    if isinstance(protocol, str) and kind in ("tokencut", "knnseg"):
        what += f" ({protocol} protocol)"
    model = f"model {settings['model']}" if settings.get("model") else "model not recorded"
    if "head" not in settings:
        head = "head not recorded"
    elif settings["head"]:
        head = f"head {Path(str(settings['head'])).name}"
    else:
        head = "no head (original tokens only)"
    return f"{what} — {model}, {head} — {name}"


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _cell(value: float, interval: Mapping | None) -> str:
    """A metric, and for a corrected variant its difference to the original with the interval."""
    if not isinstance(interval, Mapping):
        return _format(value)
    return (f"{_format(value)} ({interval['delta']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}])")


def _evaluation_table(name: str, variants: Mapping[str, Mapping[str, float]],
                      intervals: Mapping[str, Mapping] | None = None) -> str:
    intervals = intervals if isinstance(intervals, Mapping) else {}
    columns = list(dict.fromkeys(k for metrics in variants.values() for k in metrics))
    head = "".join(f'<th scope="col">{html.escape(metric_name(c))}</th>' for c in columns)
    rows = "".join(
        f'<tr><th scope="row">{html.escape(v)}</th>'
        + "".join(f"<td>{_cell(m[c], intervals.get(v, {}).get(c)) if c in m else '–'}</td>" for c in columns)
        + "</tr>"
        for v, m in variants.items()
    )
    return f'<table><caption>{html.escape(name)}</caption><tr><th scope="col">variant</th>{head}</tr>{rows}</table>'


# -- page parts ---------------------------------------------------------------------------------
def _skipped_entry(entry) -> str:
    """A skipped file as ``name (reason)``; entries are ``{"file", "reason"}`` or plain paths."""
    if isinstance(entry, Mapping):
        return f"{Path(str(entry.get('file', '?'))).name} ({entry.get('reason', 'no reason recorded')})"
    return Path(str(entry)).name


def _card(head: SoapHead) -> str:
    meta = head.metadata
    d = head.blocks[head.apply_block]
    top, null = int(d.si.argmax()), null_components(d)
    skipped = [_skipped_entry(s) for s in meta["skipped"]] if "skipped" in meta else None
    mu = meta.get("mu", "not recorded")
    entries = {
        "backbone": meta.get("backbone", "not recorded"),
        "images": f"{meta.get('n_real', '?')} real, {meta.get('n_synthetic', '?')} synthetic",
        "generator": meta.get("generator", "not recorded"),
        "variant": f"{meta.get('variant', 'not recorded')} (weighting {meta.get('weighting', 'not recorded')})",
        "μ": "auto" if mu is None else mu,
        "τ": meta.get("tau", "not recorded"),
        "image size": f"{meta['image_size']} px" if "image_size" in meta else "not recorded",
        "skipped files": "not recorded" if skipped is None else (
            f"{len(skipped)}: " + "; ".join(skipped) if skipped else "none"),
        "warnings": ("; ".join(map(str, meta["warnings"])) or "none") if "warnings" in meta else "not recorded",
        "head applies to block": head.apply_block,
        f"max SI at block {head.apply_block}": f"{d.si.max().item():.3f} (PC{top + 1})",
        "removed components": ", ".join(f"PC{c + 1}" for c in removed_components(head)) or "none",
        NULL_DIRECTION: (", ".join(f"PC{c + 1}" for c in null) + " (no variance: SI undefined)") if null else "none",
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in entries.items())
    return f'<dl class="card">{rows}</dl>'


def _block_table(head: SoapHead) -> str:
    rows = []
    for b, d in sorted(head.blocks.items()):
        top = int(d.si.argmax())
        removed = " ".join(f"PC{c + 1}" for c in removed_components(head, b)) or "–"
        rows.append(f'<tr><th scope="row">{b}{" (head)" if b == head.apply_block else ""}</th>'
                    f"<td>{d.si.max().item():.3f}</td><td>PC{top + 1}</td>"
                    f"<td>{high_si(d.si).numel()}</td><td>{d.position_share[top].item():.0%}</td>"
                    f"<td>{removed}</td></tr>")
    return ("<table><caption>Per block: highest SI, its component, how many components reach "
            f"SI ≥ {SI_THRESHOLD}, the share of that top component's variance explained by position, "
            f"and the components with weight &gt; {REMOVED_WEIGHT}</caption>"
            '<tr><th scope="col">block</th><th scope="col">max SI</th><th scope="col">at</th>'
            f'<th scope="col">SI ≥ {SI_THRESHOLD}</th><th scope="col">position share</th>'
            f'<th scope="col">weight &gt; {REMOVED_WEIGHT}</th></tr>{"".join(rows)}</table>')


def _token_maps(head: SoapHead, label: str, backbone, images: Sequence[Path], workdir: Path) -> str:
    if not images:
        return '<p class="muted">No images given (<code>--images</code>): token maps not drawn.</p>'
    if backbone is None:
        from .backbones import load

        try:
            backbone = load(head.metadata["backbone"])
        except KeyError:
            return '<p class="muted">The head records no backbone: token maps not drawn.</p>'
        except (ImportError, OSError, SoapvitError) as err:
            return f'<p class="muted">Backbone not available, token maps not drawn: {html.escape(str(err))}</p>'
    paths = render_head_figures(head, workdir, backbone, images, label=label)
    token_maps = next((p for p in paths if p.name == "token_maps.png"), None)
    if token_maps is None:
        return '<p class="muted">None of the images could be read: token maps not drawn.</p>'
    return _figure(
        _png_file_uri(token_maps), f"token maps of {label} before and after the head",
        "Per image: the image, the first three principal components of its tokens as RGB before and after "
        "the head, and the top-SI components before and after. Look for smooth position gradients or "
        "stripes that disappear after the head while object outlines stay.")


def _head_section(index: int, label: str, head: SoapHead, backbone, images: Sequence[Path], workdir: Path) -> str:
    anchor = f"model-{index}"
    removed = removed_components(head)
    if removed:
        responses = _figure(
            removed_response_maps(head, removed), f"response maps of the removed components of {label}",
            f"Block {head.apply_block}: probability that each removed component responds at each patch position, "
            "on real images (top) and synthetic non-semantic images (bottom). Look for the same spatial pattern "
            "in both rows: a component that responds alike to images without semantics is noise.")
    else:
        responses = f'<p>The head removes no component at block {head.apply_block} (no weight &gt; {REMOVED_WEIGHT}).</p>'
    parts = [
        f'<h2 id="{anchor}">Model: {html.escape(label)}</h2>',
        f'<h3 id="{anchor}-card">{HEAD_SECTIONS[0]}</h3>', _card(head),
        f'<h3 id="{anchor}-si">{HEAD_SECTIONS[1]}</h3>', _block_table(head),
        _figure(si_small_multiples(head), f"sorted SI curves per block of {label}",
                f"SI of every principal component, sorted, one panel per block; the dotted line is {SI_THRESHOLD}; "
                f"a grey cross after the curve marks the {NULL_DIRECTION} (the direction a final LayerNorm removes: "
                "no variance, so no SI). Look for curves that stay high over many ranks: those blocks carry many "
                "components that respond alike to real and synthetic images."),
        f'<h3 id="{anchor}-position">{HEAD_SECTIONS[2]}</h3>',
        _figure(position_share_map(head), f"positional variance share of {label}",
                "Share of each leading component's variance explained by patch position alone (per-position mean "
                f"tokens), per block; dots mark SI ≥ {SI_THRESHOLD}, crosses the {NULL_DIRECTION} (no variance). "
                "Look for bright cells under the dots: high-SI components that are position codes."),
        f'<h3 id="{anchor}-removed">{HEAD_SECTIONS[3]}</h3>', responses,
        f'<h3 id="{anchor}-tokens">{HEAD_SECTIONS[4]}</h3>', _token_maps(head, label, backbone, images, workdir),
    ]
    return f'<section aria-labelledby="{anchor}">{"".join(parts)}</section>'


def _comparison_section(heads: Mapping[str, SoapHead], workdir: Path) -> str:
    max_si = plot_max_si_per_block(heads, workdir / "max_si_per_block.png")
    return (
        f'<section aria-labelledby="compared"><h2 id="compared">{PAGE_SECTIONS[0]}</h2>'
        + _figure(_png_file_uri(max_si), "maximum SI per block against relative depth, all models",
                  f"Highest SI in each block against relative depth, one line per model; dotted line {SI_THRESHOLD}. "
                  "Look for where each curve crosses the line: blocks above it hold at least one non-semantic "
                  "component.")
        + _figure(components_above_threshold_vs_depth(heads), "number of high-SI components per block, all models",
                  f"How many components reach SI ≥ {SI_THRESHOLD} in each block, one line per model. Look for the "
                  "depths where a model's non-semantic subspace grows or shrinks.")
        + "</section>"
    )


def _evaluation_section(evaluations: Sequence[Path]) -> str:
    parts = [f'<section aria-labelledby="evaluations"><h2 id="evaluations">{PAGE_SECTIONS[1]}</h2>']
    if not evaluations:
        parts.append('<p class="muted">No evaluation files given (<code>--eval</code>).</p>')
    for path in map(Path, evaluations):
        payload = read_evaluation(path)
        parts.append(_evaluation_table(evaluation_title(payload, path.name), evaluation_variants(payload, path.name),
                                       payload.get("intervals")))
    parts.append("<p>Metrics as written by <code>soapvit eval</code> (percent where the evaluation reports "
                 "percent); one row per variant of the tokens; in brackets, a corrected variant's difference to "
                 "the original with its paired bootstrap 95 % interval over images.</p></section>")
    return "".join(parts)


def render_report(heads: Mapping[str, SoapHead], evaluations: Sequence[Path] = (), images: Sequence[Path] = (),
                  backbones: Mapping[str, object] | None = None) -> str:
    """The report page as a string. ``heads`` maps a label to each head; token maps are drawn for
    ``images`` with ``backbones[label]``, or the backbone loaded from the head's metadata."""
    if not heads:
        raise SoapvitError("a report needs at least one head")
    backbones = backbones or {}
    labels = list(heads)
    evaluation = _evaluation_section(evaluations)  # first: a bad file fails before any figure is drawn
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        body = [_comparison_section(heads, workdir)]
        body += [_head_section(i, label, heads[label], backbones.get(label), images, workdir / str(i))
                 for i, label in enumerate(labels)]
    body.append(evaluation)
    toc = ['<li><a href="#compared">Models compared</a></li>']
    toc += [f'<li><a href="#model-{i}">Model: {html.escape(label)}</a></li>' for i, label in enumerate(labels)]
    toc.append('<li><a href="#evaluations">Evaluations</a></li>')
    title = "SOAP report: " + ", ".join(labels)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>'
        f"<body><header><h1>{html.escape(title)}</h1>"
        "<p>Semantic invariance (SI) of the principal components of patch tokens: a component with high SI "
        "responds alike to natural and to synthetic, semantics-free images, so it carries noise (patch "
        "position, artifacts) rather than content. The SOAP head suppresses such components.</p>"
        f'<nav aria-label="sections"><ul>{"".join(toc)}</ul></nav></header>'
        f'<main>{"".join(body)}</main></body></html>\n'
    )


def write_report(heads: Mapping[str, SoapHead], out: str | Path, evaluations: Sequence[Path] = (),
                 images: Sequence[Path] = (), backbones: Mapping[str, object] | None = None) -> Path:
    """Write :func:`render_report` to ``out`` and return the path."""
    return write_text(Path(out), render_report(heads, evaluations, images, backbones), "HTML report")
