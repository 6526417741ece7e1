"""The classroom material: the student edition (`classroom.editions`), the instructor guide's lesson plans and the
rubric (they add up and agree with the notebooks and the checkers), the lesson slides (`classroom.slides`: built
offline, rendered by a headless Chromium without blank slides or raw TeX), and the instructor edition (every
notebook-end checker passes with the solutions, the exercise notebooks are marked, the runtime headers agree with the
README's measurements).

The student edition is checked statically for every notebook (no solution cell, no line of a solution in it, an
answer stub before every solution); executing it is `make student`'s job (about 6 minutes), except for the exercise
notebooks, which are executed here (a few seconds) and must show "not implemented yet" for every exercise.
"""

from __future__ import annotations

import ast
import html as html_lib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from classroom import browser, editions, slides
from scripts import nbval_schedule  # the README's runtime table, as `make test` schedules by it

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GUIDE = ROOT / "docs" / "instructor_guide.md"
RUBRIC = ROOT / "docs" / "rubric.md"
ALL = editions.notebook_paths()
SLIDE = ".reveal .slides section.present:not(.stack)"  # the slide on screen (not its vertical stack)
needs_chromium = pytest.mark.skipif(browser.find_chromium() is None,
                                    reason="no Chromium: install the Debian package `chromium` for the browser checks")


def _nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _cell(kind: str, source: str, tags: list[str] | None = None, outputs: list | None = None) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": source}
    if kind == "code":
        cell.update(outputs=outputs or [], execution_count=1)
    return cell


# ------------------------------------------------------------------------------------------ the student edition
def test_student_notebook_drops_solutions_and_stale_outputs():
    out = [{"output_type": "stream", "name": "stdout", "text": "42\n"}]
    nb = {"metadata": {}, "nbformat": 4, "nbformat_minor": 5, "cells": [
        _cell("code", "x = 1", outputs=out),
        _cell("code", "answer = None  # your answer"),
        _cell("code", "answer = 6 * 7", ["solution"], outputs=out),
        _cell("markdown", "The answer is 42 because ...", ["solution"]),
        _cell("code", "check(answer)", outputs=[{"output_type": "stream", "name": "stdout", "text": "[PASS]\n"}]),
    ]}
    student = editions.student_notebook(nb)
    assert [_src(c) for c in student["cells"]] == ["x = 1", "answer = None  # your answer", "check(answer)"]
    assert student["cells"][0]["outputs"] == out  # before the first solution: the stored output is still right
    assert student["cells"][2]["outputs"] == [] and student["cells"][2]["execution_count"] is None
    assert len(nb["cells"]) == 5  # the instructor notebook is left alone
    assert editions.passing_checks(nb) == ["cell 4: [PASS]"] and editions.passing_checks(student) == []
    nb["metadata"]["dsv3_ref"] = {"edition": "instructor"}
    assert editions.student_notebook(nb) is None
    nb["metadata"]["dsv3_ref"] = {"edition": "teacher"}
    with pytest.raises(editions.EditionError, match="allowed: 'instructor'"):
        editions.student_notebook(nb)


def _solution_lines(nb: dict, others: str) -> set[str]:
    """Lines of a notebook's solution cells that say something (not blank, not a comment, not a bare name) and that
    no kept cell shares (a def line and docstring repeat the stub's on purpose)."""
    lines = set()
    for cell in editions.solution_cells(nb):
        for line in _src(cell).splitlines():
            s = line.strip()
            if len(s) > 12 and not s.startswith("#") and s not in others:
                lines.add(s)
    return lines


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """The student edition, not executed (the structural build of `make student`)."""
    out = tmp_path_factory.mktemp("student") / "notebooks"
    editions.build_notebooks(out, run=False, log=lambda *a: None)
    return out


