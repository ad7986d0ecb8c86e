"""Every figure of the project: SOAP heads (SI curves, max SI per block, response maps, token
maps), TokenCut mask comparisons and CLS-attention profiles.

Each function takes plain data (heads, arrays, reports), draws one figure, saves it and returns
the path.
MIM models are drawn solid and non-MIM models dashed, as in the SOAP paper's figures.
A component without variance (behind a final LayerNorm: the direction it removes) has no
meaningful SI: SI curves leave it out of the line and mark it apart (:func:`null_components`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .corrections.soap import SI_THRESHOLD, BlockDecomposition, SoapHead, degenerate  # noqa: E402
from .io import save_figure  # noqa: E402

NULL_DIRECTION = "LayerNorm null direction"
"""What an SI figure calls a component without variance (see :func:`null_components`)."""


def _save(fig, path: Path) -> Path:
    try:
        return save_figure(fig, path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def null_components(block: BlockDecomposition) -> list[int]:
    """Components (eigenvalue order) without variance: the direction a final LayerNorm removes
    (it centres every token). Their SI is rounding noise, pinned to the floor by the fit; these
    are the fit's :func:`~soapvit.corrections.soap.degenerate` components."""
    return degenerate(block.eigenvalues).nonzero().flatten().tolist()


def draw_si_curve(ax, block: BlockDecomposition, style: str = "-", label: str | None = None,
                  top: int | None = None, null_label: str | None = NULL_DIRECTION, **line):
    """SI of ``block``'s components sorted in descending order as a line (the first ``top``
    ranks when given), without the null components: those are grey crosses at SI 0 after the
    line's last rank, labelled ``null_label``. Returns the line."""
    null = null_components(block)
    si = np.sort(np.delete(block.si.numpy(), null))[::-1]
    shown = si[:top] if top is not None else si
    curve = ax.plot(np.arange(1, len(shown) + 1), shown, style, label=label, **line)[0]
    ranks = np.arange(len(si) + 1, len(si) + len(null) + 1)
    if top is not None:
        ranks = ranks[ranks <= top]
    if len(ranks):
        ax.plot(ranks, np.zeros(len(ranks)), linestyle="none", marker="x", ms=6, mew=1.5, color="grey",
                label=null_label, clip_on=False)
    return curve


def si_curves_figure(heads: Mapping[str, SoapHead], dashed: Sequence[str] = (), top: int = 10):
    """SI of the head's block sorted in descending order: all components, and the top ``top``."""
    fig, (ax_all, ax_top) = plt.subplots(1, 2, figsize=(11, 4))
    null_label = f"{NULL_DIRECTION} (no variance: SI undefined)"
    for label, head in heads.items():
        block = head.blocks[head.apply_block]
        style = "--" if label in dashed else "-"
        draw_si_curve(ax_all, block, style, label, null_label=null_label)
        draw_si_curve(ax_top, block, style, label, top=top, null_label=null_label, marker="o")
    for ax, title in ((ax_all, "all components"), (ax_top, f"top {top}")):
        ax.axhline(SI_THRESHOLD, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="rank by SI", ylabel="semantic invariance", title=title, ylim=(0, 1.02))
        handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))  # one null entry for all heads
        if handles:
            ax.legend(handles.values(), handles.keys(), fontsize=8)
    return fig


def plot_si_curves(heads: Mapping[str, SoapHead], path: Path, dashed: Sequence[str] = (), top: int = 10) -> Path:
    """:func:`si_curves_figure`, saved to ``path``."""
    return _save(si_curves_figure(heads, dashed, top), path)


