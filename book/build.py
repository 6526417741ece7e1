"""Build the book offline: `python -m book.build` from the repository root (what `make book` runs).

Sources: the pages in book/ (MyST markdown), book/_config.yml, book/_toc.yml and the notebooks in notebooks/, which
are stored executed (for nbval) and are not re-executed here. Nothing generated is written into book/ itself except
the MathJax download cache book/.cache and the build folder book/_build (both gitignored):

1. stage    copy the pages and the notebooks into _build/source; fill the toc's "Notebooks" part with every
            notebooks/NN_name.ipynb in teaching order (file-name order), with one more part per sub-folder of
            notebooks/; write the notebook map that the landing page includes (_generated/notebook_map.md).
2. MathJax  `npm pack mathjax@3` into book/.cache once (reused after), then copy es5/tex-mml-chtml.js, its woff-v2
            fonts and the TeX extensions it autoloads into the staged static folder assets/mathjax/ (book/assets/
            holds the book's own CSS). The folder is not named `_static`: jupyter-book adds a script tag for every
            .js file it finds in a `_static` folder.
3. build    `jupyter-book build` of the stage with every warning an error (-W --keep-going), all pages re-read.

Output: book/_build/html (index.html redirects to the landing page).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
NOTEBOOKS = ROOT / "notebooks"
CACHE = BOOK / ".cache"
MATHJAX_SPEC = "mathjax@3"
STATIC_DIR = "assets"  # html_static_path in _config.yml (book.css; MathJax added at build time)
# what the page needs from the package's es5/ folder: the combined component, its fonts, the autoloaded TeX macros
MATHJAX_PARTS = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")
NOTEBOOK_NAME = re.compile(r"^\d{2}_[A-Za-z0-9_-]+\.ipynb$")
NOTEBOOKS_PART = "Notebooks"


class BuildError(RuntimeError):
    """The book cannot be built; the message says why and what to do."""


def find_notebooks(notebooks_dir: Path = NOTEBOOKS) -> dict[str, list[Path]]:
    """Non-empty toc parts, notebooks in teaching order: {"Notebooks": top level, "<Sub folder>": notebooks/<sub>/}.

    Raises BuildError for a notebook not named NN_name.ipynb (the number gives the teaching order)."""
    parts: dict[str, list[Path]] = {NOTEBOOKS_PART: []}
    for path in sorted(notebooks_dir.rglob("*.ipynb")):
        rel = path.relative_to(notebooks_dir)
        if ".ipynb_checkpoints" in rel.parts:
            continue
        if len(rel.parts) > 2:
            raise BuildError(f"{path}: notebooks may sit in notebooks/ or one sub-folder of it, not deeper")
        if not NOTEBOOK_NAME.match(path.name):
            raise BuildError(f"{path}: notebook names must look like NN_name.ipynb (two digits give the teaching "
                             "order; then letters, digits, '_' or '-')")
        caption = NOTEBOOKS_PART if len(rel.parts) == 1 else rel.parts[0].replace("_", " ").capitalize()
        parts.setdefault(caption, []).append(path)
    return {caption: paths for caption, paths in parts.items() if paths}


def check_title(path: Path) -> None:
    """The notebook's first markdown cell must open with a '# Title' heading: it is the page title in the book."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first_md = next((c for c in cells if c["cell_type"] == "markdown"), None)
    if first_md is not None:
        source = first_md["source"]
        lines = ("".join(source) if isinstance(source, list) else source).splitlines()
        heading = next((ln for ln in lines if ln.strip()), "")
        if heading.startswith("# ") and heading[2:].strip():
            return
    raise BuildError(f"{path}: the first markdown cell must open with a '# Title' heading (the book's page title)")