def test_student_edition_holds_no_solution(student_dir):
    written = sorted(p.relative_to(student_dir) for p in student_dir.rglob("*.ipynb"))
    expected = sorted(p.relative_to(NOTEBOOKS) for p in ALL if not editions.is_instructor_only(_nb(p)))
    assert written == expected and len(written) < len(ALL), "the solutions notebook is left out, nothing else"
    for path in ALL:
        nb = _nb(path)
        if editions.is_instructor_only(nb):
            continue
        student = _nb(student_dir / path.relative_to(NOTEBOOKS))
        assert not any(editions.is_solution(c) for c in student["cells"])
        kept = "\n".join(_src(c) for c in student["cells"])
        text = json.dumps(student)  # sources and outputs
        leaked = sorted(line for line in _solution_lines(nb, kept) if json.dumps(line)[1:-1] in text)
        assert not leaked, f"{path.name}: solution lines in the student edition: {leaked[:5]}"


@pytest.mark.no_numerics
def test_student_book_has_no_solutions(student_dir, tmp_path):
    """The book builds from the student edition: a page per student notebook, no solutions page, no solution line."""
    from book import build as book_build

    html = book_build.build(tmp_path / "book", student_dir)
    pages = {p.relative_to(html / "notebooks").with_suffix(".ipynb") for p in (html / "notebooks").rglob("*.html")}
    assert pages == {p.relative_to(student_dir) for p in student_dir.rglob("*.ipynb")}
    text = "\n".join(p.read_text(encoding="utf-8") for p in (html / "notebooks").rglob("*.html"))
    assert "02_solutions.html" not in text
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", text))  # what the pages show (highlighted code as plain text)
    for path in ALL:
        nb = _nb(path)
        if editions.is_instructor_only(nb):
            continue
        kept = "\n".join(_src(c) for c in editions.student_notebook(nb)["cells"])
        leaked = [line for line in _solution_lines(nb, kept) if line in text]
        assert not leaked, f"{path.name}: solution lines in the student book: {leaked[:3]}"


@pytest.fixture(scope="module")
def student_exercises(tmp_path_factory) -> Path:
    """The student edition of the exercise notebooks, executed (a few seconds)."""
    out = tmp_path_factory.mktemp("student-exercises")
    editions.build_notebooks(out, NOTEBOOKS / "exercises", run=True, log=lambda *a: None)
    return out


def test_student_exercise_notebook_says_not_implemented(student_exercises):
    """Executed without the solutions, every checker of the student notebook reports its exercise as not
    implemented yet (and nothing as passed), and nbval re-runs it to the same outputs: nbval covers the student
    edition too."""
    from dsv3_ref.teaching import exercises as ex

    path = student_exercises / "01_student.ipynb"
    nb = _nb(path)
    assert not editions.stored_errors(nb)
    text = "\n".join("".join(o.get("text", "")) or "".join(o.get("data", {}).get("text/plain", ""))
                     for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    assert not editions.passing_checks(nb), "a stub passed its checker"
    for name, exercise in ex.EXERCISES.items():
        if exercise.notebook == "70_sparse_attention":  # solved in its own notebook, not in the exercise notebook
            continue
        assert re.search(rf"{name}\b.*not implemented", text), f"{name}: no 'not implemented' report"
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval", str(path), "--nbval-current-env",
                             "--nbval-sanitize-with", str(NOTEBOOKS / "sanitize.cfg"), "-p", "no:cacheprovider",
                             "-q", "--rootdir", str(student_exercises)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_notebooks_read_only_the_repository_files_the_edition_ships():
    """A notebook may read a repository file as Path("..") / ... only if the student edition copies it (REPO_FILES);
    otherwise the hand-out would fail where students unpack it."""
    read = set()
    for path in ALL:
        for cell in _nb(path)["cells"]:
            for parts in re.findall(r'Path\("\.\."\)((?:\s*/\s*"[^"]+")+)', _src(cell)):
                read.add("/".join(re.findall(r'"([^"]+)"', parts)))
    missing = sorted(read - set(editions.REPO_FILES))
    assert not missing, f"read by the notebooks, not shipped with the student edition: {missing}"
    assert all((ROOT / rel).is_file() for rel in editions.REPO_FILES)


def _bound_names(source: str) -> set[str]:
    """Top-level names a code cell defines (assignments, defs, imports)."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _read_names(source: str) -> set[str]:
    """Every name a code cell reads, also inside its functions and lambdas."""
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@pytest.mark.parametrize("path", [p for p in ALL if not editions.is_instructor_only(_nb(p))],
                         ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_every_solution_has_a_stub_that_defines_its_names(path):
    """Whatever a solution cell defines and a later cell reads (the checker), an earlier kept cell defines too (the
    stub), so the student edition's checker finds every name and reports "not implemented yet", not a NameError."""
    cells = [c for c in _nb(path)["cells"] if c["cell_type"] == "code"]
    defined: set[str] = set()
    for i, cell in enumerate(cells):
        if editions.is_solution(cell):
            later = set().union(*(_read_names(_src(c)) for c in cells[i + 1:] if not editions.is_solution(c)))
            missing = (_bound_names(_src(cell)) & later) - defined
            assert not missing, f"{path.name}: the solution defines {sorted(missing)}, read later, that no stub defines"
        else:
            defined |= _bound_names(_src(cell))


# ------------------------------------------------------------------------------------------ the lesson plans
def _tables_under(text: str, heading: str) -> dict[str, list[list[str]]]:
    """{'### title': rows} for every '### ' section below the '## heading' section of a markdown text."""
    part = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S).group(1)
    out = {}
    for match in re.finditer(r"^### (.+?)$(.*?)(?=^### |\Z)", part, flags=re.M | re.S):
        rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in match.group(2).splitlines()
                if ln.startswith("|")]
        out[match.group(1).strip()] = rows[2:]
    return out


