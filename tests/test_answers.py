"""dsv3_ref.teaching.answers: the notebook-end checks print PASS, FAIL with the hint (never the expected value), or
TODO for an answer still at its stub, and never raise."""

import pytest
import torch

from dsv3_ref.teaching import exercises as ex
from dsv3_ref.teaching.answers import FAIL, PASS, TODO, check_answer, is_stub, verdict


def _stub(*args):
    raise NotImplementedError


def test_stubs_are_not_implemented_yet():
    assert is_stub(None) and is_stub((1, None)) and is_stub([None]) and not is_stub(0) and not is_stub((0, 1))
    assert verdict(None, lambda a: a == 3, "hint") == (TODO, "not implemented yet")
    assert verdict((3, None), lambda a: True, "hint") == (TODO, "not implemented yet")
    assert verdict(_stub, lambda fn: fn(1) == 2, "hint") == (TODO, "not implemented yet")
    assert verdict(_stub, lambda fn: ex.check("bias_update", fn), "hint") == (TODO, "not implemented yet")


def test_right_and_wrong_answers():
    assert verdict(3, lambda a: a == 3, "hint") == (PASS, "correct")
    assert verdict(3, lambda a: None, "hint") == (PASS, "correct")  # a test that only asserts
    assert verdict(torch.tensor([1.0]), lambda t: torch.allclose(t, torch.tensor([1.0])), "hint") == (PASS, "correct")
    assert verdict(4, lambda a: a == 3, "count the norms") == (FAIL, "count the norms")


def test_assertion_messages_and_errors_become_hints():
    def test(a):  # explicit raises: pytest rewrites the asserts of a test module and appends its own explanation
        if a <= 0:
            raise AssertionError("it must be positive")
        if a >= 10:
            raise AssertionError
        return True

    assert verdict(-1, test, "hint") == (FAIL, "it must be positive")
    assert verdict(11, test, "hint") == (FAIL, "hint")  # a bare assert: the hint
    status, message = verdict("x", lambda a: a + 1 == 2, "add one")
    assert status == FAIL and message.startswith("your answer raised TypeError") and "(add one)" in message


def test_checker_results_of_the_exercises_module():
    from dsv3_ref.objectives.balance import update_bias

    assert verdict(update_bias, lambda fn: ex.check("bias_update", fn), "hint") == (PASS, "correct")
    status, message = verdict(lambda b, load, g: b, lambda fn: ex.check("bias_update", fn), "hint")
    assert status == FAIL and message and message != "hint"  # the checker's own diagnosis


def test_check_answer_prints_one_line(capsys):
    check_answer("exercise 1", None, lambda a: a == 3, "hint")
    check_answer("exercise 2", 3, lambda a: a == 3, "hint")
    check_answer("exercise 3", 2, lambda a: a == 3, "look at the norms")
    assert capsys.readouterr().out.splitlines() == ["[TODO] exercise 1: not implemented yet",
                                                    "[PASS] exercise 2: correct",
                                                    "[FAIL] exercise 3: look at the norms"]
    with pytest.raises(ValueError, match="hint must be a non-empty string"):
        check_answer("exercise 4", 1, lambda a: True, "")