def _toc(parts: dict[str, list[Path]], notebooks_dir: Path) -> dict:
    """book/_toc.yml with its Notebooks part filled and one part per notebooks/ sub-folder inserted after it."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    captions = [p.get("caption") for p in toc["parts"]]
    if captions.count(NOTEBOOKS_PART) != 1:
        raise BuildError(f"book/_toc.yml needs exactly one part with caption {NOTEBOOKS_PART!r}, has {captions}")
    at = captions.index(NOTEBOOKS_PART)
    new_parts = [{"caption": caption, "chapters": [{"file": _docname(p, notebooks_dir)} for p in paths]}
                 for caption, paths in parts.items()]
    toc["parts"][at:at + 1] = new_parts
    return toc


def _docname(path: Path, notebooks_dir: Path) -> str:
    return "notebooks/" + path.relative_to(notebooks_dir).with_suffix("").as_posix()


def _notebook_map(parts: dict[str, list[Path]], notebooks_dir: Path) -> str:
    """Markdown tables (one per part) listing every notebook with its page link; included by intro.md."""
    if not parts:
        return "*No notebook yet: notebooks/NN_name.ipynb files appear here when they exist.*\n"
    out = []
    for caption, paths in parts.items():
        if len(parts) > 1:
            out.append(f"**{caption}**\n")
        out += ["| # | Notebook | File |", "|---|---|---|"]
        for path in paths:
            docname = _docname(path, notebooks_dir)
            out.append(f"| {path.name[:2]} | {{doc}}`/{docname}` | `{docname}.ipynb` |")
        out.append("")
    return "\n".join(out)


def stage(stage_dir: Path, notebooks_dir: Path = NOTEBOOKS) -> None:
    """Write the complete jupyter-book source tree into `stage_dir` (emptied first)."""
    parts = find_notebooks(notebooks_dir)
    for paths in parts.values():
        for path in paths:
            check_title(path)  # fail early, with the file name, on an untitled notebook
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for page in sorted(BOOK.glob("*.md")) + [BOOK / "_config.yml"]:
        shutil.copy2(page, stage_dir / page.name)
    shutil.copytree(BOOK / STATIC_DIR, stage_dir / STATIC_DIR)  # book.css; MathJax joins it later
    for paths in parts.values():
        for path in paths:
            dest = stage_dir / "notebooks" / path.relative_to(notebooks_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    toc = _toc(parts, notebooks_dir)
    (stage_dir / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    (stage_dir / "_generated").mkdir()
    (stage_dir / "_generated" / "notebook_map.md").write_text(_notebook_map(parts, notebooks_dir), encoding="utf-8")
    docnames = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    missing = [d for d in docnames if not any((stage_dir / f"{d}{ext}").is_file() for ext in (".md", ".ipynb"))]
    if missing:
        raise BuildError(f"book/_toc.yml lists pages that do not exist: {missing}")


def _mathjax_version(tgz: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", tgz.name))


def mathjax_package(cache: Path = CACHE) -> Path:
    """The unpacked npm package mathjax@3 (its `package/` folder), fetched with `npm pack` once and cached."""
    tarballs = sorted(cache.glob("mathjax-3.*.tgz"), key=_mathjax_version)
    if not tarballs:
        npm = shutil.which("npm")
        if npm is None:
            raise BuildError("npm not found. The book serves MathJax 3 locally, from the npm registry's package "
                             f"{MATHJAX_SPEC} (fetched once with `npm pack {MATHJAX_SPEC}` into {cache}). Install "
                             f"Node.js and npm, or put a mathjax-3.x.y.tgz from the npm registry into {cache}.")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # a failed download leaves no partial .tgz behind
            result = subprocess.run([npm, "pack", MATHJAX_SPEC, "--pack-destination", tmp],
                                    capture_output=True, text=True)
            packed = list(Path(tmp).glob("mathjax-3.*.tgz"))
            if result.returncode != 0 or len(packed) != 1:
                raise BuildError(f"`npm pack {MATHJAX_SPEC}` failed (exit code {result.returncode}); the book needs "
                                 f"the npm registry once to fetch MathJax into {cache}.\n{result.stderr.strip()}")
            tarballs = [packed[0].replace(cache / packed[0].name)]
    tgz = tarballs[-1]
    unpacked = cache / tgz.name.removesuffix(".tgz")
    if not unpacked.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=cache))  # unpacked completely, then renamed: never half a package
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        tmp.rename(unpacked)
    return unpacked / "package"


def install_mathjax(static_dir: Path, cache: Path = CACHE) -> str:
    """Copy MathJax's tex-mml-chtml component, fonts and TeX extensions to static_dir/mathjax/; returns the version."""
    package = mathjax_package(cache)
    es5, dest = package / "es5", static_dir / "mathjax"
    for part in MATHJAX_PARTS:
        src, dst = es5 / part, dest / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    shutil.copy2(package / "LICENSE", dest / "LICENSE")
    return json.loads((package / "package.json").read_text(encoding="utf-8"))["version"]


def build(build_root: Path = BOOK, notebooks_dir: Path = NOTEBOOKS) -> Path:
    """Stage, fetch MathJax and run jupyter-book: build_root/_build/{source,html}. Returns the html folder."""
    build_dir = build_root / "_build"
    stage_dir, html_dir = build_dir / "source", build_dir / "html"
    stage(stage_dir, notebooks_dir)
    print(f"MathJax {install_mathjax(stage_dir / STATIC_DIR)} from the npm registry (cached in {CACHE})", flush=True)
    if html_dir.exists():
        shutil.rmtree(html_dir)  # no stale page of a removed notebook survives
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(stage_dir),
           "--path-output", str(build_root), "--builder", "html", "--warningiserror", "--keep-going", "--all"]
    result = subprocess.run(cmd)
    if result.returncode != 0 or not (html_dir / "index.html").is_file():
        raise BuildError(f"jupyter-book build failed (exit code {result.returncode}); its messages are above. "
                         "Every Sphinx warning counts as an error.")
    return html_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m book.build", description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="notebook folder (default: notebooks/)")
    parser.add_argument("--build-root", type=Path, default=BOOK,
                        help="the book goes to BUILD_ROOT/_build/html (default: book/)")
    args = parser.parse_args(argv)
    return timed("book", lambda: build(args.build_root.resolve(), args.notebooks.resolve()) / "index.html", BuildError)


def timed(what: str, build_it: Callable[[], object], error: type[Exception]) -> int:
    """The tail of the build scripts' main(): run build_it(), print "WHAT built in N s: <its result>" and return 0,
    or print `error`'s message and return 1 (the exit status)."""
    start = time.perf_counter()
    try:
        result = build_it()
    except error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{what} built in {time.perf_counter() - start:.1f} s: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
