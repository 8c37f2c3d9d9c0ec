"""Session fixtures for tests against a real Triton: the built model repository and running servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.build import build_repository, load_digits_held_out
from models.catalog import Backend, Device
from models.digits import HeldOutSplit
from services.stack.triton import TritonInstance, start_triton


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python-backend, CPU model repository rendered into this session's own temp dir.

    Artifacts come from the shared, idempotent cache (models/.cache), so only the first session on a
    machine trains and exports; the rendered copy keeps tests independent of whatever flavour
    `models/repository` was last built as.
    """
    dest = tmp_path_factory.mktemp("model-repository")
    return build_repository(dest, backend=Backend.PYTHON, device=Device.CPU, log=False)


@pytest.fixture(scope="session")
def digits_held_out() -> HeldOutSplit:
    return load_digits_held_out()


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonInstance]:
    """One Triton for the whole session, every model loaded, on free ports. Tests that unload a model
    must load it again before they finish."""
    with start_triton(model_repository, state_dir=tmp_path_factory.mktemp("triton-a")) as instance:
        yield instance


@pytest.fixture(scope="session")
def triton_pair(
    triton: TritonInstance, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonInstance, TritonInstance]]:
    """Two independent Tritons serving the same repository (the session's `triton` plus a second one),
    for tests that need several backends. The second starts only when a test asks for the pair."""
    with start_triton(model_repository, state_dir=tmp_path_factory.mktemp("triton-b")) as second:
        yield triton, second
