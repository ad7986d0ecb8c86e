"""RESULTS.md's and BENCHMARKS.md's tables, quoted values and prose numbers are what the committed JSON
files and model cards give."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_tables  # noqa: E402
import results_tables  # noqa: E402


def test_results_md_is_what_the_json_files_give():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_depth_table_counts_components_at_or_above_the_threshold(tmp_path, monkeypatch):
    fit = {"backbone": "toy", "apply_block": 1, "blocks": {
        "0": {"eigenvalues": [3, 2, 1], "si": [0.74, 0.75, 0.9], "weights": [0, 1, 1]},
        "1": {"eigenvalues": [3, 2, 1], "si": [0.1, 0.2, 0.3], "weights": [0, 0, 0]}}}
    (tmp_path / "fit-mae-residual.json").write_text(json.dumps(fit))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    rows = results_tables.depth_table().splitlines()
    assert rows[2] == "| 0 | 0.900 (2) |" and rows[3] == "| 1 | 0.300 (0) |"


def test_variant_rows_show_each_difference_with_its_interval(tmp_path, monkeypatch):
    run = {"results": {"original": {"miou": 30.0}, "soap": {"miou": 31.25}},
           "intervals": {"soap": {"miou": {"delta": 1.25, "low": -0.5, "high": 2.0}}}}
    (tmp_path / "knnseg-mae.json").write_text(json.dumps(run))
    (tmp_path / "knnseg-clip.json").write_text(json.dumps({"results": run["results"]}))  # old shape: left out
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    rows = results_tables.zero_shot_table().splitlines()
    assert rows[2:] == [f"| {results_tables.MODELS['mae']} | original |  |  |  | 30.00 |",
                        f"| {results_tables.MODELS['mae']} | soap |  |  |  | 31.25 (+1.25 [-0.50, +2.00]) |"]


# ---------------------------------------------------------------- BENCHMARKS.md and the prose check


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """A repository of its own: results/, results/benchmarks/, zoo cards, RESULTS.md and BENCHMARKS.md."""
    (tmp_path / "results" / "benchmarks").mkdir(parents=True)
    (tmp_path / "cards").mkdir()
    monkeypatch.setattr(benchmark_tables, "ROOT", tmp_path)
    monkeypatch.setattr(benchmark_tables, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(benchmark_tables, "BENCH", tmp_path / "results" / "benchmarks")
    monkeypatch.setattr(benchmark_tables, "ZOO_CARDS", tmp_path / "cards")
    benchmark_tables._json.cache_clear()
    yield tmp_path
    benchmark_tables._json.cache_clear()


def write(path: Path, payload) -> None:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    benchmark_tables._json.cache_clear()


def test_a_stale_prose_number_fails_the_check(tree, capsys):
    write(tree / "results" / "knnseg-mae.json", {"results": {"soap": {"miou": 31.254}}})
    write(tree / "BENCHMARKS.md", "# Benchmarks\n")
    write(tree / "RESULTS.md", "# Results\n\nSOAP gives 31.25 mIoU on CamVid (31.3 rounded).\n")
    assert benchmark_tables.main(check=True)
    write(tree / "results" / "knnseg-mae.json", {"results": {"soap": {"miou": 30.5}}})  # measured again
    assert not benchmark_tables.main(check=True)
    assert "RESULTS.md line 3: 31.25 mIoU" in capsys.readouterr().err


def test_a_stale_quoted_value_fails_the_check_and_is_rewritten(tree):
    write(tree / "results" / "benchmarks" / "fit_methods.json", {"results": {"ratio": 0.9091}})
    text = "Ratio <!-- value:benchmarks/fit_methods:results/ratio:.3f -->0.909: within noise.\n"
    write(tree / "RESULTS.md", "# Results\n")
    write(tree / "BENCHMARKS.md", text)
    assert benchmark_tables.main(check=True)
    write(tree / "results" / "benchmarks" / "fit_methods.json", {"results": {"ratio": 1.1}})
    assert not benchmark_tables.main(check=True)
    assert benchmark_tables.main(check=False)  # rewrites the number
    assert (tree / "BENCHMARKS.md").read_text() == text.replace("0.909", "1.100")


def test_quoted_values_index_lists_take_differences_and_write_a_true_minus(tree):
    write(tree / "results" / "sweep.json", {"blocks": [{"a": 81.5, "b": 69.2}], "si": [0.1, 0.853]})
    text = ("<!-- value:sweep:blocks/0/b - blocks/0/a:.1f -->0 and <!-- value:sweep:blocks/0/b - blocks/0/a:abs.0f -->"
            " and <!-- value:sweep:si/1:.0% -->")
    assert benchmark_tables.fill_values(text) == (
        "<!-- value:sweep:blocks/0/b - blocks/0/a:.1f -->−12.3 and "
        "<!-- value:sweep:blocks/0/b - blocks/0/a:abs.0f -->12"
        " and <!-- value:sweep:si/1:.0% -->85%")
    with pytest.raises(SystemExit, match="no such value"):
        benchmark_tables.fill_values("<!-- value:sweep:blocks/3/a:.1f -->1.0")


def test_what_counts_as_a_measured_number():
    text = ("Took 12 s and 3.5 min over 300 images at 224 px (τ = 0.3, k = 30, `--limit 0.5`), 8.6× faster, "
            "42 % of the time, ViT-S/14, PC8, top-2, torch 2.13.0, 2026-12-01, §3, 224×224.\n"
            "```bash\npython x.py --tau 0.25\n```\n| 1.23 | in a table |\n")
    assert [shown for _, _, shown in benchmark_tables.measured(text)] == ["12 s", "3.5 min", "8.6×", "42 %", "1.23"]


def test_a_number_without_a_sign_matches_a_difference_and_a_signed_one_its_sign():
    corpus = benchmark_tables.Corpus([-0.31, 2.0, 1.5e-5])
    assert corpus.has("", "0.31") and corpus.has("−", "0.31") and not corpus.has("+", "0.31")
    assert corpus.has("+", "2.00") and not corpus.has("", "2.01") and corpus.has("", "1.5e-5")


def test_a_sources_comment_narrows_the_files_of_its_section(tree):
    write(tree / "results" / "a.json", {"v": 1.25})
    write(tree / "results" / "b.json", {"v": 2.5})
    text = "# R\n\n## A\n<!-- sources: a -->\n2.5 s, 1.25 s\n\n## B\n2.5 s\n\n## C\n<!-- sources: none -->\n1.25 s\n"
    assert benchmark_tables.unsourced(text, ["*"]) == ["line 5: 2.5 s", "line 12: 1.25 s"]


def test_a_number_of_a_generated_table_of_the_section_is_a_source(tree):
    text = "## A\n<!-- sources: none -->\n<!-- table:x -->\n| 0.982 |\n<!-- /table -->\nup to 0.98 there\n"
    assert benchmark_tables.unsourced(text, ["*"]) == []


def test_benchmarks_md_is_built_from_the_benchmark_files(tree):
    run = {"command": "python benchmarks/fit_methods.py --limit 8", "date": "2026-12-02",
           "machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0", "threads": 1, "processes": 1, "gpu": None,
                       "load_average": {"before": [1.0, 1, 1], "after": [2.04, 1, 1]}},
           "settings": {}, "results": {"n_real": 8, "n_synthetic": 8, "blocks": 6, "ratio": 0.95,
                                       "median_s": {"soap": 2.0, "derivable": 1.9},
                                       "runs_s": {"soap": [2.0, 2.1], "derivable": [1.9, 1.8]}}}
    write(tree / "results" / "benchmarks" / "fit_methods.json", run)
    write(tree / "RESULTS.md", "# Results\n")
    write(tree / "BENCHMARKS.md", "# B\n\n<!-- table:fit-methods -->\n<!-- /table -->\n")
    assert benchmark_tables.main(check=False)
    text = (tree / "BENCHMARKS.md").read_text()
    assert "```bash\npython benchmarks/fit_methods.py --limit 8\n```" in text
    assert ("- `results/benchmarks/fit_methods.json`: 2026-12-02, Some CPU, 2 cores, no GPU, torch 2.13.0, "
            "1 torch thread; load average 1.0 before, 2.0 after") in text
    assert "| every derivable correction | 1.90 | 1.90, 1.80 |" in text
    assert benchmark_tables.main(check=True)


def test_a_benchmark_writes_its_command_day_and_machine(tmp_path, monkeypatch):
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _record import Record

    parser = argparse.ArgumentParser()
    parser.add_argument("--images")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["benchmarks/demo.py", "--images", str(ROOT.parent / "shared" / "data"),
                                      "--out", str(tmp_path / "demo.json")])
    record = Record(str(ROOT / "benchmarks" / "demo.py"), parser)
    record.parse()
    record.print("ratio 0.5")
    record.results["ratio"] = 0.5
    record.write()
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert payload["command"].startswith("python benchmarks/demo.py --images ../shared/data --out ")
    assert payload["results"] == {"ratio": 0.5} and payload["printed"] == ["ratio 0.5"]
    assert set(payload["machine"]) >= {"cpu", "cores", "torch", "threads", "load_average"}
    assert len(payload["date"]) == 10 and payload["settings"] == {"images": "../shared/data"}


def test_a_value_marker_may_not_start_a_line():
    problems = benchmark_tables.check_prose("BENCHMARKS.md", "Ratio\n<!-- value:x:y:.1f -->1.0 here\n")
    assert problems[0] == "BENCHMARKS.md line 2: a value marker starts the line (move it after a word)"
