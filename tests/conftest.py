"""Session setup: the bundled data's untracked files (data/sft_data.json) exist before any test
reads data/ directly (tests/cli_helpers.py, tests/test_probe.py)."""
from tinygrad_llm.data import BUNDLED_DIR, ensure_bundled


def pytest_sessionstart(session):
    ensure_bundled(BUNDLED_DIR)
