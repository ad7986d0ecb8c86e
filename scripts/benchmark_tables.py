"""BENCHMARKS.md from the JSON files the benchmark scripts write, and where every number in the
prose of RESULTS.md and BENCHMARKS.md comes from.

- Tables: each ``<!-- table:NAME -->`` … ``<!-- /table -->`` block of BENCHMARKS.md is rebuilt from
  ``results/benchmarks/*.json`` (what ``python benchmarks/NAME.py`` writes, ``--out``): the
  commands that wrote the files, their day and machine, and the measurements.
- Quoted values: ``<!-- value:FILE:KEY/KEY/INDEX:FORMAT -->NUMBER`` in either file is followed by
  the value at that path of ``results/FILE.json`` (``zoo/NAME``: the zoo's model card NAME),
  formatted with the Python format spec FORMAT (``abs`` in front: its absolute value; a negative
  number is written with the sign −). ``KEYS - KEYS`` quotes the difference of two values of the
  file, ``KEYS - 1`` that of a value and a number (with format ``+.1%``: a ratio as a change). A
  marker never starts a line (Markdown would start an HTML block there).
- Prose: every other measured number outside the generated blocks (a decimal, a percentage, a
  number followed by a unit such as s, MB or ×) must be a value of the document's JSON files
  (``SOURCES``), or a number of a generated table of its section, rounded to the decimals the
  prose prints. ``<!-- sources: GLOB … -->`` narrows the files for the rest of its section (up to
  the next ``#``/``##`` heading): globs of file names as value markers write them (``fit-*``,
  ``benchmarks/fit_methods``, ``zoo/*``), ``none`` for no file. Protocol constants are exempt by
  ``ALLOWED`` (each with its reason). A number without a sign also matches a negative value
  ("costs 0.31" for a difference of −0.31).

``python scripts/results_tables.py`` calls :func:`main` (``--check`` too), so one command
regenerates and verifies both files.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from functools import cache
from pathlib import Path

from soapvit.corrections.soap import SI_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
BENCH = RESULTS / "benchmarks"
ZOO_CARDS = ROOT / "src" / "soapvit" / "assets" / "zoo"

# the files whose numbers may be quoted in each document's prose, by name (see file_key)
SOURCES = {"RESULTS.md": ["*", "zoo/*"], "BENCHMARKS.md": ["benchmarks/*"]}
# Per-image scores and per-component lists are left out of what prose may match (with thousands of
# values they would match almost any number); quote one of their entries with a value marker.
SKIPPED_KEYS = {"per_image"}
LONGEST_LIST = 64

# Numbers in the prose that are settings or constants, not measurements: (pattern, reason). A number
# inside a match of a pattern is not checked.
ALLOWED: list[tuple[str, str]] = [
    (r"\b\d+\s*px\b", "an input size is a protocol setting"),
    (r"\b\d+×\d+\b", "an input size is a protocol setting"),
    (r"[τμT]\s*=\s*\d+(?:\.\d+)?", "TokenCut's and SOAP's thresholds, the kNN temperature: protocol settings"),
    (r"\bcos\s+>\s+0\.3\b", "TokenCut's edge threshold τ, a protocol setting"),
    (r"\bk\s*=\s*\d+", "the kNN neighbour count, a protocol setting"),
    (r"\b\d+\s?%\s+(?:random\s+|block\s+)?masking", "the masking ratio of a pre-training recipe, a setting"),
    (r"\b5\s+%\s+warm-up", "the learning-rate schedule, a setting"),
    (r"\bpeak\s+lr\s+6\.4\b", "the probe's learning rate, a setting"),
    (r"\b95\s+%\s+interval", "the confidence level of the bootstrap intervals, a setting"),
    (r"\bwithin\s+10\s+%\s+of\s+the\s+view's\s+side", "PCK@0.1's tolerance, the metric's definition"),
    (r"\bon\s+10\s+%\s+of\s+train", "the share of train the CAPI protocol chooses k on, a setting"),
    (r"\bthe\s+(?:90\s+%\s+of\s+the\s+training\s+images\s+not\s+held\s+out|other\s+10\s+%)",
     "the CAPI protocol's split of train into standardisation/bank and choice images, a setting"),
    (r"6·1\.4826·MAD", "the high-norm threshold's definition (1.4826·MAD estimates a standard deviation)"),
    (r"\bchance\s+\d+(?:\.\d+)?\s?%?", "chance accuracy is 1 / the number of classes or positions"),
    (r"\b0\.70\s+M\s+parameters,\s+0\.64\s+MB\s+each\s+in\s+fp16", "the zoo ViT's size, fixed by its configuration"),
    (r"≥\s*\d+(?:\.\d+)?×", "a target an issue set (a bar to reach), not a measurement"),
    (re.escape(f"{SI_THRESHOLD:.2f}"), "the SI threshold (soapvit.corrections.soap.SI_THRESHOLD)"),
]

UNITS = (r"%|×(?!\d)|ms\b|s\b|min\b|h\b|[KMG]i?B\b|G\b|GFLOPs?\b|M\b|img/s|images/s|(?:query )?patches/s|"
         r"iterations/s|maxFβ|mIoU|points?\b|CorLoc|CPU-seconds")
NUMBER = re.compile(r"(?<![\w/.§@^×−+-])(?P<sign>[−+-])?"
                    r"(?P<value>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[−-]?\d+)?)(?!\.?\w)"
                    rf"(?P<unit>\s?(?:{UNITS}))?")
VALUE = re.compile(r"(<!-- value:([^:\s]+):([^:]+?):(\S*?) -->)([−+-]?\d[\d,]*(?:\.\d+)?(?:e[−+-]?\d+)?%?)?")
TABLE = re.compile(r"(<!-- table:([\w-]+) -->)\n.*?(<!-- /table -->)", re.S)
HIDDEN = [  # what is not prose: generated blocks, code, link targets, comments
    TABLE, VALUE, re.compile(r"^```.*?^```", re.S | re.M), re.compile(r"`[^`\n]*`"),
    re.compile(r"\]\([^)]*\)"), re.compile(r"<!--.*?-->", re.S)]


# ---------------------------------------------------------------- values from the JSON files

@cache
def _json(path: Path):
    return json.loads(path.read_text())


def file_path(name: str) -> Path:
    """``results/NAME.json``; ``zoo/NAME``: the zoo's model card."""
    return ZOO_CARDS / f"{name[4:]}.json" if name.startswith("zoo/") else RESULTS / f"{name}.json"


