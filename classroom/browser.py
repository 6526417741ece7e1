"""Headless-browser checks of built pages (the book, the slides), with the Chromium of the Debian package `chromium`.

Two tools, both plain Chromium command lines (no driver library):

- `screenshot(url, png)`: what a reader sees, as a PNG; `blank_fraction(png)` tells an empty page from a page with
  content.
- `probe(page)`: loads a copy of the page with a small script appended (PROBE_JS), lets MathJax and reveal.js finish,
  and reads back what the script found in the laid-out page (or on each of a deck's first slides), through
  `--dump-dom`:
  - `raw_tex`: text outside code that still looks like TeX (`$...$`, `\\frac`, `\\begin{...}`): math MathJax did
    not render;
  - `broken_images`: images that did not load;
  - `clipped`: elements whose overflow is hidden (no scrollbar) while visible content (text, images) reaches past
    their right edge, i.e. lines cut off at the right;
  - `overflowing`: elements that stick out of the page's content column without a scrolling box around them
    (a table that loses its last columns behind the margin);
  - `text_chars`: how much text the page shows.

Chromium runs with the flags of the project's tooling notes: --headless --no-sandbox --disable-gpu, no background
networking, a fixed window size and a virtual time budget that lets the page's scripts finish.
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 1000)
BUDGET_MS = 15000
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--disable-dev-shm-usage"]
RESULT_ID = "dsv3-probe-result"
# A box that scrolls sideways must say so: it must carry this class (the book's assets/scroll-cue.js adds it) and a
# visible cue (book.css draws a shadow at the edge that hides more content, and keeps the scrollbar visible).
CUE_CLASS = "dsv3-scrolls"

# Runs in the page once everything is loaded: waits for MathJax 3 (MathJax.startup.promise) and reveal.js
# (Reveal.isReady), then measures. `scope` is the CSS selector of the content column (the book's article, the
# reveal deck's current slide).
PROBE_JS = r"""
(function () {
  const SCOPE = %(scope)s;
  const CUE = %(cue)s;
  const TEX = /(\$[^$\s][^$]*\$|\\(frac|sum|mathrm|mathbf|operatorname|begin\{|left|right|sqrt|tag)\b)/;
  function skip(el) {
    return el.closest('pre, code, script, style, mjx-container, .MathJax, textarea, svg, [aria-hidden="true"]');
  }
  function scrollable(el, stop) {
    for (let a = el.parentElement; a && a !== stop; a = a.parentElement) {
      const s = getComputedStyle(a);
      if (['auto', 'scroll'].includes(s.overflowX) && a.scrollWidth > a.clientWidth + 1) return true;
    }
    return false;
  }
  function hiddenPart(el) {
    // how far visible content (text, images, boxes) reaches beyond el's right edge; MathJax's off-screen copy for
    // screen readers (mjx-assistive-mml) is not visible content
    const edge = el.getBoundingClientRect().right;
    let reach = edge;
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT | NodeFilter.SHOW_ELEMENT);
    for (let n = walker.nextNode(), seen = 0; n && seen < 2000; n = walker.nextNode(), seen++) {
      const host = n.nodeType === Node.TEXT_NODE ? n.parentElement : n;
      if (!host || host.closest('mjx-assistive-mml')) continue;
      let rect;
      if (n.nodeType === Node.TEXT_NODE) {
        if (!n.textContent.trim()) continue;
        const range = document.createRange();
        range.selectNodeContents(n);
        rect = range.getBoundingClientRect();
      } else if (['IMG', 'CANVAS', 'SVG', 'svg'].includes(n.tagName)) {
        rect = n.getBoundingClientRect();
      } else continue;
      if (rect.width > 0) reach = Math.max(reach, rect.right);
    }
    return reach - edge;
  }
  function describe(el) {
    const name = typeof el.className === 'string' ? el.className.trim() : '';
    const cls = name ? '.' + name.split(/\s+/).join('.') : '';
    const text = (el.innerText || '').trim().replace(/\s+/g, ' ').slice(0, 80);
    return el.tagName.toLowerCase() + cls + (text ? ' "' + text + '"' : '');
  }
  function measure() {
    const root = document.querySelector(SCOPE) || document.body;
    const out = {scope: SCOPE, found_scope: !!document.querySelector(SCOPE), raw_tex: [], broken_images: [],
                 clipped: [], overflowing: [], scroll_without_cue: [], scrolling: 0,
                 text_chars: (root.innerText || '').trim().length};
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      if (!n.parentElement || skip(n.parentElement)) continue;
      const m = n.textContent.match(TEX);
      if (m && out.raw_tex.length < 20) out.raw_tex.push(n.textContent.trim().slice(0, 120));
    }
    for (const img of root.querySelectorAll('img')) {
      if (!img.complete || img.naturalWidth === 0) out.broken_images.push(img.getAttribute('src') || '');
    }
    const right = root.getBoundingClientRect().right;
    for (const el of root.querySelectorAll('*')) {
      if (el.closest('mjx-container, svg, script, style')) continue;
      const s = getComputedStyle(el);
      if (s.display === 'none' || s.visibility === 'hidden') continue;
      if (['hidden', 'clip'].includes(s.overflowX) && el.scrollWidth > el.clientWidth + 2 &&
          el.clientWidth > 0 && out.clipped.length < 20) {
        const cut = hiddenPart(el);
        if (cut > 2) out.clipped.push(describe(el) + ' (' + Math.round(cut) + ' px cut off at the right)');
      }
      if (['auto', 'scroll'].includes(s.overflowX) && el.scrollWidth > el.clientWidth + 2 && el.clientWidth > 0 &&
          !el.closest('mjx-container')) {
        out.scrolling += 1;  // a box the reader scrolls sideways: it must show that there is more (CUE_CLASS)
        if ((!el.classList.contains(CUE) || s.boxShadow === 'none') && out.scroll_without_cue.length < 20) {
          out.scroll_without_cue.push(describe(el) + ' (' + el.scrollWidth + ' px in ' + el.clientWidth + ' px)');
        }
      }
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.right > right + 2 && !scrollable(el, root) && out.overflowing.length < 20) {
        const parent = el.parentElement;
        if (!parent || parent.getBoundingClientRect().right <= right + 2) {
          out.overflowing.push(describe(el) + ' (right edge ' + Math.round(r.right) + ' > ' + Math.round(right)
                               + ' px)');
        }
      }
    }
    return out;
  }
  function finish(reports) {
    const pre = document.createElement('pre');
    pre.id = '%(result_id)s';
    pre.textContent = JSON.stringify(reports);
    document.body.appendChild(pre);
  }
  function ready() {
    const waits = [];
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) waits.push(MathJax.startup.promise);
    if (window.Reveal && Reveal.isReady && !Reveal.isReady()) {
      waits.push(new Promise(resolve => Reveal.on('ready', resolve)));
    }
    const slides = %(slides)d;
    Promise.all(waits).catch(() => null).then(async () => {
      const pause = () => new Promise(resolve => setTimeout(resolve, 300));
      await pause();
      if (!slides || !window.Reveal) { finish([measure()]); return; }
      const reports = [];
      for (let i = 0; i < slides; i++) {  // the first slides of a reveal.js deck, one after the other
        Reveal.slide(i, 0);
        await pause();
        const r = measure();
        r.slide = i;
        reports.push(r);
      }
      finish(reports);
    });
  }
  if (document.readyState === 'complete') ready(); else window.addEventListener('load', ready);
})();
"""


class BrowserError(RuntimeError):
    """Chromium could not render the page; the message says why."""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float, window: tuple[int, int] = WINDOW) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing cached between runs
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BrowserError(f"Chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}") from exc


def screenshot(url: str, png: Path, budget_ms: int = BUDGET_MS, timeout: float = 120,
               window: tuple[int, int] = WINDOW) -> Path:
    """Render `url` (file://...#fragment allowed) headless into `png`; returns png."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _run([f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url], timeout, window)
    if not png.is_file():
        raise BrowserError(f"Chromium wrote no screenshot of {url} (exit code {result.returncode}):\n"
                           f"{result.stderr[-2000:]}")
    return png


def blank_fraction(png: Path) -> float:
    """The fraction of the screenshot's pixels that have the colour of its most common pixel (1.0: a blank page)."""
    from PIL import Image

    with Image.open(png) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 24)
    total = sum(n for n, _ in colors)
    return max(n for n, _ in colors) / total