def _minutes_per_level() -> dict[int, int]:
    """Exercise number -> the upper end of the guide's time estimate for its level."""
    text = GUIDE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (beginner|intermediate|advanced) \| ([\d, ]+) \| (\d+)-(\d+) \|", text, flags=re.M)
    assert len(rows) == 3, "the guide's table of levels and minutes"
    return {int(n): int(hi) for _level, numbers, _lo, hi in rows for n in numbers.split(",")}


def _lessons() -> dict[str, list[list[str]]]:
    lessons = _tables_under(GUIDE.read_text(encoding="utf-8"), "Lesson plans")
    assert list(lessons) == [lesson["title"] for lesson in slides.load_lessons()], "the guide's lessons = the decks"
    return lessons


def test_every_lesson_fills_90_minutes():
    for title, rows in _lessons().items():
        spans = [tuple(int(x) for x in row[0].split("-")) for row in rows]
        assert spans[0][0] == 0 and spans[-1][1] == 90, f"{title}: {spans}"
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), f"{title}: gaps or overlaps {spans}"
        assert all(end > start for start, end in spans), f"{title}: {spans}"


def test_exercise_slots_fit_their_estimates():
    minutes = _minutes_per_level()
    assert sorted(minutes) == list(range(1, 8))
    in_class = set()
    for title, rows in _lessons().items():
        for span, activity in rows:
            found = re.match(r"Exercises? ([\d, and]+)", activity)
            if found:
                numbers = [int(n) for n in re.findall(r"\d+", found.group(1))]
                start, end = (int(x) for x in span.split("-"))
                need = sum(minutes[n] for n in numbers)
                assert end - start >= need, f"{title}: exercises {numbers} get {end - start} min, need {need}"
                in_class |= set(numbers)
    homework = set(int(n) for n in re.findall(r"Homework: exercises? (\d)", GUIDE.read_text(encoding="utf-8")))
    assert in_class | homework == set(range(1, 8)), "every exercise is done in class or as homework"


def test_lessons_show_the_notebooks_the_slides_show():
    for (title, rows), lesson in zip(_lessons().items(), slides.load_lessons(), strict=True):
        named = {n for _span, activity in rows for n in re.findall(r"`(\d\d_\w+)`", activity.split(":")[0])}
        assert named == {p["notebook"] for p in lesson["parts"]}, title


