"""Debian's headless Chromium for the page tests: the page as a browser renders it (its script run,
its fetches answered), read back as DOM, and screenshots for a person to look at."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Time the page's script gets (virtual time: it runs as fast as the fetches are answered).
BUDGET_MS = "8000"


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is not installed: `make setup-browser` (or make test) installs it"
    return found


def _run(url: str, *args: str, width: int, height: int) -> bytes:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", f"--virtual-time-budget={BUDGET_MS}", *args, url],
            capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


def rendered_dom(url: str, *, width: int = 1280, height: int = 1000) -> str:
    """The DOM after the page's script ran (`--dump-dom`)."""
    return _run(url, "--dump-dom", width=width, height=height).decode()


def screenshot(url: str, path: Path, *, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}", width=width, height=height)
    assert path.stat().st_size > 10_000, f"{path}: an empty screenshot?"
    return path


@dataclass
class Page:
    """What the operator page shows: text by element id, and each data-* row's fields."""

    by_id: dict[str, str] = field(default_factory=dict)
    body: dict[str, str] = field(default_factory=dict)  # <body data-*>
    rows: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (kind, name) -> field -> text


class _Reader(HTMLParser):
    ROW_KINDS = ("adapter", "sink", "reason", "tenant", "field", "action")

    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._open: list[tuple[str, str | None, list[str]]] = []  # (tag, what it collects, text)
        self._row: tuple[str, str] | None = None
        self._cell = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.page.body = {k[5:]: v or "" for k, v in a.items() if k.startswith("data-")}
        if tag == "tr":
            kind = next((k for k in self.ROW_KINDS if f"data-{k}" in a), None)
            self._row = (kind, a[f"data-{kind}"] or "") if kind else None
            self._cell = 0
            if self._row:
                self.page.rows[self._row] = {}
        collects = None
        if tag == "td" and self._row:
            collects = a.get("data-field") or f"cell{self._cell}"
            self._cell += 1
        elif a.get("id"):
            collects = "#" + (a["id"] or "")
        self._open.append((tag, collects, []))

    def handle_data(self, data: str) -> None:
        for _, collects, text in self._open:
            if collects:
                text.append(data)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, collects, text = self._open.pop()
            if collects and collects.startswith("#"):
                self.page.by_id[collects[1:]] = "".join(text).strip()
            elif collects and self._row:
                self.page.rows[self._row][collects] = "".join(text).strip()
            if open_tag == tag:
                break
        if tag == "tr":
            self._row = None


def read_page(dom: str) -> Page:
    reader = _Reader()
    reader.feed(dom)
    return reader.page
