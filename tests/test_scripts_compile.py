"""Every benchmark and script at least compiles: they are not imported by the test run, so a syntax error in one
(benchmarks/video_teachers.py held one for a session) would otherwise reach a user first."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("methods/**/*.py")])


def test_the_list_is_not_empty():
    assert len(FILES) > 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_compiles(path):
    compile(path.read_text(), str(path), "exec")