def test_guide_has_no_fp8_against_bf16_claim():
    assert "against BF16 loss" not in GUIDE.read_text(encoding="utf-8")  # notebook 55 compares with FP32


# ------------------------------------------------------------------------------------------ the rubric
def _rubric_table(heading: str) -> list[list[str]]:
    text = RUBRIC.read_text(encoding="utf-8")
    part = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S).group(1)
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in part.splitlines() if ln.startswith("|")]
    return rows[2:]


def _exercise_notebook_exercises() -> list:
    """The exercises of notebooks/exercises (the V3 chapters'); 70_sparse_attention's are solved in that notebook."""
    from dsv3_ref.teaching import exercises as ex

    return [e for e in ex.EXERCISES.values() if e.notebook != "70_sparse_attention"]


def test_rubric_covers_every_autograded_exercise():

    rows = _rubric_table("Autograded exercises (100 points)")
    assert sum(int(r[4]) for r in rows) == 100
    autograded = _exercise_notebook_exercises()
    assert [r[2].strip("`") for r in rows] == [e.function for e in autograded]
    assert [r[3] for r in rows] == [e.level for e in autograded]
    minutes = _minutes_per_level()
    levels = {n: lvl for n, lvl in enumerate((e.level for e in autograded), start=1)}
    by_level: dict[str, set[int]] = {}
    for n, lvl in levels.items():
        by_level.setdefault(lvl, set()).add(minutes[n])
    assert all(len(v) == 1 for v in by_level.values()), "the guide's estimate is per level"


def _exercise_count(path: Path) -> int:
    """The number of items in the numbered list of a notebook's '## Exercises' section."""
    for cell in _nb(path)["cells"]:
        src = _src(cell)
        if cell["cell_type"] == "markdown" and re.search(r"^## Exercises", src, flags=re.M):
            part = src[re.search(r"^## Exercises", src, flags=re.M).start():]
            return len(re.findall(r"^\d+\. ", part, flags=re.M))
    return 0


def test_rubric_covers_every_notebook_exercise():
    rows = _rubric_table("Notebook exercises (homework, 2 points each)")
    listed = {r[0].strip("`"): (int(r[1]), int(r[2])) for r in rows}
    teaching = {p.stem: _exercise_count(p) for p in ALL if p.parent == NOTEBOOKS}
    assert {name: n for name, (n, _) in listed.items()} == teaching
    assert all(points == 2 * n for n, points in listed.values())


def test_setup_sheet_matches_the_pins_and_the_wheel():
    """docs/setup.md installs the torch of constraints.txt and the wheel `make student` puts into the hand-out."""
    import tomllib

    sheet = (ROOT / "docs" / "setup.md").read_text(encoding="utf-8")
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(encoding="utf-8"), flags=re.M).group(1)
    assert set(re.findall(r"torch==(\S+)", sheet)) == {pin}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert set(re.findall(r"dsv3_ref-(\S+?)-py3-none-any\.whl", sheet)) == {version}
    assert "--index-url https://download.pytorch.org/whl/cpu" in sheet  # Linux: not PyPI's multi-GB CUDA build


# ------------------------------------------------------------------------------------------ slides
def test_lessons_cover_every_teaching_notebook_once():
    """Each teaching notebook is in a lesson's slides, or listed in lessons.yml as self-study."""
    shown = [p["notebook"] for lesson in slides.load_lessons() for p in lesson["parts"]]
    self_study = set(slides.self_study())
    teaching = {p.stem for p in ALL if p.parent == NOTEBOOKS}
    assert set(shown) | (self_study & teaching) == teaching and not set(shown) & self_study


