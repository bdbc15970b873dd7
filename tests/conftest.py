"""Test-wide fixtures."""

import pytest

from mir_lightning._warnings import reset_warned


@pytest.fixture(autouse=True)
def _fresh_warning_causes():
    """Each test sees the package's once-per-process warnings afresh (the order of tests must not matter)."""
    reset_warned()
    yield