def file_names() -> list[str]:
    return ([p.relative_to(RESULTS).with_suffix("").as_posix() for p in sorted(RESULTS.rglob("*.json"))]
            + [f"zoo/{p.stem}" for p in sorted(ZOO_CARDS.glob("*.json"))])


def lookup(file: str, keys: str):
    """The value at ``KEY/KEY/INDEX`` of ``results/FILE.json``; ``PATH - PATH``: their difference."""
    if " - " in keys:
        first, second = keys.split(" - ")
        return lookup(file, first) - (float(second) if re.fullmatch(r"\d+(?:\.\d+)?", second) else lookup(file, second))
    value = _json(file_path(file))
    for key in keys.split("/"):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def formatted(value: float, spec: str) -> str:
    if spec.startswith("abs"):
        value, spec = abs(value), spec[3:]
    text = format(value, spec)
    return "−" + text[1:] if text.startswith("-") else text


def fill_values(text: str) -> str:
    """Every value marker followed by the value it names."""
    def replace(match: re.Match) -> str:
        marker, file, keys, spec = match.group(1, 2, 3, 4)
        try:
            return marker + formatted(lookup(file, keys), spec)
        except (OSError, KeyError, IndexError, ValueError, TypeError) as err:
            raise SystemExit(f"{marker}: no such value ({type(err).__name__}: {err})") from None

    return VALUE.sub(replace, text)


# ---------------------------------------------------------------- the prose check

