"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Directory of the CompVis reference fixtures (README.md, parity/, manifests/).

    Looks in ``<repo>/../shared/reference/compvis`` first, then in ``$LDMKIT_REFERENCE_DIR``;
    tests that need it are skipped when neither exists.
    """
    candidates = [REPO_ROOT.parent / "shared" / "reference" / "compvis"]
    env = os.environ.get("LDMKIT_REFERENCE_DIR")
    if env:
        candidates.append(Path(env))
    for path in candidates:
        if (path / "parity").is_dir():
            return path
    pytest.skip(
        "CompVis reference fixtures not found: looked in "
        + ", ".join(str(p) for p in candidates)
        + " (set LDMKIT_REFERENCE_DIR to the folder holding parity/ and manifests/)"
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished seconds-long MNIST run (preset mnist_tiny): both stages, all checkpoints."""
    from ldmkit.train import train_ldm

    run = tmp_path_factory.mktemp("tiny")
    train_ldm("mnist_tiny", run, progress=False, log=lambda s: None)
    return run
