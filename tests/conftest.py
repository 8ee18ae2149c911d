import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*/ from the current compiler (review the diff!)",
    )


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture
def store(tmp_path):
    """kdsr's state directory for the test."""
    from kdsr.kernel.state import StateStore

    return StateStore(tmp_path / "state")


@pytest.fixture
def example_path():
    return ROOT / "examples" / "l2-web.json"


@pytest.fixture
def intent(tmp_path, example_path):
    """A copy of the example intent that the test may edit."""
    path = tmp_path / "intent.json"
    path.write_text(example_path.read_text())
    return path
