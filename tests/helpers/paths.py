"""Where things are in the checkout, so that a test's depth in tests/ does not matter."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