def numbers_of(data) -> list[float]:
    if isinstance(data, dict):
        return [x for k, v in data.items() if k not in SKIPPED_KEYS for x in numbers_of(v)]
    if isinstance(data, list):
        return [] if len(data) > LONGEST_LIST else [x for v in data for x in numbers_of(v)]
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return [float(data)]
    return []


class Corpus:
    """The numbers of some JSON files, looked up as the prose rounds them."""

    def __init__(self, values: list[float]):
        self.values = values
        self._rounded: dict[int, tuple[set[str], set[str]]] = {}

    @classmethod
    def of(cls, globs: list[str], tables: list[str] = ()) -> Corpus:
        """The numbers of the files matching ``globs`` (``*`` does not cross a ``/``) and those
        printed in ``tables``."""
        names = [n for n in file_names() if any(fnmatch.fnmatch(n, g) and n.count("/") == g.count("/")
                                                 for g in globs)]
        printed = [float(m.group(0).replace("−", "-")) for t in tables
                   for m in re.finditer(r"[−+-]?\d+(?:\.\d+)?(?:e[−+-]?\d+)?", t)]
        return cls([x for n in names for x in numbers_of(_json(file_path(n)))] + printed)

    def has(self, sign: str, text: str) -> bool:
        text = text.replace(",", "")
        if "e" in text:
            mantissa = text.split("e")[0]
            digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
            target = float(text.replace("−", "-"))
            return any(float(f"{abs(v):.{digits}e}") == target for v in self.values)
        decimals = len(text.split(".")[1]) if "." in text else 0
        if decimals not in self._rounded:
            signed = {formatted(v, f"+.{decimals}f").replace("−", "-") for v in self.values}
            self._rounded[decimals] = signed, {s[1:] for s in signed}
        signed, unsigned = self._rounded[decimals]
        if not sign:
            return text in unsigned
        want = ("-" if sign in "−-" else "+") + text
        return want in signed or (float(text) == 0 and text in unsigned)


def prose(text: str) -> str:
    """``text`` with everything that is not prose blanked (line structure kept)."""
    for pattern in HIDDEN:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return text


def measured(text: str) -> list[tuple[int, str, str]]:
    """(line, sign, number as printed) of every measured number in the prose of ``text``."""
    text = prose(text)
    for pattern, _ in ALLOWED:
        text = re.sub(pattern, lambda m: " " * len(m.group(0)), text)
    found = []
    for match in NUMBER.finditer(text):
        value, unit = match.group("value"), match.group("unit")
        if "." in value or "e" in value or unit:
            found.append((text.count("\n", 0, match.start()) + 1, match.group("sign") or "", match.group(0).strip()))
    return found


SOURCES_COMMENT = re.compile(r"<!-- sources:((?:\s+\S+)+?) -->")


def sections(text: str, globs: list[str]) -> list[tuple[int, Corpus]]:
    """(first line, corpus) of each stretch of ``text`` with its own sources: a ``#``/``##``
    heading starts one with the document's ``globs``, a sources comment one with its own."""
    starts: list[tuple[int, list[str] | None]] = [(1, None)]
    for n, line in enumerate(prose_lines(text), 1):
        if re.match(r"##? ", line):
            starts.append((n, None))
        elif m := SOURCES_COMMENT.search(line):
            names = m.group(1).split()
            starts.append((n, [] if names == ["none"] else names))
    lines = text.splitlines()
    out = []
    for i, (first, names) in enumerate(starts):
        section_start = max(s for s, g in starts[: i + 1] if g is None)  # the tables of the whole section
        section_end = next((s for s, g in starts[i + 1:] if g is None), len(lines) + 1)
        tables = [m.group(0) for m in TABLE.finditer("\n".join(lines[section_start - 1: section_end - 1]))]
        out.append((first, Corpus.of(globs if names is None else names, tables)))
    return out


def unsourced(text: str, globs: list[str]) -> list[str]:
    """``line N: NUMBER`` for each measured number of the prose that no value of its section's
    sources rounds to."""
    stretches = sections(text, globs)
    problems = []
    for line, sign, shown in measured(text):
        corpus = next(c for first, c in reversed(stretches) if first <= line)
        if not corpus.has(sign, NUMBER.match(shown).group("value")):
            problems.append(f"line {line}: {shown}")
    return problems


