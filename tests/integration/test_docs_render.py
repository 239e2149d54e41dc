"""The built site, as a browser without internet draws it: every diagram is a picture that reads.

The site is built with `mkdocs build --strict` into a temporary directory and opened from disk in
headless Chromium (`tests/support/chromium.py`), which resolves no host name: Mermaid must come from
the site itself (mkdocs.yml `extra_javascript`), since the theme falls back to unpkg.com only when no
global `mermaid` is loaded. Chromium is required: CI installs it (.ci/run), and a missing one fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.chromium import Chromium, classes, walk

ROOT = Path(__file__).resolve().parents[2]
# Rendered width / drawn width of a diagram's svg, at a 1280 px window. Mermaid draws labels at 16 px
# and the theme fits a diagram to the column (about 690 px there), so a diagram wider than the column
# is scaled down with its text: the two left-to-right flowcharts this page had measured 0.19 and 0.29
# (labels 3-5 px tall); drawn top to bottom, 0.90 and 1.0. At 0.6 labels are still 10 px.
READABLE_SCALE = 0.6
SVG_FACTS = """function () {
    const box = this.getBoundingClientRect();
    return {width: box.width, drawn: this.viewBox.baseVal.width, text: this.textContent,
            labels: this.querySelectorAll(".nodeLabel, .edgeLabel, text").length};
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("site") / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(directory)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stdout + build.stderr
    return directory


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    with Chromium(tmp_path_factory.mktemp("chromium"), width=1280, height=2000) as chromium:
        yield chromium


def pages(site: Path) -> dict[str, str]:
    return {str(path.relative_to(site)): path.read_text() for path in site.rglob("*.html")}


def pages_with_diagrams(site: Path) -> dict[str, int]:
    """Each built page that has Mermaid diagrams, with how many."""
    counts = {name: len(re.findall(r'<pre class="mermaid">', html))
              for name, html in pages(site).items()}
    return {name: count for name, count in counts.items() if count}


def test_the_site_ships_mermaid_and_names_no_cdn(site: Path) -> None:
    for name, html in pages(site).items():
        remote = re.findall(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]*)"',
                            html)
        assert not remote, f"{name} loads {remote}"
    scripts = re.findall(r'<script src="([^"]*mermaid[^"]*\.js)"',
                         (site / "architecture" / "index.html").read_text())
    assert len(scripts) == 1, scripts
    script = (site / "architecture" / scripts[0]).resolve()
    assert script.is_file() and script.stat().st_size > 1_000_000, script
    version = re.fullmatch(r"mermaid-(11\.\d+\.\d+)\.min\.js", script.name)
    assert version, f"{script.name}: the file names its Mermaid version"
    assert "MIT License" in (script.parent / f"mermaid-{version[1]}.LICENSE.txt").read_text()
    note = (script.parent / f"mermaid-{version[1]}.README.txt").read_text()
    assert f"sha256 of the file: {hashlib.sha256(script.read_bytes()).hexdigest()}" in note


def test_every_diagram_draws_offline_and_reads_at_the_page_width(
        site: Path, browser: Chromium, tmp_path: Path) -> None:
    diagrams = pages_with_diagrams(site)
    assert "architecture/index.html" in diagrams
    for name, count in diagrams.items():
        browser.requests.clear()
        browser.open((site / name).as_uri())
        drawn = browser.wait_for(f'document.querySelectorAll("div.mermaid").length >= {count}', 30)
        browser.screenshot(tmp_path / f"{name.replace('/', '-')}.png")  # for a failure's reader
        assert drawn, f"{name}: {count} diagrams, not all drawn (see {tmp_path})"
        leftover = browser.evaluate("document.body.innerText")
        assert not re.search(r"^\s*(flowchart|graph|sequenceDiagram)\b", leftover, re.MULTILINE), (
            f"{name} shows a diagram's source")
        svgs = [svg_facts(browser, node) for node in walk(browser.document())
                if node.get("nodeName") == "DIV" and "mermaid" in classes(node)]
        assert len(svgs) == count, f"{name}: {len(svgs)} of {count} diagrams have an svg"
        for index, svg in enumerate(svgs):
            assert svg["labels"] and "Syntax error" not in svg["text"], (name, index, svg["text"])
            scale = svg["width"] / svg["drawn"]
            assert scale >= READABLE_SCALE, (
                f"{name}: diagram {index + 1} is {svg['drawn']:.0f} px wide, shrunk to "
                f"{svg['width']:.0f} px (x{scale:.2f}): its labels do not read; draw it top to "
                "bottom or split it")
        remote = [url for url in browser.requests if not url.startswith(("file:", "data:", "blob:"))]
        assert not remote, f"{name} asked the network for {remote}"


def svg_facts(browser: Chromium, mermaid: dict[str, Any]) -> dict[str, Any]:
    """The one svg the theme drew into the diagram's (closed) shadow root, measured."""
    svgs = [node for node in walk(mermaid) if node.get("nodeName") == "svg"]
    assert svgs, "a diagram without an svg"
    facts: dict[str, Any] = browser.call_on(svgs[0]["nodeId"], SVG_FACTS)
    return facts


def test_the_set_up_block_on_the_home_page_fits_its_column(site: Path, browser: Chromium) -> None:
    """README's set-up commands wrap (docs/stylesheets/extra.css) rather than run off the edge."""
    browser.open((site / "index.html").as_uri())
    assert browser.wait_for('document.readyState == "complete"', 30)
    blocks = browser.evaluate("""[...document.querySelectorAll(".wrap-code pre > code")]
        .map(code => [code.scrollWidth, code.clientWidth])""")
    assert blocks, "the home page lost its wrapping set-up section (docs/index.md)"
    for scroll_width, client_width in blocks:
        assert scroll_width <= client_width, (scroll_width, client_width)