def probe(page: Path, scope: str = "body", slides: int = 0, budget_ms: int = BUDGET_MS, timeout: float = 180,
          window: tuple[int, int] = WINDOW) -> list[dict]:
    """Load a copy of `page` (next to it, so relative links work) with PROBE_JS appended and return its findings:
    one report, or with slides=n one per slide for the first n slides of a reveal.js deck (scope: the present
    slide)."""
    page = Path(page)
    html = page.read_text(encoding="utf-8")
    script = PROBE_JS % {"scope": json.dumps(scope), "result_id": RESULT_ID, "slides": slides,
                         "cue": json.dumps(CUE_CLASS)}
    tag = f"<script>{script}</script>"
    probed = html.replace("</body>", tag + "</body>", 1) if "</body>" in html else html + tag
    with tempfile.NamedTemporaryFile("w", suffix=".html", prefix=".probe-", dir=page.parent, delete=False,
                                     encoding="utf-8") as f:
        f.write(probed)
        copy = Path(f.name)
    try:
        # Headless Chromium now and then dumps the DOM before the page's scripts have run (seen once in a
        # CI run: exit code 0, no report, only D-Bus noise on stderr), so a missing report is retried, with twice
        # the virtual time budget each time; a page whose script never reports still fails after the third try.
        for attempt in range(3):
            result = _run([f"--virtual-time-budget={budget_ms << attempt}", "--dump-dom", copy.as_uri()], timeout,
                          window)
            found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', result.stdout, flags=re.S)
            if found:
                return json.loads(html_lib.unescape(found.group(1)))
    finally:
        copy.unlink(missing_ok=True)
    raise BrowserError(f"the probe script did not report on {page} in 3 tries (exit code {result.returncode}); "
                       f"Chromium said:\n{result.stderr[-2000:]}")


def problems(report: dict) -> list[str]:
    """Human-readable problems in a probe report (empty when the page renders cleanly)."""
    out = []
    if not report["found_scope"]:
        out.append(f"no element matches {report['scope']!r}")
    if report["text_chars"] < 20:
        out.append(f"almost no text ({report['text_chars']} characters): a blank page?")
    out += [f"raw TeX: {t!r}" for t in report["raw_tex"]]
    out += [f"image did not load: {src}" for src in report["broken_images"]]
    out += [f"clipped: {c}" for c in report["clipped"]]
    out += [f"overflows the column: {c}" for c in report["overflowing"]]
    out += [f"scrolls sideways without a visible cue: {c}" for c in report.get("scroll_without_cue", [])]
    return out
