"""Names and places the tests agree on."""

from __future__ import annotations

from pathlib import Path

# ../shared/testdata beside the checkout: real music and NI stem files (tests needing it are marked `testdata`).
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
# The HTDemucs with random weights that the `model_repo` fixture writes.
MODEL_NAME = "tiny"