# ---------------------------------------------------------------- BENCHMARKS.md's tables

def bench(name: str) -> dict | None:
    path = BENCH / f"{name}.json"
    return _json(path) if path.is_file() else None


def about(*names: str) -> str:
    """The commands of some benchmark runs as a code block, then each file's day and machine."""
    runs = {name: bench(name) for name in names}
    commands = "\n".join(r["command"] for r in runs.values())
    lines = []
    for name, r in runs.items():
        m = r["machine"]
        load = m["load_average"]
        gpu = m["gpu"] or "no GPU"
        lines.append(f"- `results/benchmarks/{name}.json`: {r['date']}, {m['cpu']}, {m['cores']} cores, {gpu}, "
                     f"torch {m['torch']}, {m['threads']} torch thread{'s' if m['threads'] != 1 else ''}"
                     + (f" per process, {m['processes']} processes" if m["processes"] > 1 else "")
                     + f"; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after")
    return f"```bash\n{commands}\n```\n\n" + "\n".join(lines) + "\n"


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def fit_throughput() -> str:
    r = bench("fit_throughput-imgfocus")
    x = r["results"]
    return about("fit_throughput-imgfocus") + "\n" + table(
        ["model", "images (real + synthetic)", "forward only", f"fit, {x['blocks']} blocks", "ratio fit / forward"],
        [[r["settings"]["model"], f"{x['n_real']} + {x['n_synthetic']}", f"{x['forward_images_per_s']:.2f} img/s",
          f"{x['fit_images_per_s']:.2f} img/s", f"{x['ratio']:.3f}"]])


def fit_processes() -> str:
    names = ["fit_throughput-mae-1", "fit_throughput-mae-2"]
    runs = [bench(name) for name in names]
    one = runs[0]["results"]["fit_images_per_s"]
    rows = [[str(x["processes"]), f"{x['forward_images_per_s']:.1f} img/s", f"{x['fit_images_per_s']:.1f} img/s",
             f"{x['ratio']:.3f}", f"{x['fit_images_per_s'] / one:.2f}"] for x in (r["results"] for r in runs)]
    return about(*names) + "\n" + table(
        ["processes", "forward only", f"fit, {runs[0]['results']['blocks']} blocks", "ratio fit / forward",
         "fit × one process"], rows)


SOLVERS = {"scipy eigh per image (reference)": "`scipy.linalg.eigh(D−A, D)` per image (reference)",
           "torch batched lanczos": "torch batched Lanczos (default)",
           "torch batched eigh": "torch batched dense `eigh`"}


def tokencut_solver() -> str:
    r = bench("tokencut_solver")
    rows = [[SOLVERS.get(row["solver"], row["solver"]), row["device"],
             f"{row['images_per_s']:.1f}", f"{row['ratio']:.2f}", f"{row['pixels_equal_percent']:.3f} %"]
            for row in r["results"]["rows"]]
    if not any(row["device"] == "cuda" for row in r["results"]["rows"]):
        rows.append(["torch batched Lanczos", "cuda", "not measured (no GPU)", "", ""])
    head = ["solver", "device", "images/s", "× scipy", "pixels equal to scipy"]
    return about("tokencut_solver") + "\n" + table(head, rows)


def knn_vote() -> str:
    r = bench("knnseg_throughput")
    rows = [[f"one {r['results']['unchunked_mb']:.0f} MB similarity block" if row["search"] == "unchunked"
             else f"chunked, {row['budget_mb']:.0f} MB budget" + (" (default)" if row["budget_mb"] == 256 else ""),
             row["device"], f"{row['patches_per_s']:.0f}", f"{row['ratio']:.2f}"] for row in r["results"]["rows"]]
    return about("knnseg_throughput") + "\n" + table(["search", "device", "patches/s", "× unchunked"], rows)


PAPER_INFERENCE = "+3.7%"  # the SemanticMIM paper's inference overhead at ViT-B/16, as it prints it


