"""Lesson slides, built offline from the notebooks: `python -m classroom.slides` (what `make slides` runs).

One reveal.js deck per lesson of classroom/lessons.yml, written to build/slides/lesson<N>.html (plus index.html):

1. deck     the lesson's notebooks (or their numbered sections) in the student edition (no solution cells, see
            `classroom.editions`), with their stored outputs; the exercises appear as their questions (the answer
            and checker cells are left to the notebooks). A '#'/'##' heading starts a new slide (a markdown cell is
            cut before each such heading), every other cell a vertical sub-slide. Widget state is dropped (a widget
            needs a live kernel; the notebooks draw a static figure beside each one).
2. assets   reveal.js 4 from the npm registry (`npm pack reveal.js@4`, cached in classroom/.cache) and the book's
            MathJax 3 (`book.build.install_mathjax`) are copied next to the decks, so a deck opens without network.
3. html     nbconvert's SlidesExporter with classroom/templates/dsv3_slides, a reveal template without the CDN
            scripts (jQuery, require.js, mermaid) and with MathJax 3 instead of MathJax 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

from book.build import timed
from classroom.editions import NOTEBOOKS, ROOT, student_notebook

LESSONS = Path(__file__).resolve().parent / "lessons.yml"
TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "dsv3_slides"
DEFAULT_OUT = ROOT / "build" / "slides"
CACHE = Path(__file__).resolve().parent / ".cache"  # gitignored, kept by `make clean` (like book/.cache)
REVEAL_SPEC = "reveal.js@4"
REVEAL_PARTS = ("dist", "plugin/notes", "LICENSE")
SECTION = re.compile(r"^##\s+(\d+)\.", flags=re.M)
EXERCISES = re.compile(r"^#+\s+Exercises\b", flags=re.M)


class SlidesError(RuntimeError):
    """The slides cannot be built; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ lessons and decks
