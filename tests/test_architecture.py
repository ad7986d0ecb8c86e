"""The layering rules of the package (README "Layout"), checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "soapvit"
CORE = ("backbones", "data", "stats.py", "corrections", "features.py", "fitting.py", "safetensors_io.py", "errors.py",
        "schedule.py", "distributed.py", "resume.py")
ENTRY_POINTS = ("cli", "__main__.py")  # python -m soapvit runs the CLI
UPPER = ("eval", "pretrain", "aggregate", "cli")
EVALUATIONS = ("eval", "aggregate", "fitting", "plots")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the soapvit modules a file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            prefix = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            names.add(prefix)
            names.update(f"{prefix}.{a.name}" for a in node.names)
    return {n for n in names if n and n.startswith("soapvit")}


def test_nothing_imports_the_cli_and_core_never_imports_upper_layers():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        imports = imported_modules(path)
        if rel.parts[0] not in ENTRY_POINTS:
            assert not any(n.startswith("soapvit.cli") for n in imports), f"{rel} imports the CLI"
        if rel.parts[0] in CORE:
            bad = [n for n in imports if "." in n and n.split(".")[1] in UPPER]
            assert not bad, f"{rel} (core) imports {bad}"


def test_the_pipeline_knows_the_correction_protocol_not_a_correction():
    imports = imported_modules(PACKAGE / "features.py")
    assert not [n for n in imports if n.startswith("soapvit.corrections")], imports


def test_the_head_rule_and_the_backbone_check_are_written_once():
    """One ``def check_backbone`` (corrections/base.py; CorrectionSet's method only delegates) and
    one class that puts a correction into the forward pass."""
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    checks = [p.relative_to(PACKAGE).as_posix() for p, s in sources.items() if "def check_backbone(" in s]
    assert sorted(checks) == ["corrections/base.py", "corrections/file.py"]
    assert "check_backbone(self.metadata" in sources[PACKAGE / "corrections" / "file.py"]
    rules = [p.relative_to(PACKAGE).as_posix() for p, s in sources.items() if "{**edits," in s]
    assert rules == ["corrections/base.py"]


def test_pretraining_sits_below_the_evaluations():
    """Probes, SOAP fits and figures of trained models belong to scripts, not to soapvit.pretrain."""
    for path in (PACKAGE / "pretrain").rglob("*.py"):
        bad = [n for n in imported_modules(path) if "." in n and n.split(".")[1] in EVALUATIONS]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_import_soapvit_loads_no_heavy_optional_library():
    code = (
        "import sys, soapvit, soapvit.backbones, soapvit.corrections.soap, soapvit.fitting, soapvit.cli;"
        "heavy = [m for m in ('transformers', 'timm', 'onnx', 'onnxruntime', 'torchvision') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
