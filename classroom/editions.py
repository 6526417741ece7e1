"""Two editions of the course from one source: `python -m classroom.editions` (what `make student` runs).

The notebooks in notebooks/ are the **instructor edition**: every exercise has a cell the student fills in (a stub:
`answer_1 = None`, or a function whose body raises NotImplementedError), then the instructor's solution, then a
checker cell. The **student edition** is derived from them by three rules, written in the notebooks as metadata:

- a cell tagged `solution` (code or markdown) is left out, with its outputs;
- a notebook whose metadata holds {"dsv3_ref": {"edition": "instructor"}} (the solutions notebook) is left out;
- every other cell is kept as it is.

Building the student edition writes, under build/student/ (the default; `--out`):

1. notebooks/   the student notebooks, executed top to bottom in a fresh kernel (as `make run` does for the
                instructor edition), so that their stored outputs show what a student sees: every checker prints
                "not implemented yet" for the exercises. A notebook that stores an error, or a checker line that
                reports a pass ("[PASS]": a stub cannot pass), fails the build.
2. book/        the book built from those notebooks (`book.build`), with no solutions in it.
3. dsv3_ref-student.zip   the hand-out: the student notebooks, the setup sheet (docs/setup.md), a wheel of the
                package, and the repository files the notebooks read (REPO_FILES, at the same relative place).

`--no-execute` skips the execution (outputs from the first left-out cell on are cleared instead) and `--no-book`
and `--no-zip` skip steps 2 and 3; the tests use these for a fast structural build.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from book.build import timed

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_OUT = ROOT / "build" / "student"
SOLUTION_TAG = "solution"
METADATA_KEY = "dsv3_ref"
INSTRUCTOR = "instructor"
# files next to the notebooks that the student edition needs (nbval's sanitizer)
SUPPORT_FILES = ("sanitize.cfg",)
# repository files the notebooks read (as ../<path> from notebooks/): copied to the same place beside the student
# notebooks and into the hand-out, so that the student edition runs where it is unpacked
REPO_FILES = ("benchmarks/results/h200_fp8.json",)
CELL_TIMEOUT = 600  # seconds per cell, as `make run`


class EditionError(RuntimeError):
    """The student edition cannot be built; the message says which notebook and why."""


# ------------------------------------------------------------------------------------------ one notebook
def is_instructor_only(nb: dict) -> bool:
    """True for a notebook that the student edition leaves out (notebook metadata dsv3_ref.edition)."""
    edition = nb.get("metadata", {}).get(METADATA_KEY, {}).get("edition")
    if edition not in (None, INSTRUCTOR):
        raise EditionError(f"notebook metadata {METADATA_KEY}.edition is {edition!r}; allowed: {INSTRUCTOR!r} "
                           "(or no value: the notebook is in both editions)")
    return edition == INSTRUCTOR


def is_solution(cell: dict) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def solution_cells(nb: dict) -> list[dict]:
    """The cells the student edition leaves out (the whole notebook if it is instructor-only)."""
    return list(nb["cells"]) if is_instructor_only(nb) else [c for c in nb["cells"] if is_solution(c)]


def student_notebook(nb: dict) -> dict | None:
    """The student edition of a notebook (a new dict), or None when the notebook is instructor-only.

    Cells keep their sources and outputs; cells from the first left-out one on lose their outputs (they would show
    what the solutions printed) until the notebook is executed again."""
    if is_instructor_only(nb):
        return None
    out = copy.deepcopy(nb)
    cells, stale = [], False
    for cell in out["cells"]:
        if is_solution(cell):
            stale = True
            continue
        if stale and cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    out["cells"] = cells
    return out


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _node(nb: dict):
    """The notebook as an nbformat node (list-of-lines sources joined, as nbclient and the exporters expect)."""
    import nbformat

    return nbformat.reads(json.dumps(nb), as_version=4)


def _write(nb: dict, path: Path) -> None:
    """Write as Jupyter does (nbformat.writes), so the files look like the instructor notebooks."""
    import nbformat

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbformat.writes(_node(nb)), encoding="utf-8")


def notebook_paths(notebooks_dir: Path = NOTEBOOKS) -> list[Path]:
    """Every notebook under notebooks_dir, in teaching order (top level first, then each sub-folder)."""
    paths = [p for p in notebooks_dir.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    return sorted(paths, key=lambda p: (len(p.relative_to(notebooks_dir).parts), p.relative_to(notebooks_dir)))


# ------------------------------------------------------------------------------------------ execution
def execute(nb: dict, cwd: Path) -> float:
    """Run every cell of nb in place in a fresh kernel started in `cwd` (the notebook's folder); returns seconds.

    The kernel is this interpreter's (as `--nbval-current-env`)."""
    import nbformat
    from nbclient import NotebookClient

    node = _node(nb)
    start = time.perf_counter()
    client = NotebookClient(node, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                            allow_errors=True, resources={"metadata": {"path": str(cwd)}})
    client.execute()
    nb.clear()
    nb.update(json.loads(nbformat.writes(node)))
    return time.perf_counter() - start


def stored_errors(nb: dict) -> list[str]:
    """'cell i: EName: message' for every error output the notebook stores."""
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, cell in enumerate(nb["cells"])
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def passing_checks(nb: dict) -> list[str]:
    """'cell i: line' for every checker line that reports a pass ("[PASS] ..."): in the student edition, where every
    answer is still its stub, each one is a defect (a checker that passes a stub, or a solution left in)."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            text = o.get("text") or o.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            found += [f"cell {i}: {line.strip()}" for line in text.splitlines() if line.lstrip().startswith("[PASS]")]
    return found


# ------------------------------------------------------------------------------------------ the edition
def build_notebooks(out_dir: Path, notebooks_dir: Path = NOTEBOOKS, run: bool = True,
                    log=print) -> list[Path]:
    """Write the student notebooks into out_dir (emptied first), executed unless run=False; returns their paths."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    written = []
    for path in notebook_paths(notebooks_dir):
        rel = path.relative_to(notebooks_dir)
        nb = student_notebook(_read(path))
        if nb is None:
            log(f"  {rel}: instructor only, left out")
            continue
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if run:
            seconds = execute(nb, dest.parent)
            errors = stored_errors(nb) + passing_checks(nb)
            if errors:
                raise EditionError(f"{rel}: the student edition stores errors or passing checks:\n  "
                                   + "\n  ".join(errors))
            log(f"  {rel}: executed in {seconds:.0f} s")
        _write(nb, dest)
        written.append(dest)
    for name in SUPPORT_FILES:
        if (notebooks_dir / name).is_file():
            shutil.copy2(notebooks_dir / name, out_dir / name)
    return written


def copy_repo_files(out: Path) -> None:
    """REPO_FILES into out/ (beside out/notebooks/), where the notebooks look for them."""
    for rel in REPO_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, out / rel)


