"""The long mode: tests and cases that CI's 10-minute budget on 2 cores
leaves out, run when ``DISTLEARN_LONG=1`` (docs/development.md lists
them). What CI keeps of each: the comment where it is marked."""

from __future__ import annotations

import os

import pytest

LONG = os.environ.get("DISTLEARN_LONG") == "1"

long_only = pytest.mark.skipif(not LONG, reason="a long test: runs when DISTLEARN_LONG=1")
