"""Unit tests: the whole folder in seconds, with no TorchServe, nginx, browser or subprocess, and no training beyond
a few steps on a tiny model (``make test-unit``). Tests that need more go to tests/integration."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread_in_unit_tests(one_thread):
    """Every unit module runs on one intra-op thread (the ``one_thread`` fixture of tests/conftest.py): their tensors
    are tiny, and on a shared 2-core machine a second spinning thread made this folder 5x slower (84 s against 15 s here)."""