def test_deck_notebook_sections_and_exercises():
    lesson = {"title": "t", "parts": [{"notebook": "20_mla", "sections": [8, 10]}]}
    deck = slides.deck_notebook(lesson)
    markdown = [c for c in deck["cells"] if c["cell_type"] == "markdown"]
    headings = [re.match(r"##\s+(\d+)\.", _src(c)) for c in markdown]
    assert all(c["metadata"]["slideshow"]["slide_type"] == "slide"
               for c, h in zip(markdown, headings, strict=True) if h)
    assert [int(h.group(1)) for h in headings if h] == [8, 9, 10]
    assert all(c["metadata"]["slideshow"]["slide_type"] in ("slide", "subslide") for c in deck["cells"])
    whole = slides.deck_notebook({"title": "t", "parts": [{"notebook": "00_tour", "sections": None}]})
    after = [c for c in whole["cells"][next(i for i, c in enumerate(whole["cells"])
                                            if slides.EXERCISES.search(_src(c))):]]
    assert after and all(c["cell_type"] == "markdown" for c in after), "the exercises as questions only"
    with pytest.raises(slides.SlidesError, match="sections 11-12 requested"):
        slides.deck_notebook({"title": "t", "parts": [{"notebook": "20_mla", "sections": [11, 12]}]})


