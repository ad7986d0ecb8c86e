"""The HTML report: structure and values parsed with the standard library, then the page opened
from disk in headless Chromium (console, network, screenshot, dark mode)."""

import base64
import dataclasses
import io
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import ToyBackbone

from soapvit.errors import SoapvitError
from conftest import fit_soap
from soapvit.report import HEAD_SECTIONS, PAGE_SECTIONS, render_report, write_report
from soapvit.corrections.soap import SoapHead

LABELS = ("toy strong position", "toy weak position")
KNN_EVAL = {
    "kind": "knnseg",
    "results": {"original": {"miou": 31.25, "acc": 80.5, "per_class_iou": {"sky": 90.0}},
                "soap": {"miou": 33.75, "acc": 81.0, "per_class_iou": {"sky": 91.0}},
                "soap-mu3": {"miou": 32.5, "acc": 80.75}},
    "settings": {"k": 30}, "seconds": {"total": 2.0}, "skipped": [], "warnings": [],
}
TOKENCUT_EVAL = {
    "kind": "tokencut",
    "results": {"original": {"maxFbeta": 70.125, "iou": 55.5, "acc": 88.25, "n_images": 7},
                "soap": {"maxFbeta": 72.5, "iou": 57.0, "acc": 89.0, "n_images": 7}},
    "intervals": {"soap": {"maxFbeta": {"delta": 2.375, "low": -0.5, "high": 5.25}}},
    "examples": [{"image": "a.png", "iou": 0.5}],
    "settings": {"tau": 0.3, "protocol": "soap", "model": "toy:test", "head": "heads/toy.safetensors"},
}


class PageParser(HTMLParser):
    """Headings, images, figures (with captions), tables (rows of cell texts) and card entries."""

    def __init__(self):
        super().__init__()
        self.headings, self.images, self.figures, self.tables, self.cards, self.tags = [], [], [], [], [], []
        self._text = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("h1", "h2", "h3", "figcaption", "caption", "th", "td", "dt", "dd"):
            self._text = []
        if tag == "img":
            self.images.append(attrs)
            if self.figures and self.figures[-1]["open"]:
                self.figures[-1]["img"] = attrs
        elif tag == "figure":
            self.figures.append({"open": True, "img": None, "caption": ""})
        elif tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag == "dl":
            self.cards.append({})

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        text = "".join(self._text or []).strip()
        if tag in ("h1", "h2", "h3"):
            self.headings.append((tag, text))
        elif tag == "figcaption":
            self.figures[-1]["caption"] = text
        elif tag == "figure":
            self.figures[-1]["open"] = False
        elif tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag in ("th", "td"):
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "dt":
            self._term = text
        elif tag == "dd":
            self.cards[-1][self._term] = text
        if tag in ("h1", "h2", "h3", "figcaption", "caption", "th", "td", "dt", "dd"):
            self._text = None


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two toy heads (strong and weak position embedding), their images and backbones."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((24, 28, 3)) * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    backbones = {LABELS[0]: ToyBackbone(pos_scale=3.0), LABELS[1]: ToyBackbone(pos_scale=0.3, seed=1)}
    heads = {label: fit_soap(b, folder, synthetic=12, batch_size=6, device="cpu", blocks="all")[0]
             for label, b in backbones.items()}
    return heads, sorted(folder.glob("*.png"))[:2], backbones


@pytest.fixture(scope="module")
def report(toy, tmp_path_factory):
    heads, images, backbones = toy
    folder = tmp_path_factory.mktemp("report")
    (folder / "knn.json").write_text(json.dumps(KNN_EVAL))
    (folder / "tokencut.json").write_text(json.dumps(TOKENCUT_EVAL))
    evaluations = [folder / "knn.json", folder / "tokencut.json"]
    return write_report(heads, folder / "report.html", evaluations, images, backbones)


