"""Which notebooks `make test` checks two at a time, and which one at a time, printed for the Makefile.

Each notebook pins its thread count in its first cells (`torch.set_num_threads(n)`). Two notebooks pinned to one
thread share two cores without getting in each other's way, so nbval runs those under pytest-xdist, one notebook per
worker (`--dist loadfile`), the slowest first (the README's measured runtimes) so that the two workers finish close
together. A notebook that pins more threads, or none, runs alone afterwards: beside another, its OpenMP threads
spin-wait for cores that are busy (measured on 2 cores: notebooks 60 and 70 side by side under the perturbed
environment were still running after 15 minutes; alone, 3 and 1 minutes).

    python scripts/nbval_schedule.py parallel   # one-thread notebooks, slowest first
    python scripts/nbval_schedule.py serial     # the others, in teaching order
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^\s*torch\.set_num_threads\((\d+)\)", flags=re.M)
README_RUNTIME = re.compile(r"^\| `(\d\d_\w+)` \|.*\| (\d+) s \|$", flags=re.M)


def notebooks(root: Path = ROOT) -> list[Path]:
    """Every notebook in teaching order, as the Makefile lists them: notebooks/NN_*.ipynb, then each sub-folder."""
    return sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "notebooks").glob("*/*.ipynb"))


def pinned_threads(path: Path) -> int | None:
    """The thread count the notebook's code cells pin (None if none, or if they pin more than one count)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    pins = {int(n) for c in cells if c["cell_type"] == "code" for n in PIN.findall("".join(c["source"]))}
    return pins.pop() if len(pins) == 1 else None


def schedule(root: Path = ROOT) -> tuple[list[Path], list[Path]]:
    """(parallel, serial): the one-thread notebooks slowest first (unlisted in the README's table: last), the rest
    in teaching order."""
    runtime = {m[0]: float(m[1]) for m in README_RUNTIME.findall((root / "README.md").read_text(encoding="utf-8"))}
    all_notebooks = notebooks(root)
    parallel = [p for p in all_notebooks if pinned_threads(p) == 1]
    parallel.sort(key=lambda p: -runtime.get(p.stem, 0.0))  # stable: teaching order among equals
    return parallel, [p for p in all_notebooks if p not in parallel]


def main(argv: list[str]) -> None:
    if argv not in (["parallel"], ["serial"]):
        raise SystemExit("usage: nbval_schedule.py parallel|serial")
    parallel, serial = schedule()
    print(" ".join(str(p.relative_to(ROOT)) for p in (parallel if argv == ["parallel"] else serial)))


if __name__ == "__main__":
    main(sys.argv[1:])
