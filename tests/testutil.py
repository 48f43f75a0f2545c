"""Helpers shared by the test suites."""
import os

# The benchmark and training data live outside the repo (see ../shared/data/SOURCE.md);
# tests find it through MAR_DATA_DIR, defaulting to the checkout's sibling folder.
DATA_DIR = os.environ.get(
    "MAR_DATA_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"),
)