def plot_max_si_per_block(heads: Mapping[str, SoapHead], path: Path, dashed: Sequence[str] = ()) -> Path:
    """Maximum SI of each fitted block against relative depth (block / number of blocks)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, head in heads.items():
        blocks = sorted(head.blocks)
        depth = head.metadata.get("backbone_config", {}).get("num_blocks", max(blocks) + 1)
        x = [(b + 1) / depth for b in blocks]
        y = [head.blocks[b].si.max().item() for b in blocks]
        ax.plot(x, y, "--" if label in dashed else "-", marker="o", ms=3, label=label)
    ax.axhline(SI_THRESHOLD, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="relative depth", ylabel="max SI in block", ylim=(0, 1.02), title="max semantic invariance vs depth")
    ax.legend(fontsize=8)
    return _save(fig, path)


def top_components(head: SoapHead, count: int = 4, block: int | None = None) -> list[int]:
    """Indices (eigenvalue order) of the ``count`` highest-SI components of ``block``."""
    si = head.blocks[head.apply_block if block is None else block].si
    return torch.argsort(si, descending=True)[:count].tolist()


def response_maps_figure(head: SoapHead, components: Sequence[int]):
    """Response probability per patch position of each of ``components`` (one column each) on
    real (P, top row) and synthetic (Q, bottom row) images at the head's block."""
    d = head.blocks[head.apply_block]
    fig, axes = plt.subplots(2, len(components), figsize=(2.4 * len(components), 4.8), squeeze=False)
    for j, c in enumerate(components):
        for i, (maps, name) in enumerate(((d.p_real, "real P"), (d.q_synthetic, "synthetic Q"))):
            ax = axes[i, j]
            ax.imshow(maps[..., c].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([]), ax.set_yticks([])
            title = f"PC{c + 1} SI {d.si[c]:.3f} w {d.weights[c]:.2f}\n{name}" if i == 0 else name
            ax.set_title(title, fontsize=8)
    return fig


def plot_response_maps(head: SoapHead, path: Path, count: int = 4) -> Path:
    """For the top-SI components: response probability per patch position on real (P) and
    synthetic (Q) images. Position-coding components show the same spatial pattern in both."""
    fig = response_maps_figure(head, top_components(head, count))
    fig.suptitle(f"response maps, block {head.apply_block}", fontsize=10)
    return _save(fig, path)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """First three principal components of ``(h, w, D)`` tokens, min-max scaled to RGB."""
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    rgb = flat @ vt[:3].T
    rgb = (rgb - rgb.min(0)) / np.maximum(rgb.max(0) - rgb.min(0), 1e-12)
    return rgb.reshape(*tokens.shape[:2], 3)


def component_maps(z: np.ndarray, zc: np.ndarray, head: SoapHead, component: int) -> tuple[np.ndarray, np.ndarray]:
    """Component ``component`` of the head's block on tokens ``z`` before and ``zc`` after the
    head, each centred on the mean of its own side: ``(z − μ)·v`` before and ``(ẑ − Pμ)·v``
    after, ``Pμ`` being the fit mean ``μ`` mapped by the head (it does not centre). The after
    map is thus ``(1 − w)`` times the before map: a removed component is flat at 0."""
    d = head.blocks[head.apply_block]
    v = d.eigenvectors.numpy()[:, component]
    mean = d.mean.numpy()
    mean_after = head.transform(d.mean).numpy()
    return (z - mean) @ v, (zc - mean_after) @ v


def token_maps_figure(images: Sequence[np.ndarray], before: Sequence[np.ndarray], after: Sequence[np.ndarray],
                      head: SoapHead, count: int = 2):
    """Per image: the image, PCA-RGB of the tokens before/after SOAP, and the top-SI component
    maps before and after the projection (:func:`component_maps`) on one diverging scale
    centred on 0 with the before map's symmetric limits."""
    comps = top_components(head, count)
    cols = 3 + 2 * len(comps)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.9 * cols, 1.9 * len(images)), squeeze=False)
    for i, (img, z, zc) in enumerate(zip(images, before, after)):
        panels = [(img, "image", None), (pca_rgb(z), "PCA before", None), (pca_rgb(zc), "PCA after", None)]
        for c in comps:
            was, now = component_maps(z, zc, head, c)
            lim = max(float(np.abs(was).max()), 1e-12)
            panels.append((was, f"PC{c + 1} before", lim))
            panels.append((now, f"PC{c + 1} after", lim))
        for ax, (data, title, lim) in zip(axes[i], panels):
            if lim is None:
                ax.imshow(data)
            else:
                ax.imshow(data, cmap="coolwarm", vmin=-lim, vmax=lim)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    return fig


def plot_token_maps(images: Sequence[np.ndarray], before: Sequence[np.ndarray], after: Sequence[np.ndarray],
                    head: SoapHead, path: Path, count: int = 2) -> Path:
    """:func:`token_maps_figure`, saved to ``path``."""
    return _save(token_maps_figure(images, before, after, head, count), path)


