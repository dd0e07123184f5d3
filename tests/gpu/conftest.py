"""The GPU tests: every test here is marked ``gpu`` and skips (never errors) where it cannot run.

Without CUDA every test in this folder is skipped; a test that needs Transformer Engine (a name or module path
containing ``te``/``fp8``, or the ``needs_te`` fixture) is skipped when ``transformer_engine.pytorch`` does not import.
On the GPU host (after ``source .gpu/setup.sh``) ``pytest -m gpu tests/gpu`` runs them all; ``make gpu-check`` does it
as its first step."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@functools.cache
def te_import_error() -> str | None:
    """Why ``transformer_engine.pytorch`` does not import here (None when it does). Imported at most once: it loads
    CUDA libraries and takes seconds."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or OSError/RuntimeError from a library it loads (cuDNN, its extension)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _needs_te(item: pytest.Item) -> bool:
    # worker files test_te_provider.py and test_fp8.py need TE throughout; others ask through the fixture
    name = Path(str(item.fspath)).name
    return name in ("test_te_provider.py", "test_fp8.py") or "needs_te" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/gpu as ``gpu``, and skip it without CUDA (or without TE where it needs
    TE), so that `pytest tests/gpu` on a CPU machine reports skips and `pytest -m "not gpu"` leaves them out."""
    cuda = torch.cuda.is_available()
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif _needs_te(item) and te_import_error() is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs Transformer Engine ({te_import_error()})"))


@pytest.fixture
def needs_te() -> None:
    """Request it for a test that needs Transformer Engine (skipped, by the collection hook, where it is missing)."""
