"""RESULTS.md's tables are what the committed JSON files and model cards give."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

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
