"""The book (book/): its reference pages agree with the code, and it builds offline into a complete, local site.

Fast checks: the notation crosswalk against `HF_FIELDS`, `to_hf()`, the 671B preset, `checkpoint.hub_key` and the
model's state dict; every `tests/...::test_...` and every `dsv3_ref.x.y` the pages cite exists.
Build checks (one build of the real book, ~10-60 s; MathJax comes from the npm registry once, then book/.cache):
one HTML page per notebook and per markdown page, notebooks in teaching order, no remote script, stylesheet or
embedded resource, every page with math loads the local MathJax, no page shows an NBVAL comment; and in a headless
Chromium (`classroom.browser`, skipped without it) the reference pages and three notebooks render without raw TeX,
lost images, lines cut off or content sticking out of the column.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from classroom import browser

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
PAGES = sorted(BOOK.glob("*.md"))
TEST_REF = re.compile(r"\b(tests/test_\w+\.py)::(\w+(?:::\w+)?)")
CODE_REF = re.compile(r"`(dsv3_ref(?:\.\w+)+)`")
CODE = re.compile(r"`([^`]+)`")
pytestmark = pytest.mark.no_numerics  # text and HTML only: the different-machine pass skips this module


# ------------------------------------------------------------------ helpers: markdown tables
def _table(page: Path, section: str) -> list[list[str]]:
    """The first pipe table under the '## section' heading of a page: rows of stripped cells, header row included."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"{page.name}: no '## {section}' section"
    rows = []
    for line in match.group(1).splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"{page.name}: no table under '## {section}'"
    return [rows[0]] + rows[2:]  # drop the |---| line


def _code(cell: str) -> str | None:
    """The first `code` span of a table cell (None for '—' or plain text)."""
    found = CODE.findall(cell)
    return found[0] if found else None


