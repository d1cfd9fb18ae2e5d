"""Unit tests of the subject check of `tidings events tail` (services/runtime/cli/tail.py)."""

from __future__ import annotations

import pytest

from services.runtime.cli.tail import subject_problem


@pytest.mark.parametrize("subject", ["tidings.>", "tidings.users.user.*", "tidings.*.user.created", ">"])
def test_subject_problem_accepts_valid_subject(subject: str) -> None:
    assert subject_problem(subject) is None


@pytest.mark.parametrize(
    "subject",
    ["bad subject", "", "tidings..users", ".tidings", "tidings.", "tidings.>.users", "tidings.us*",
     "tidings.a>"],
)
def test_subject_problem_rejects_invalid_subject(subject: str) -> None:
    assert subject_problem(subject) is not None