def build_zip(out: Path, notebooks_dir: Path, log=print) -> Path:
    """out/dsv3_ref-student.zip: notebooks/, SETUP.md (docs/setup.md) and a wheel of the package."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, str(ROOT)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("dsv3_ref-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise EditionError(f"`pip wheel` of the package failed (exit code {result.returncode}):\n{result.stderr}")
        target = out / "dsv3_ref-student.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for path in sorted(notebooks_dir.rglob("*.ipynb")):
                if ".ipynb_checkpoints" not in path.parts:
                    z.write(path, Path("notebooks") / path.relative_to(notebooks_dir))
            for rel in REPO_FILES:
                z.write(ROOT / rel, rel)
            z.write(ROOT / "docs" / "setup.md", "SETUP.md")
            z.write(wheels[0], wheels[0].name)
    log(f"hand-out: {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def build(out: Path = DEFAULT_OUT, notebooks_dir: Path = NOTEBOOKS, run: bool = True, book: bool = True,
          hand_out: bool = True, log=print) -> Path:
    """The whole student edition under `out` (see the module docstring); returns out."""
    log(f"student notebooks -> {out / 'notebooks'}")
    copy_repo_files(out)
    build_notebooks(out / "notebooks", notebooks_dir, run=run, log=log)
    if book:
        from book import build as book_build

        try:
            html = book_build.build(out / "book", out / "notebooks")
        except book_build.BuildError as exc:
            raise EditionError(f"the student book does not build: {exc}") from exc
        log(f"student book -> {html}")
    if hand_out:
        build_zip(out, out / "notebooks", log=log)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m classroom.editions", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: build/student)")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS, help="the instructor notebooks (notebooks/)")
    parser.add_argument("--no-execute", action="store_true", help="do not execute the student notebooks")
    parser.add_argument("--no-book", action="store_true", help="do not build the student book")
    parser.add_argument("--no-zip", action="store_true", help="do not write the hand-out zip")
    args = parser.parse_args(argv)

    def build_it() -> Path:
        build(args.out.resolve(), args.notebooks.resolve(), run=not args.no_execute, book=not args.no_book,
              hand_out=not args.no_zip)
        return args.out

    return timed("student edition", build_it, EditionError)


if __name__ == "__main__":
    sys.exit(main())
