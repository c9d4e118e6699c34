"""Typo rules of search (models/search.py): the edit distance and the typo budget."""

import pytest

from models.search import _corrections, _splits, allowed_typos, edit_distance


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("chocolate", "chocolate", 0),
        ("choclate", "chocolate", 1),  # dropped
        ("chocollate", "chocolate", 1),  # added
        ("chocolete", "chocolate", 1),  # replaced
        ("chcoolate", "chocolate", 1),  # two adjacent letters swapped: one edit, not two
        ("chcolaet", "chocolate", 2),
        ("", "abc", 3),
        ("abc", "", 3),
    ],
)
def test_edit_distance(a: str, b: str, d: int) -> None:
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_the_budget_is_meilisearchs() -> None:
    assert [allowed_typos("x" * n) for n in (1, 4, 5, 8, 9, 15)] == [0, 0, 1, 1, 2, 2]


def test_corrections_use_the_budget_of_the_word_meant_and_keep_every_nearest() -> None:
    assert _corrections("sugr", [("sugar", 3), ("sour", 9)]) == ["sugar"]  # "sour" is 4 letters
    assert _corrections("chian", [("chain", 5), ("china", 9), ("chimney", 20)]) == ["china", "chain"]
    assert _corrections("chcolaet", [("chocolate", 1)]) == ["chocolate"]  # two edits, 9 letters
    assert _corrections("choclaet", [("chocolat", 1)]) == []  # two edits, 8 letters


def test_splits_keep_three_letters_a_side() -> None:
    assert _splits("lunchbox") == [("lun", "chbox"), ("lunc", "hbox"), ("lunch", "box")]
    assert _splits("abcde") == [] and _splits("ab3def") == []