def test_report_is_self_contained_with_every_section_and_captioned_figures(report):
    page = report.read_text(encoding="utf-8")
    parsed = parse(page)
    assert "http" not in page
    assert [t for t, _ in parsed.tags if t in ("script", "iframe", "object", "embed")] == []
    assert [a for t, a in parsed.tags if t == "link"] == [{"rel": "icon", "href": "data:,"}]
    assert "prefers-color-scheme: dark" in page

    assert [text for tag, text in parsed.headings if tag == "h2"] == [
        PAGE_SECTIONS[0], *(f"Model: {label}" for label in LABELS), PAGE_SECTIONS[1]]
    assert [text for tag, text in parsed.headings if tag == "h3"] == list(HEAD_SECTIONS) * 2

    # comparison (2) + per head: SI curves, positional variance, removed responses, token maps
    assert len(parsed.figures) == len(parsed.images) == 2 + 4 * len(LABELS)
    for figure in parsed.figures:
        assert figure["img"]["alt"] and len(figure["caption"]) > 40
        assert "look for" in figure["caption"].lower()
        prefix = "data:image/png;base64,"
        assert figure["img"]["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(figure["img"]["src"][len(prefix):])))
        assert picture.format == "PNG" and min(picture.size) > 50


def test_report_shows_each_heads_values(report, toy):
    heads = toy[0]
    parsed = parse(report.read_text(encoding="utf-8"))
    assert len(parsed.cards) == len(LABELS)
    block_tables = [t for t in parsed.tables if t["caption"].startswith("Per block")]
    for card, table, head in zip(parsed.cards, block_tables, heads.values()):
        last = head.blocks[head.apply_block]
        removed = (last.weights > 0.5).nonzero().flatten().tolist()
        assert removed, "the toy heads should remove their position components"
        assert card["backbone"] == "toy:test"
        assert head.metadata["n_real"] == head.metadata["n_synthetic"] == 12
        assert card["images"] == "12 real, 12 synthetic"
        assert card["generator"] == "mixture" and card["μ"] == "2.0" and card["τ"] == "0.05"
        assert card["image size"] == "16 px" and card["warnings"] == "none"
        assert card["skipped files"] == f"1: zz_corrupt.jpg ({head.metadata['skipped'][0]['reason']})"
        best = int(last.si.argmax())
        assert card[f"max SI at block {head.apply_block}"] == f"{last.si.max().item():.3f} (PC{best + 1})"
        assert card["removed components"] == ", ".join(f"PC{c + 1}" for c in removed)
        # the toy backbone ends in a LayerNorm: one direction (the last by eigenvalue) has no variance
        null = (last.eigenvalues <= 1e-9 * last.eigenvalues.max()).nonzero().flatten().tolist()
        assert null == [len(last.eigenvalues) - 1]
        assert card["LayerNorm null direction"] == f"PC{null[0] + 1} (no variance: SI undefined)"
        rows = {r[0].split()[0]: r[1:] for r in table["rows"][1:]}
        assert sorted(rows) == [str(b) for b in sorted(head.blocks)]
        for b, d in head.blocks.items():
            top = int(d.si.argmax())
            weighted = " ".join(f"PC{c + 1}" for c in (d.weights > 0.5).nonzero().flatten().tolist()) or "–"
            assert rows[str(b)] == [f"{d.si.max().item():.3f}", f"PC{top + 1}", str(int((d.si >= 0.75).sum())),
                                    f"{d.position_share[top].item():.0%}", weighted]


def test_report_tables_evaluations_by_variant_naming_model_head_and_metrics(report):
    tables = {t["caption"]: t["rows"] for t in parse(report.read_text(encoding="utf-8")).tables}
    # a file without model and head in its settings says so rather than leaving them out
    assert tables["kNN segmentation — model not recorded, head not recorded — knn.json"] == [
        ["variant", "mIoU", "pixel accuracy"], ["original", "31.250", "80.500"],
        ["soap", "33.750", "81.000"], ["soap-mu3", "32.500", "80.750"]]
    assert tables["TokenCut (soap protocol) — model toy:test, head toy.safetensors — tokencut.json"] == [
        ["variant", "max Fβ", "IoU", "pixel accuracy", "images"],
        ["original", "70.125", "55.500", "88.250", "7"],
        ["soap", "72.500 (+2.38 [-0.50, +5.25])", "57.000", "89.000", "7"]]


def test_report_tolerates_missing_metadata_and_nothing_removed(toy):
    head = next(iter(toy[0].values()))
    keep_all = {b: dataclasses.replace(d, weights=torch.zeros_like(d.weights)) for b, d in head.blocks.items()}
    bare = SoapHead(keep_all, head.apply_block, {})
    parsed = parse(render_report({"bare": bare}))
    card = parsed.cards[0]
    assert card["backbone"] == card["generator"] == card["skipped files"] == card["warnings"] == "not recorded"
    assert card["removed components"] == "none"
    assert len(parsed.figures) == 2 + 2  # comparison, SI curves, positional variance
    assert [text for tag, text in parsed.headings if tag == "h3"] == list(HEAD_SECTIONS)


def test_report_refuses_a_json_without_results_before_drawing(toy, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"miou": 3.0}))
    with pytest.raises(SoapvitError, match="bad.json has no 'results' mapping"):
        render_report(toy[0], [bad])