def render_head_figures(head: SoapHead, out: Path, backbone=None, image_files: Sequence[Path] = (),
                        label: str | None = None) -> list[Path]:
    """All figures of one head into ``out``; token maps need the ``backbone`` and images."""
    from .data.sources import ImageFiles
    from .data.transforms import ImageTransform
    from .features import iter_tokens

    out = Path(out)
    label = label or head.metadata.get("backbone", "model")
    paths = [
        plot_si_curves({label: head}, out / "si_sorted.png"),
        plot_max_si_per_block({label: head}, out / "max_si_per_block.png"),
        plot_response_maps(head, out / "response_maps.png"),
    ]
    if backbone is not None and image_files:
        size = head.metadata.get("image_size", backbone.image_size)
        transform = ImageTransform.for_backbone(backbone, size=size)
        shown, before, after = [], [], []
        for batch in iter_tokens(backbone, ImageFiles(list(image_files)), transform, blocks=head.apply_block,
                                 corrections={"soap": head}, norm=head.metadata.get("norm", True), keep_images=True):
            shown += [np.asarray(image.resize((size, size))) for image in batch.images]
            before.append(batch.original.tokens[head.apply_block].cpu())
            after.append(batch.variants["soap"].tokens[head.apply_block].cpu())
        if shown:
            paths.append(plot_token_maps(shown, torch.cat(before).numpy(), torch.cat(after).numpy(), head,
                                         out / "token_maps.png"))
    return paths


def plot_attention_profiles(profiles: Sequence, path: str | Path, abmilp: dict[str, dict] | None = None) -> Path:
    """Entropy (as a fraction of ``log N``) and count90 (as a fraction of N) per block, one line
    per model; AbMILP weight statistics (``abmilp[model_id] = {"entropy", "count90"}``) as a
    marker after the last block."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for profile in profiles:
        x = list(range(1, len(profile.results["entropy"]) + 1))
        ent = [e / profile.max_entropy for e in profile.results["entropy"]]
        cnt = [c / profile.num_patches for c in profile.results["count90"]]
        line = axes[0].plot(x, ent, marker="o", ms=3, label=f"{profile.model_id} (N={profile.num_patches})")[0]
        axes[1].plot(x, cnt, marker="o", ms=3, color=line.get_color())
        extra = (abmilp or {}).get(profile.model_id)
        if extra:
            axes[0].plot([x[-1] + 1], [extra["entropy"] / profile.max_entropy], marker="*", ms=12,
                         color=line.get_color(), linestyle="none")
            axes[1].plot([x[-1] + 1], [extra["count90"] / profile.num_patches], marker="*", ms=12,
                         color=line.get_color(), linestyle="none")
    axes[0].set(xlabel="block", ylabel="CLS→patch attention entropy / log N", ylim=(0, 1.05),
                title="entropy (1 = uniform over patches)")
    axes[1].set(xlabel="block", ylabel="patches holding 90% of CLS attention / N", ylim=(0, 1.05),
                title="90%-mass patch share")
    if abmilp:
        axes[0].annotate("★ = AbMILP weights", xy=(0.02, 0.03), xycoords="axes fraction", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


VARIANT_TITLES = {"original": "original", "soap": "SOAP"}


def plot_mask_comparison(examples: Sequence, path: str | Path) -> Path:
    """One row per example: image, ground truth, then each variant's mask (scored prediction)."""
    if not examples:
        raise ValueError("no examples to plot")
    variants = list(examples[0].predictions)
    cols = 2 + len(variants)
    fig, axes = plt.subplots(len(examples), cols, figsize=(2.6 * cols, 2.2 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        panels = [(ex.image, "image"), (ex.ground_truth, "ground truth")]
        panels += [(ex.predictions[v], VARIANT_TITLES.get(v, v)) for v in variants]
        for ax, (data, title) in zip(row, panels):
            ax.imshow(data, cmap=None if data.ndim == 3 else "gray", vmin=0, vmax=None if data.ndim == 3 else data.max() or 1)
            ax.set_title(f"{title}" if title != "image" else ex.stem, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))
