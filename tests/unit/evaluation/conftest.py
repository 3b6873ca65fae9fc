"""Fixtures of the evaluator's unit tests (the toys live in ``evaluation_toys``)."""

import pytest
from evaluation_toys import ToyTestSet


@pytest.fixture
def test_set() -> ToyTestSet:
    return ToyTestSet()