def load_lessons(path: Path = LESSONS) -> list[dict]:
    """The lessons of lessons.yml, each {"title": str, "parts": [{"notebook": name, "sections": [a, b] | None}]}."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    lessons = data.get("lessons") if isinstance(data, dict) else None
    if not lessons:
        raise SlidesError(f"{path}: expected a list under 'lessons'")
    for i, lesson in enumerate(lessons, start=1):
        if not isinstance(lesson.get("title"), str) or not lesson.get("parts"):
            raise SlidesError(f"{path}: lesson {i} needs a 'title' and a list of 'parts'")
        for part in lesson["parts"]:
            sections = part.setdefault("sections", None)
            if sections is not None and not (isinstance(sections, list) and len(sections) == 2
                                              and all(isinstance(s, int) for s in sections)):
                raise SlidesError(f"{path}: lesson {i}, {part.get('notebook')}: sections must be [first, last], "
                                  f"got {sections!r}")
    return lessons


def self_study(path: Path = LESSONS) -> list[str]:
    """The notebooks lessons.yml lists as self-study: in no lesson and in no deck."""
    return list(yaml.safe_load(path.read_text(encoding="utf-8")).get("self_study") or [])


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _section_of(cell: dict) -> int | None:
    found = SECTION.search(_source(cell)) if cell["cell_type"] == "markdown" else None
    return int(found.group(1)) if found else None


def part_cells(nb: dict, sections: list[int] | None, name: str) -> list[dict]:
    """The cells of one lesson part: the notebook, or its '## N.' sections first..last (then the summary and
    exercises follow only when the range reaches the last numbered section)."""
    cells = nb["cells"]
    if sections is None:
        return list(cells)
    first, last = sections
    numbers = [_section_of(c) for c in cells]
    present = [n for n in numbers if n is not None]
    if first not in present or last not in present:
        raise SlidesError(f"{name}: sections {first}-{last} requested, the notebook has {present}")
    start = numbers.index(first)
    after = [i for i, n in enumerate(numbers) if n is not None and n > last]
    end = after[0] if after else len(cells)
    return ([cells[0]] if first == min(present) else []) + cells[start:end]


def _split_at_headings(cell: dict) -> list[dict]:
    """A markdown cell cut before each '#' or '##' heading it holds, so that every such heading opens a slide."""
    if cell["cell_type"] != "markdown":
        return [cell]
    pieces = [p for p in re.split(r"(?m)^(?=#{1,2}\s)", _source(cell)) if p.strip()]
    return [{**cell, "source": p.rstrip() + "\n"} for p in pieces] or [cell]


def _slide_type(cell: dict) -> str:
    if cell["cell_type"] == "markdown" and re.match(r"#{1,2}\s", _source(cell).lstrip()):
        return "slide"
    return "subslide"


def deck_notebook(lesson: dict, notebooks_dir: Path = NOTEBOOKS) -> dict:
    """One notebook holding a lesson's slides: a title slide, then each part's cells with slide metadata."""
    parts = "\n".join(f"- `{p['notebook']}`" + (f", sections {p['sections'][0]}-{p['sections'][1]}"
                                                   if p["sections"] else "") for p in lesson["parts"])
    title = {"cell_type": "markdown", "metadata": {"slideshow": {"slide_type": "slide"}},
             "source": f"# {lesson['title']}\n\n{parts}"}
    cells, nb_meta = [title], None
    for part in lesson["parts"]:
        path = notebooks_dir / f"{part['notebook']}.ipynb"
        if not path.is_file():
            raise SlidesError(f"lessons.yml names {part['notebook']!r}, but {path} does not exist")
        nb = student_notebook(json.loads(path.read_text(encoding="utf-8")))
        if nb is None:
            raise SlidesError(f"{path.name} is instructor-only: it has no place in the slides")
        nb_meta = nb_meta or nb["metadata"]
        in_exercises = False
        for cell in part_cells(nb, part["sections"], path.name):
            if cell["cell_type"] == "markdown" and EXERCISES.search(_source(cell)):
                in_exercises = True
            elif in_exercises and cell["cell_type"] == "code":
                continue  # the answer and checker cells belong to the notebook, not to the projector
            for piece in _split_at_headings(copy.deepcopy(cell)):
                piece["metadata"] = {"slideshow": {"slide_type": _slide_type(piece)}}
                cells.append(piece)
    for n, cell in enumerate(cells):
        cell["id"] = f"slide-{n}"  # cells cut at headings would repeat their notebook's id
    metadata = {k: v for k, v in (nb_meta or {}).items() if k != "widgets"}
    metadata["title"] = lesson["title"]
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


# ------------------------------------------------------------------------------------------ offline assets
def reveal_package(cache: Path = CACHE) -> Path:
    """The unpacked npm package reveal.js@4 (its `package/` folder), fetched with `npm pack` once and cached."""
    tarballs = sorted(cache.glob("reveal.js-4.*.tgz"), key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name)))
    if not tarballs:
        npm = shutil.which("npm")
        if npm is None:
            raise SlidesError(f"npm not found. The slides serve reveal.js locally, from the npm registry's package "
                              f"{REVEAL_SPEC} (fetched once with `npm pack` into {cache}). Install Node.js and npm, "
                              f"or put a reveal.js-4.x.y.tgz from the npm registry into {cache}.")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            result = subprocess.run([npm, "pack", REVEAL_SPEC, "--pack-destination", tmp], capture_output=True,
                                    text=True)
            packed = list(Path(tmp).glob("reveal.js-4.*.tgz"))
            if result.returncode != 0 or len(packed) != 1:
                raise SlidesError(f"`npm pack {REVEAL_SPEC}` failed (exit code {result.returncode}); the slides need "
                                  f"the npm registry once to fetch reveal.js into {cache}.\n{result.stderr.strip()}")
            tarballs = [packed[0].replace(cache / packed[0].name)]
    tgz = tarballs[-1]
    unpacked = cache / tgz.name.removesuffix(".tgz")
    if not unpacked.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        tmp.rename(unpacked)
    return unpacked / "package"


def install_assets(out: Path) -> dict[str, str]:
    """Copy reveal.js (dist, notes plugin) and MathJax 3 into out/; returns their versions."""
    from book import build as book_build

    package = reveal_package()
    for part in REVEAL_PARTS:
        src, dst = package / part, out / "reveal.js" / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    try:
        mathjax = book_build.install_mathjax(out)
    except book_build.BuildError as exc:
        raise SlidesError(str(exc)) from exc
    reveal = json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]
    return {"reveal.js": reveal, "mathjax": mathjax}


# ------------------------------------------------------------------------------------------ html
def export(nb: dict) -> str:
    """The deck's HTML (nbconvert SlidesExporter, the dsv3_slides template, local asset URLs)."""
    import nbformat
    from nbconvert import SlidesExporter

    exporter = SlidesExporter(extra_template_basedirs=[str(TEMPLATES)], template_name=TEMPLATE,
                              reveal_url_prefix="reveal.js", reveal_scroll=True, reveal_transition="none",
                              reveal_number="c/t", mathjax_url="mathjax/tex-mml-chtml.js",
                              exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4))  # joins list sources
    return body


def build(out: Path = DEFAULT_OUT, notebooks_dir: Path = NOTEBOOKS, lessons_file: Path = LESSONS,
          log=print) -> list[Path]:
    """Every lesson deck plus index.html into `out` (emptied first); returns the decks' paths."""
    lessons = load_lessons(lessons_file)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    versions = install_assets(out)
    log(f"reveal.js {versions['reveal.js']} and MathJax {versions['mathjax']} from the npm registry (cached)")
    decks, links = [], []
    for i, lesson in enumerate(lessons, start=1):
        path = out / f"lesson{i}.html"
        path.write_text(export(deck_notebook(lesson, notebooks_dir)), encoding="utf-8")
        decks.append(path)
        links.append(f'<li><a href="{path.name}">{lesson["title"]}</a></li>')
        log(f"  {path.name}: {lesson['title']} ({path.stat().st_size / 1e6:.1f} MB)")
    (out / "index.html").write_text("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                                    "<title>dsv3_ref: lesson slides</title></head><body><h1>Lesson slides</h1><ul>"
                                    + "".join(links) + "</ul></body></html>\n", encoding="utf-8")
    return decks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m classroom.slides", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: build/slides)")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="notebook folder (default: notebooks/)")
    args = parser.parse_args(argv)

    def build_it() -> Path:
        build(args.out.resolve(), args.notebooks.resolve())
        return args.out / "index.html"

    return timed("slides", build_it, SlidesError)


if __name__ == "__main__":
    sys.exit(main())