def pretrain_flops() -> str:
    r = bench("pretrain_flops")
    x = r["results"]
    f, b, z, step = x["paper_formula"], x["vit_b16"], x["zoo"], x["zoo_step_s"]

    def pct(ratio: float) -> str:
        return formatted(100 * (ratio - 1), "+.1f") + "%"

    def gflops(d: dict, key: str, spec: str) -> list[str]:
        return [f"{d[key]['SimMIM-style']:{spec}} G", f"{d[key]['SemanticMIM']:{spec}} G"]

    rows = [
        ["paper formula, ViT-B/16, per block, as printed (vanilla: 196 patches + CLS)", "1",
         f"{f['as_printed']:.3f}", f"**{pct(f['as_printed'])}** (the paper's number)"],
        ["paper formula with the omitted projections", "1", f"{f['completed']:.3f}", pct(f["completed"])],
        ["counted training FLOPs per image, ViT-B/16 224", *gflops(b, "train_gflops", ".1f"), pct(b["train_ratio"])],
        ["counted inference FLOPs per image (encoder, 1 vs 8 prefix tokens), ViT-B/16",
         *gflops(b, "inference_gflops", ".1f"), f"{pct(b['inference_ratio'])} (paper: {PAPER_INFERENCE})"],
        ["counted training FLOPs per image, zoo ViT (64 px, patch 8, D=64, depth 6)",
         *gflops(z, "train_gflops", ".3f"), pct(z["train_ratio"])],
        [f"training step time, zoo ViT, batch {r['settings']['batch_size']}, median of {r['settings']['steps']} "
         "interleaved steps", f"{step['SimMIM-style']:.3f} s", f"{step['SemanticMIM']:.3f} s", f"{step['ratio']:.3f}"],
    ]
    return about("pretrain_flops") + "\n" + table(["quantity", "SimMIM-style", "SemanticMIM", "ratio"], rows)


def probe_cache() -> str:
    r = bench("probe_cache")
    rows = [[run["label"], f"{run['total_s']:.1f}", f"{run['encode_s']:.1f}", f"{run['train_s']:.1f}",
             f"{run['cache_parts_reused']}/{run['cache_parts']}",
             ", ".join(f"{pool} {acc:.1f}" for pool, acc in run["top1"].items())] for run in r["results"]["runs"]]
    return about("probe_cache") + "\n" + table(
        ["run", "total s", "encoding s", "probe training s", "cache parts reused", "top-1 % per pool"], rows)


def extract_onnx() -> str:
    e, o = bench("extract_throughput"), bench("onnx_latency")
    x = e["results"]
    rows = [["extract, images/s", f"{x['forward_images_per_s']:.2f}", f"{x['extract_images_per_s']:.2f}",
             f"{x['ratio']:.3f}"]]
    for b in o["results"]["batches"]:
        rows.append([f"ONNX, batch {b['batch']}, ms", f"{b['torch_ms']:.1f}", f"{b['onnx_ms']:.1f} (onnxruntime)",
                     f"{b['speedup']:.2f}× faster" if b["speedup"] >= 1 else f"{b['speedup']:.2f}×"])
    head = ["measure", "torch / forward only", "soapvit", "ratio"]
    return about("extract_throughput", "onnx_latency") + "\n" + table(head, rows)


