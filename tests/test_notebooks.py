"""Notebook discipline, checked on the stored notebooks (nbval re-executes them in `make test`): each opens with its
learning goals, prerequisites and runtime and ends with a summary and exercises; each was executed top to bottom in
one fresh kernel, without errors; outputs hold no machine-specific paths; machine-dependent outputs are excluded from
the comparison by cell tags and checked by assertions; files stay small; the README lists them."""

import json
import re
from pathlib import Path

import pytest

from scripts import nbval_schedule  # the README's runtime table, as `make test` schedules by it

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*/*.ipynb"))
MACHINE_PATHS = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|[A-Z]:\\\\)")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def _output_text(output: dict) -> str:
    if "text" in output:
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join("".join(v) if isinstance(v, list) else str(v) for k, v in data.items() if k.startswith("text/"))


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def notebook(request) -> tuple[Path, dict]:
    return request.param, _load(request.param)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 10


def test_opens_with_goals_prerequisites_and_runtime(notebook):
    path, nb = notebook
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and _text(first).startswith("# "), "a title first"
    head = _text(first)
    assert re.search(r"\*\*What (you will learn|you will practise|this notebook is)\*\*", head), "learning goals"
    assert "**Prerequisites**" in head and "**Runtime**" in head


def test_ends_with_summary_and_exercises(notebook):
    path, nb = notebook
    headings = [line for c in nb["cells"] if c["cell_type"] == "markdown" for line in _text(c).splitlines()
                if line.startswith("#")]
    assert any(re.match(r"#+ (\d+\. )?Summary", h) for h in headings), "a summary section"
    assert path.parent.name == "exercises" or any(re.match(r"#+ Exercises", h) for h in headings), "exercises"


def test_executed_top_to_bottom_without_errors(notebook):
    path, nb = notebook
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run all cells once, in order"
    for i, cell in enumerate(code):
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"], f"code cell {i} stored an error"


def test_outputs_hold_no_machine_paths(notebook):
    path, nb = notebook
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        for output in cell["outputs"]:
            found = MACHINE_PATHS.search(_output_text(output))
            assert found is None, f"code cell {i} prints a machine path: {found.group(0)!r}"


# Cells whose output may be excluded from nbval's comparison without an assertion of their own: they print timings, or
# show a widget, or are an exercise's solution (the checker cell after it asserts).
UNCHECKED_OUTPUT = re.compile(r"time\.perf_counter|time\.process_time|tokens_per_s|tokens/s|seconds|_cpu\b|^display\("
                              r"|^# Exercise .*\(solution\)", flags=re.MULTILINE)


def test_output_exclusions_are_tags_and_come_with_assertions(notebook):
    """Machine-dependent outputs (training runs, routing after training, samples, timings) are excluded from nbval's
    comparison with the cell tag `nbval-ignore-output`, which readers of the book do not see; such a cell checks its
    claim with an assertion (a tolerance measured across seeds, thread counts and CPUs) unless it only times or
    displays something. Every other cell's output is compared exactly."""
    path, nb = notebook
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        source, tags = _text(cell), cell.get("metadata", {}).get("tags", [])
        assert "NBVAL_" not in source, f"code cell {i}: use the cell tags (nbval-ignore-output), not NBVAL comments"
        assert not {"nbval-skip", "nbval-check-output"} & set(tags), f"code cell {i}: every cell runs and is checked"
        if "nbval-ignore-output" in tags:
            assert re.search(r"^\s*assert ", source, flags=re.MULTILINE) or UNCHECKED_OUTPUT.search(source), \
                f"code cell {i}: output not compared, so it must assert its claim"


def test_files_stay_small(notebook):
    path, _ = notebook
    assert path.stat().st_size < 5_000_000


def test_readme_lists_exactly_the_notebooks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`((?:exercises/)?\d\d_\w+)`", readme))
    present = {str(p.relative_to(ROOT / "notebooks").with_suffix("")) for p in NOTEBOOKS}
    assert listed == present


def test_nbval_runs_side_by_side_only_the_one_thread_notebooks():
    """`make test` runs the notebooks of scripts/nbval_schedule.py's first list two at a time: each must pin one
    thread in its first code cells, before any work (another notebook beside a two-thread one oversubscribes the
    cores). Every notebook is in exactly one list; the parallel one starts with the slowest."""
    parallel, serial = nbval_schedule.schedule()
    assert sorted(parallel + serial) == sorted(NOTEBOOKS) and not set(parallel) & set(serial)
    for path in parallel:
        code = [_text(c) for c in _load(path)["cells"] if c["cell_type"] == "code"]
        first = next(i for i, src in enumerate(code) if "set_num_threads" in src)
        assert first <= 1 and nbval_schedule.PIN.findall(code[first]) == ["1"], f"{path.name}: code cell {first}"
    assert {p.stem for p in serial} >= {"60_putting_it_together", "70_sparse_attention"}  # they pin two threads
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    runtime = {m[0]: float(m[1]) for m in nbval_schedule.README_RUNTIME.findall(readme)}
    timed = [runtime[p.stem] for p in parallel if p.stem in runtime]
    assert len(timed) >= 5 and timed == sorted(timed, reverse=True)
