"""Correctness against reference implementations (transformers on torch, CPU).

Marked `reference`: they need torch (scripts/test.sh installs it; .ci/run runs them). Measured
numbers are collected and, when TKR_CORRECTNESS_REPORT names a file, written there as JSON
(docs/correctness.md quotes that file).
"""

from __future__ import annotations

import json
import os

import pytest


pytest.importorskip("torch")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/correctness/" in str(item.fspath):
            item.add_marker(pytest.mark.reference)


_REPORT: dict = {}


@pytest.fixture(scope="session")
def report():
    yield _REPORT
    path = os.environ.get("TKR_CORRECTNESS_REPORT")
    if path and _REPORT:
        with open(path, "w") as f:
            json.dump(_REPORT, f, indent=2, sort_keys=True)