def test_cli_report_labels_heads_and_notes_a_backbone_it_cannot_load(toy, tmp_path, run_cli):
    heads, images, _ = toy
    # an id no source loads (other tests register a "toy" source for the whole session)
    files = [SoapHead(h.blocks, h.apply_block, {**h.metadata, "backbone": "nowhere:toy"})
             .save(tmp_path / f"head{i}.safetensors") for i, h in enumerate(heads.values())]
    code, _, err = run_cli(["report", *map(str, files), "--images", str(images[0].parent), "--count", "1",
                            "--out", str(tmp_path / "r.html")])
    assert code == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    models = [t for tag, t in parse(page).headings if tag == "h2"][1:3]
    assert models == ["Model: nowhere:toy (head0)", "Model: nowhere:toy (head1)"]
    assert page.count("Backbone not available, token maps not drawn: unknown model source") == 2


class DevTools:
    """A headless Chromium driven over the DevTools protocol (one browser-level websocket)."""

    def __init__(self, chromium: str, profile):
        import websocket

        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            assert time.monotonic() < deadline and self.process.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.last_id = 0

    def send(self, method: str, session: str | None = None, **params):
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params,
                                     **({"sessionId": session} if session else {})}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                assert "error" not in message, message["error"]
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        while not any(m.get("method") == event for m in self.events):
            self.events.append(json.loads(self.socket.recv()))

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"]["value"]

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium browser (Debian package chromium)")
def test_report_renders_in_headless_chromium_offline(report, tmp_path):
    browser = DevTools(shutil.which("chromium"), tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session)
        browser.send("Emulation.setDeviceMetricsOverride", session, width=1200, height=900, deviceScaleFactor=1,
                     mobile=False)
        browser.send("Page.navigate", session, url=report.as_uri())
        browser.wait_for("Page.loadEventFired")

        headings = browser.evaluate(session, "[...document.querySelectorAll('h2, h3')].map(h => h.textContent)")
        assert [h for h in headings if not h.startswith("Model: ")] == [PAGE_SECTIONS[0], *HEAD_SECTIONS * 2,
                                                                        PAGE_SECTIONS[1]]
        assert browser.evaluate(session, "[...document.images].filter(i => i.complete && i.naturalWidth > 50).length") \
            == browser.evaluate(session, "document.images.length") == 10
        height = browser.evaluate(session, "document.documentElement.scrollHeight")
        last_bottom = browser.evaluate(
            session, "document.getElementById('evaluations').parentElement.getBoundingClientRect().bottom + scrollY")
        shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1})
        light = browser.evaluate(session, "getComputedStyle(document.body).backgroundColor")
        browser.send("Emulation.setEmulatedMedia", session,
                     features=[{"name": "prefers-color-scheme", "value": "dark"}])
        dark = browser.evaluate(session, "getComputedStyle(document.body).backgroundColor")
    finally:
        browser.close()

    def is_problem(method, params):
        return (method in ("Runtime.exceptionThrown", "Network.loadingFailed")
                or (method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"))
                or (method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning")))

    assert [m for m in browser.events if is_problem(m.get("method"), m.get("params"))] == []
    requested = {m["params"]["request"]["url"] for m in browser.events
                 if m.get("method") == "Network.requestWillBeSent"}
    assert {u for u in requested if not u.startswith("data:")} == {report.as_uri()}

    screenshot = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    assert screenshot.size == (1200, height) and height >= last_bottom > 3000
    assert np.asarray(screenshot).std() > 20 and len(screenshot.getcolors(maxcolors=1 << 24)) > 500
    assert (light, dark) == ("rgb(255, 255, 255)", "rgb(22, 24, 28)")
