"""Fixtures of the multi-process integration tests (see harness.py)."""

import pytest

from harness import Harness



@pytest.fixture
def harness():
    """A `Harness`; every child it spawned is terminated (then killed) at teardown."""
    with Harness() as h:
        yield h


@pytest.fixture(scope="module")
def module_harness():
    """A `Harness` shared by the tests of one module (children reused to save start-up time)."""
    with Harness() as h:
        yield h
