"""Fixtures of the multi-process integration tests (see harness.py)."""

import pytest

from checks import start_pair, stop_pair
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


@pytest.fixture(scope="module")
def pair(module_harness):
    """A linked prompt and decoder in default mode (the owner serves key lookups and releases
    consumed keys; `transfer_cache_async` sends to raw addresses)."""
    pair = start_pair(module_harness)
    yield pair
    stop_pair(pair)


@pytest.fixture(scope="module")
def ra_pair(module_harness):
    """Remote-cache-accessible mode on both sides (push_*, key-named destinations)."""
    pair = start_pair(module_harness, {"remote_accessible": True}, {"remote_accessible": True})
    yield pair
    stop_pair(pair)