@pytest.fixture(scope="module")
def decks(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("slides")
    try:
        return slides.build(out, log=lambda *a: None)
    except slides.SlidesError as exc:  # e.g. npm or the npm registry unavailable: a failure, never a skip
        pytest.fail(f"the slides do not build: {exc}")


@pytest.mark.no_numerics
def test_slides_are_offline(decks):
    remote = re.compile(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", flags=re.I)
    for deck in decks:
        text = deck.read_text(encoding="utf-8")
        assert not remote.search(text), f"{deck.name}: {remote.search(text).group(0)}"
        assert 'src="reveal.js/dist/reveal.js"' in text and 'src="mathjax/tex-mml-chtml.js"' in text
    assert (decks[0].parent / "reveal.js" / "dist" / "reveal.js").is_file()
    assert (decks[0].parent / "mathjax" / "tex-mml-chtml.js").is_file()


@pytest.mark.no_numerics
@needs_chromium
def test_the_browser_probe_catches_what_it_should(tmp_path):
    """A page with every defect the probe looks for, and a clean one: the checks can fail."""
    bad = tmp_path / "bad.html"
    bad.write_text("""<!DOCTYPE html><html><body style="margin:0"><article style="width:400px">
      <p>Unrendered math: $\\frac{a}{b}$ and \\sum_i x_i.</p>
      <div style="width:200px; overflow:hidden; white-space:nowrap">a line far too long for its box, cut off</div>
      <table><tr><td style="white-space:nowrap">a table wider than the 400 px column loses its last column</td>
      <td>lost</td></tr></table>
      <img src="missing.png">
      </article></body></html>""", encoding="utf-8")
    [report] = browser.probe(bad, scope="article")
    found = browser.problems(report)
    assert any("raw TeX" in p and "frac" in p for p in found), found
    assert any(p.startswith("clipped: div") for p in found), found
    assert any(p.startswith("overflows the column") for p in found), found
    assert any("missing.png" in p for p in found), found
    good = tmp_path / "good.html"
    good.write_text("<html><body><article><p>Plain text, no defect at all, just a sentence or two.</p>"
                    "<pre>$ not math inside code \\frac</pre></article></body></html>", encoding="utf-8")
    [report] = browser.probe(good, scope="article")
    assert browser.problems(report) == []
    empty = tmp_path / "empty.html"
    empty.write_text("<html><body></body></html>", encoding="utf-8")
    assert browser.blank_fraction(browser.screenshot(empty.as_uri(), tmp_path / "blank.png")) == 1.0


@pytest.mark.no_numerics
@needs_chromium
def test_first_slides_of_every_deck_render(decks, tmp_path):
    """The first three slides of each deck, in a headless Chromium: not blank, no raw TeX, nothing cut off or lost."""
    for deck in decks:
        reports = browser.probe(deck, scope=SLIDE, slides=3)
        assert len(reports) == 3
        for report in reports:
            assert not browser.problems(report), f"{deck.name} slide {report['slide']}: {browser.problems(report)}"
        png = browser.screenshot(deck.as_uri() + "#/1", tmp_path / f"{deck.stem}.png")
        assert browser.blank_fraction(png) < 0.99, f"{deck.name}: slide 1 is blank"


# ------------------------------------------------------------------------------------------ the instructor edition
TEACHING = [p for p in ALL if p.parent == NOTEBOOKS]


def _verdicts(nb: dict) -> list[str]:
    """Every checker verdict ("[PASS] ...", "[FAIL] ...", "[TODO] ...") in a notebook's stored outputs."""
    lines = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            text = o.get("text") or o.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            lines += [ln.strip() for ln in text.splitlines() if re.match(r"\s*\[(PASS|FAIL|TODO)\]", ln)]
    return lines


@pytest.mark.parametrize("path", TEACHING, ids=lambda p: p.stem)
def test_instructor_checker_passes_every_exercise(path):
    """The stored outputs of a teaching notebook's checkers: one pass per exercise of its list and nothing else, so
    every solution passes its checker (nbval re-runs it in `make test`). A notebook-end checker cell
    (`dsv3_ref.teaching.answers`) prints "[PASS] exercise k: correct"; a notebook whose exercises are checked by
    `dsv3_ref.teaching.exercises` shows one "[PASS] name: ..." per exercise."""
    nb = _nb(path)
    assert any(editions.is_solution(c) for c in nb["cells"]), f"{path.name}: no cell tagged solution"
    lines, n = _verdicts(nb), _exercise_count(path)
    if any(c["cell_type"] == "code" and _src(c).lstrip().startswith("# checker") for c in nb["cells"]):
        assert lines == [f"[PASS] exercise {k}: correct" for k in range(1, n + 1)], f"{path.name}: {lines}"
    else:
        assert n and len(lines) == n and all(ln.startswith("[PASS]") for ln in lines), f"{path.name}: {lines}"


def test_the_exercise_notebooks_are_marked():
    student, solutions = NOTEBOOKS / "exercises" / "01_student.ipynb", NOTEBOOKS / "exercises" / "02_solutions.ipynb"
    assert editions.is_instructor_only(_nb(solutions)) and not editions.is_instructor_only(_nb(student))
    plugged = "\n".join(_src(c) for c in _nb(student)["cells"] if editions.is_solution(c))

    missing = [e.function for e in _exercise_notebook_exercises() if f'solutions["{e.function}"]' not in plugged]
    assert not missing, f"stubs not followed by a solution cell that plugs them in: {missing}"


def _runtime_seconds(phrase: str) -> tuple[float, float]:
    """The range a notebook header's runtime phrase allows, in seconds ("a few seconds", "about 30 seconds",
    "1 to 1.5 minutes", "about two minutes", ...)."""
    words = {"one": 1, "two": 2, "three": 3, "a few": 5}
    phrase = phrase.lower()
    for w, n in words.items():
        phrase = phrase.replace(w, str(n))
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", phrase)]
    unit = 60 if re.search(r"\bminutes?\b", phrase) else 1
    lo, hi = (min(numbers), max(numbers)) if numbers else (1, 10)
    return lo * unit / 2.5, hi * unit * 2.5


def test_notebook_headers_state_the_measured_runtime():
    """Each notebook's **Runtime** line agrees (within a factor 2.5) with the README's measured runtime."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    measured = {m[0]: float(m[1]) for m in nbval_schedule.README_RUNTIME.findall(readme)}
    assert measured, "the README's notebook table with runtimes"
    for path in TEACHING:
        head = _src(_nb(path)["cells"][0])
        phrase = re.search(r"\*\*Runtime\*\*:\s*(.*?)(?:[.;,(]\s|$)", head, flags=re.M).group(1)
        phrase = re.split(r" (?:on|of) ", phrase)[0]  # "about 10 seconds", not the cores it ran on
        lo, hi = _runtime_seconds(phrase)
        assert lo <= measured[path.stem] <= hi, f"{path.stem}: header says {phrase!r}, README measured " \
                                                f"{measured[path.stem]:g} s"
