"""The one way tplus_dist imports mosaicml-streaming.

Why a shim: ``streaming/__init__.py`` runs ``import streaming.vision``, and that module imports torchvision at
import time. This project does not use streaming's vision datasets, and it cannot install torchvision: pip's
plain ``pip install mosaicml-streaming`` would pull torchvision and with it a CUDA torch, and even pinned, the
torchvision wheels built for torch 2.13 link CUDA libraries that break ``import streaming`` (and transformers'
model classes) on the CPU torch build. So streaming is installed without its dependencies (``--no-deps``), and
before its first import we register an empty ``streaming.vision`` module, which Python then takes instead of
the real one. Only when torchvision is absent: where a working torchvision exists, streaming imports as usual.

Every module of tplus_dist that needs streaming calls :func:`import_streaming` instead of ``import streaming``.
It also installs :func:`tplus_dist.data.streaming_shm.get_shm_prefix` in place of streaming's
``streaming/base/shared/prefix.py:get_shm_prefix`` (as ``streaming.base.dataset`` imported it), so that jobs
starting together on one node never race for a shared-memory prefix (see that module).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_streaming() -> types.ModuleType:
    """The ``streaming`` package, imported with an empty ``streaming.vision`` when torchvision is absent, and with
    tplus_dist's race-free shared-memory registration installed."""
    first_import = "streaming" not in sys.modules and "streaming.vision" not in sys.modules
    if first_import and importlib.util.find_spec("torchvision") is None:
        # The placeholder only has to exist before the first import; streaming never touches it afterwards.
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
    streaming = importlib.import_module("streaming")
    dataset_module = sys.modules["streaming.base.dataset"]
    from tplus_dist.data.streaming_shm import get_shm_prefix

    if getattr(dataset_module, "get_shm_prefix", None) is not get_shm_prefix:
        # StreamingDataset.__init__ looks it up in its own module's globals
        setattr(dataset_module, "get_shm_prefix", get_shm_prefix)  # noqa: B010
    return streaming