def zero_shot_protocols() -> str:
    lin, capi = bench("linseg_probe"), bench("knnseg_capi")
    a = lin["results"]
    s = a["seconds"]
    rows = [[f"linear probe, {a['iterations']} iterations of {a['batch_size']} images at {a['input']} px",
             f"{a['wall_s']:.1f} (features {s['features']:.1f}, training {s['train']:.1f}, evaluation {s['eval']:.1f})",
             f"{a['query_patches_per_s']:.0f} query patches/s", f"{a['peak_rss_mb']:.0f} MB", f"mIoU {a['miou']:.2f}"]]
    for key, label in (("capi", "kNN, CAPI protocol ({side} px, k and distance chosen on 10 % of train)"),
                       ("hummingbird", "kNN, Hummingbird protocol (same images)")):
        k = capi["results"].get(key)
        if k is None:
            continue
        s = k["seconds"]
        stages = ", ".join(f"{name} {s[part]:.1f}" for name, part in
                           (("features", "bank"), ("choice", "choice"), ("search", "search")) if part in s)
        result = f"mIoU {k['miou']:.2f}" + (f", k = {k['k']}, {k['distance']}" if "k" in k else "")
        rows.append([label.format(side=k["image_size"]), f"{k['wall_s']:.1f} ({stages})",
                     f"{k['query_patches_per_s']:.0f} query patches/s", f"{k['peak_rss_mb']:.0f} MB", result])
    head = ["protocol", "wall s", "search throughput", "peak RSS (process so far)", "result"]
    return about("linseg_probe", "knnseg_capi") + "\n" + table(head, rows)


def fit_methods() -> str:
    r = bench("fit_methods")
    x = r["results"]
    labels = {"soap": "SOAP only", "derivable": "every derivable correction"}
    rows = [[labels[name], f"{x['median_s'][name]:.2f}", ", ".join(f"{t:.2f}" for t in x["runs_s"][name])]
            for name in labels]
    return about("fit_methods") + "\n" + table(
        [f"fit ({x['n_real']} real + {x['n_synthetic']} synthetic images, {x['blocks']} blocks)", "median s", "runs"],
        rows)


TABLES = {"fit-throughput": fit_throughput, "fit-processes": fit_processes, "tokencut-solver": tokencut_solver,
          "knn-vote": knn_vote, "pretrain-flops": pretrain_flops, "probe-cache": probe_cache,
          "extract-onnx": extract_onnx, "zero-shot-protocols": zero_shot_protocols, "fit-methods": fit_methods}


def render_tables(text: str, tables: dict) -> str:
    """``text`` with every ``<!-- table:NAME -->`` block rebuilt by ``tables[NAME]()`` and every
    quoted value filled in (:func:`fill_values`)."""
    return fill_values(TABLE.sub(lambda m: f"{m.group(1)}\n{tables[m.group(2)]()}\n{m.group(3)}", text))


def render(text: str) -> str:
    """BENCHMARKS.md with its tables and quoted values rebuilt."""
    return render_tables(text, TABLES)


# ---------------------------------------------------------------- both documents

def check_prose(name: str, text: str) -> list[str]:
    # a line that starts with a comment starts an HTML block in Markdown: the marker's number would
    # end the paragraph and show as raw HTML
    starts = [f"line {n}: a value marker starts the line (move it after a word)"
              for n, line in enumerate(prose_lines(text), 1) if re.match(r"\s*<!-- value:", line)]
    numbers = [f"{problem}: a measured number that no JSON file of its sources gives (quote it with a value "
               "marker, or list the constant in scripts/benchmark_tables.py ALLOWED)"
               for problem in unsourced(text, SOURCES[name])]
    return [f"{name} {problem}" for problem in starts + numbers]


def prose_lines(text: str) -> list[str]:
    """The lines of ``text``, those of code blocks blank."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S | re.M).split("\n")


def main(check: bool = False) -> bool:
    """Rebuild BENCHMARKS.md (``check``: only compare), then check the prose numbers of both files;
    print what is wrong and return whether all is right."""
    _json.cache_clear()
    ok = True
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text()
    updated = render(current)
    if updated != current:
        if check:
            print("BENCHMARKS.md differs from the tables and values the JSON files give: "
                  "run scripts/results_tables.py", file=sys.stderr)
            ok = False
        else:
            path.write_text(updated)
            print(f"wrote {path.relative_to(ROOT)}")
    problems = check_prose("BENCHMARKS.md", updated)
    problems += check_prose("RESULTS.md", fill_values((ROOT / "RESULTS.md").read_text()))
    for problem in problems:
        print(problem, file=sys.stderr)
    return ok and not problems


if __name__ == "__main__":
    sys.exit(0 if main(check="--check" in sys.argv[1:]) else 1)