def _number_or_text(cell: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(cell)
        except ValueError:
            pass
    return cell


# ------------------------------------------------------------------ the crosswalk agrees with the code
def test_config_crosswalk_matches_the_code():
    from dsv3_ref.config import HF_FIELDS, ModelConfig

    rows = _table(BOOK / "notation.md", "Configuration")
    assert rows[0][1:] == ["dsv3_ref `ModelConfig`", "HF `config.json`", "official `ModelArgs`", "671B"], rows[0]
    cfg = ModelConfig.from_preset("671B")
    hf = cfg.to_hf()
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    documented = set()
    for _paper, ours_cell, hf_cell, official_cell, value in rows[1:]:
        ours = _code(ours_cell)
        assert ours in fields, f"notation.md: {ours_cell!r} is not a ModelConfig field"
        documented.add(ours)
        hf_name = _code(hf_cell)
        if ours in HF_FIELDS:
            assert hf_name == HF_FIELDS[ours], f"notation.md row {ours}: HF name {hf_name!r}, HF_FIELDS says " \
                                               f"{HF_FIELDS[ours]!r}"
        if hf_name is not None:  # the name is where to_hf() writes the value (dotted = nested, e.g. rope_scaling.x)
            node = hf
            for key in hf_name.split("."):
                node = node[key]
            assert node == getattr(cfg, ours), f"notation.md row {ours}: to_hf()[{hf_name!r}] = {node!r}"
        assert _code(official_cell) in (None, ours), f"notation.md row {ours}: dsv3_ref uses the official names"
        assert _number_or_text(value) == getattr(cfg, ours), f"notation.md row {ours}: 671B value {value!r}, " \
                                                               f"preset has {getattr(cfg, ours)!r}"
    assert set(HF_FIELDS) <= documented, f"HF_FIELDS missing from notation.md: {sorted(set(HF_FIELDS) - documented)}"
    assert documented == fields, f"ModelConfig fields missing from notation.md: {sorted(fields - documented)}"


def _family(name: str) -> str:
    """A state-dict name with its layer / expert indices replaced as the weights table writes them."""
    name = re.sub(r"^mtp\.\d+\.block\.", "layers.{i}.", name)  # an MTP block is laid out like any MoE block
    name = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{e}.", name)


def test_weight_crosswalk_matches_the_code():
    import torch

    from dsv3_ref import ModelConfig, Transformer
    from dsv3_ref.io.checkpoint import hub_key

    rows = _table(BOOK / "notation.md", "Weights")
    with torch.device("meta"):
        models = [Transformer(ModelConfig.from_preset("tiny", n_mtp_layers=1)),
                  Transformer(ModelConfig.from_preset("tiny", q_lora_rank=0))]
    names = {name for m in models for name in m.state_dict()}
    families = {_family(n) for n in names}
    table = {}
    for row in rows[1:]:
        ours, hub = _code(row[1]), _code(row[2])
        table[ours] = hub
        assert _family(ours) in families, f"notation.md: no parameter {ours!r} in the model"
        concrete = ours.replace("{i}", "3").replace("{e}", "5")
        expected = hub.replace("{i}", "3").replace("{e}", "5")
        assert hub_key(concrete, n_layers=61) == expected, f"notation.md: {ours} -> {hub}, hub_key says " \
                                                            f"{hub_key(concrete, n_layers=61)}"
    undocumented = sorted(families - {_family(n) for n in table})
    assert not undocumented, f"parameters missing from the weights table of notation.md: {undocumented}"


def test_equations_page_covers_every_numbered_architecture_equation():
    """Eqs. 1-11 (MLA), 12-16 (MoE), 17-20 (balance loss), 21-25 (MTP): one row each, with LaTeX, code and a test."""
    text = (BOOK / "equations.md").read_text(encoding="utf-8")
    rows = {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \|(.*)$", text, flags=re.M)}
    assert sorted(rows) == list(range(1, 26)), f"equation rows: {sorted(rows)}"
    for number, rest in rows.items():
        equation, code, tests = [c.strip() for c in rest.split("|")[:3]]
        assert equation.startswith("$") and CODE_REF.search(code) and TEST_REF.search(tests), \
            f"equations.md eq. {number} needs its LaTeX, a dsv3_ref object and a test: {rest[:80]}"


# ------------------------------------------------------------------ every test and object the pages cite exists
def _test_ids(path: Path) -> set[str]:
    """Node ids ('test_x', 'TestC::test_x') of the tests defined in a test file (empty if it does not exist)."""
    if not path.is_file():
        return set()
    ids = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            ids.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids |= {f"{node.name}::{f.name}" for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name.startswith("test")}
    return ids


def test_every_test_the_book_cites_exists():
    cited = {(page.name, file, test) for page in PAGES for file, test in TEST_REF.findall(page.read_text("utf-8"))}
    assert len({c[0] for c in cited}) >= 3, "the equations, mistakes and notation pages cite tests"
    missing = sorted(f"{page}: {file}::{test}" for page, file, test in cited if test not in _test_ids(ROOT / file))
    assert not missing, "the book cites tests that do not exist:\n" + "\n".join(missing)


def _resolve(ref: str) -> object:
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(ref)


def test_every_code_object_the_book_cites_exists():
    cited = {(page.name, ref) for page in PAGES for ref in CODE_REF.findall(page.read_text("utf-8"))}
    assert cited
    missing = []
    for page, ref in sorted(cited):
        try:
            _resolve(ref)
        except (ImportError, AttributeError):
            missing.append(f"{page}: {ref}")
    assert not missing, "the book cites code that does not exist:\n" + "\n".join(missing)


# ------------------------------------------------------------------ the built book
def _load_build_module():
    spec = importlib.util.spec_from_file_location("book_build", BOOK / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """Build the real book (pages + notebooks/) once into a temporary folder; fail with the reason if it cannot."""
    build = _load_build_module()
    try:
        return build.build(tmp_path_factory.mktemp("book"))
    except build.BuildError as exc:  # e.g. npm or the npm registry unavailable: a failure, never a skip
        pytest.fail(f"the book does not build: {exc}")


def _notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_every_page_and_notebook_has_its_html(html):
    expected = [html / f"{page.stem}.html" for page in PAGES]
    expected += [html / "notebooks" / p.relative_to(NOTEBOOKS).with_suffix(".html") for p in _notebooks()]
    missing = [str(p.relative_to(html)) for p in expected if not p.is_file()]
    assert not missing, f"pages missing from the built book: {missing}"
    assert (html / "index.html").is_file()


def test_notebooks_are_in_teaching_order(html):
    nav = (html / "intro.html").read_text(encoding="utf-8")
    top_level = [p for p in _notebooks() if p.parent == NOTEBOOKS]
    positions = [nav.find(f'href="notebooks/{p.stem}.html"') for p in top_level]
    assert all(pos >= 0 for pos in positions), "every notebook is linked from the landing page's navigation"
    assert positions == sorted(positions), "notebooks appear in file-name (NN_) order"


REMOTE = r"""(?:https?:)?//"""
REMOTE_TAG = re.compile(r"""<(script|link|img|iframe|source|video|audio|embed)\b[^>]*?\b(src|href)\s*=\s*["']?"""
                        rf"""{REMOTE}[^"'\s>]*""", flags=re.I)
INLINE_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", flags=re.I | re.S)
REMOTE_CSS = re.compile(rf"""(@import\s+["']{REMOTE}|url\(\s*["']?{REMOTE})""", flags=re.I)


def test_no_remote_scripts_stylesheets_or_resources(html):
    problems = []
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(html)
        problems += [f"{rel}: {m.group(0)[:120]}" for m in REMOTE_TAG.finditer(text)]
        for attrs, body in INLINE_SCRIPT.findall(text):  # e.g. a CDN URL that a script would load later
            if "src=" not in attrs and re.search(r"https?://", body):
                problems.append(f"{rel}: inline script with a URL: {body.strip()[:120]}")
        problems += [f"{rel}: {m.group(0)}" for m in REMOTE_CSS.finditer(text)]
    for css in sorted(html.rglob("*.css")):
        problems += [f"{css.relative_to(html)}: {m.group(0)}" for m in REMOTE_CSS.finditer(css.read_text("utf-8"))]
    assert not problems, "the book must read offline:\n" + "\n".join(problems)


MATHJAX_TAG = re.compile(r"""<script\b[^>]*\bsrc="([^"?]*_static/mathjax/tex-mml-chtml\.js)(?:\?[^"]*)?\"""")


def test_math_pages_load_the_local_mathjax(html):
    math_pages = [p for p in sorted(html.rglob("*.html")) if 'class="math' in p.read_text(encoding="utf-8")]
    names = {p.relative_to(html).as_posix() for p in math_pages}
    assert {"notation.html", "equations.html", "mistakes.html", "glossary.html"} <= names
    for page in math_pages:
        found = MATHJAX_TAG.findall(page.read_text(encoding="utf-8"))
        assert len(found) == 1, f"{page.relative_to(html)}: expected one local MathJax script tag, found {found}"
        assert (page.parent / found[0]).resolve().is_file(), f"{page.relative_to(html)}: {found[0]} is missing"
    fonts = html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file() and len(list(fonts.glob("*.woff"))) > 20
    assert (html / "_static" / "mathjax" / "input" / "tex" / "extensions" / "boldsymbol.js").is_file()


def test_no_visible_nbval_markers(html):
    """nbval's markers live in cell tags (nbval-ignore-output, ...), never as comments a reader sees."""
    shown = [p.relative_to(html).as_posix() for p in sorted(html.rglob("*.html")) if "NBVAL_" in p.read_text("utf-8")]
    assert not shown, f"pages that show an NBVAL comment: {shown}"


# ------------------------------------------------------------------ the built book in a browser
BROWSER_PAGES = ["intro.html", "notation.html", "equations.html", "glossary.html", "mistakes.html",
                 "notebooks/20_mla.html", "notebooks/50_fp8_formats_and_scaling.html", "notebooks/90_scale.html"]


@pytest.mark.skipif(browser.find_chromium() is None,
                    reason="no Chromium: install the Debian package `chromium` for the browser checks")
def test_pages_render_in_a_browser(html, tmp_path):
    """A headless Chromium loads each page (1280 x 1000) and finds no raw TeX, no image that did not load, no line
    cut off at the right, nothing sticking out of the column, and no sideways-scrolling box without a visible cue;
    the first screen of three pages is not blank."""
    problems = {}
    for page in BROWSER_PAGES:
        [report] = browser.probe(html / page, scope="article.bd-article")
        if browser.problems(report):
            problems[page] = browser.problems(report)
    assert not problems, "\n".join(f"{page}: {p}" for page, ps in problems.items() for p in ps[:10])
    for page in BROWSER_PAGES[1:3] + BROWSER_PAGES[-1:]:
        png = browser.screenshot((html / page).as_uri(), tmp_path / (page.replace("/", "_") + ".png"))
        assert browser.blank_fraction(png) < 0.97, f"{page}: the first screen is blank"
