"""Shared fixtures: `ws`, the fault-injection workspace of tests/faults.py, reset before and after each test."""
import pytest

from faults import Workspace, workspace


@pytest.fixture
def ws(tmp_path_factory) -> Workspace:
    space = workspace(tmp_path_factory)
    space.reset()
    yield space
    space.reset()
