"""Shared pytest fixtures. Test data is generated here; the real OASIS sample is read in place."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OASIS_SAMPLE = pathlib.Path(os.environ.get("CIFL_OASIS_SAMPLE", REPO.parent / "shared" / "data" / "oasis-sample"))


@pytest.fixture(scope="session")
def oasis_sample():
    """The real two-subject OASIS sample (neurite-oasis layout); skips when it is absent."""
    if not OASIS_SAMPLE.is_dir():
        pytest.skip(f"OASIS sample not found at {OASIS_SAMPLE} (set CIFL_OASIS_SAMPLE)")
    return OASIS_SAMPLE
