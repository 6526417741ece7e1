"""Checks for the short exercises at the end of each notebook. A notebook's checker cell calls `check_answer` once
per exercise, and each call prints one line:

    [PASS] exercise 1: correct
    [FAIL] exercise 2: <a hint: what to look at, never the expected value>
    [TODO] exercise 3: not implemented yet

The answer is what the student's cell defines: a value, a tuple of values, or a function. While it is still the
stub (None, a tuple holding None, or a function that raises NotImplementedError) the exercise is "not implemented
yet". Otherwise `test(answer)` decides: it returns True (or None) for a right answer; it returns False or raises
AssertionError for a wrong one, and the hint is printed (an AssertionError's own message, if it has one, replaces
it). A test may also return the `CheckResult` of one of `dsv3_ref.teaching.exercises`' checkers, whose diagnosis is
printed. Any other exception, from the student's function or from a wrong type of answer, is reported by name and never
raised, so a checker cell always runs to its end and shows every exercise.

The exercise notebook (notebooks/exercises/) uses the richer checkers of `dsv3_ref.teaching.exercises`, which model
the classic mistakes of its seven functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PASS, FAIL, TODO = "PASS", "FAIL", "TODO"


def is_stub(answer: Any) -> bool:
    """True for an answer not written yet: None, or a tuple/list holding None."""
    if answer is None:
        return True
    return isinstance(answer, (tuple, list)) and any(a is None for a in answer)


def verdict(answer: Any, test: Callable[[Any], bool | None], hint: str) -> tuple[str, str]:
    """(PASS | FAIL | TODO, message) for one answer; never raises."""
    if not isinstance(hint, str) or not hint:
        raise ValueError("hint must be a non-empty string that says what to look at")
    if is_stub(answer):
        return TODO, "not implemented yet"
    try:
        ok = test(answer)
    except NotImplementedError:
        return TODO, "not implemented yet"
    except AssertionError as e:
        return FAIL, str(e) or hint
    except Exception as e:  # noqa: BLE001 - the student's code: reported, never raised
        detail = f": {e}" if str(e) else ""
        return FAIL, f"your answer raised {type(e).__name__}{detail} ({hint})"
    if hasattr(ok, "passed") and hasattr(ok, "message"):  # a CheckResult of dsv3_ref.teaching.exercises
        if ok.passed:
            return PASS, "correct"
        return (TODO, "not implemented yet") if "NotImplementedError" in ok.message else (FAIL, ok.message)
    if ok is None or ok is True or (ok is not False and bool(ok)):
        return PASS, "correct"
    return FAIL, hint


def check_answer(exercise: str, answer: Any, test: Callable[[Any], bool | None], hint: str) -> None:
    """Print `[STATUS] exercise: message` for one exercise (see the module docstring)."""
    status, message = verdict(answer, test, hint)
    print(f"[{status}] {exercise}: {message}")
