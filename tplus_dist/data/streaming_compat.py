"""The one way tplus_dist imports mosaicml-streaming.

Why a shim: ``streaming/__init__.py`` runs ``import streaming.vision``, and that module imports torchvision at
import time. This project does not use streaming's vision datasets, and it cannot install torchvision: pip's
plain ``pip install mosaicml-streaming`` would pull torchvision and with it a CUDA torch, and even pinned, the
torchvision wheels built for torch 2.13 link CUDA libraries that break ``import streaming`` (and transformers'
model classes) on the CPU torch build. So streaming is installed without its dependencies (``--no-deps``), and
before its first import we register an empty ``streaming.vision`` module, which Python then takes instead of
the real one. Only when torchvision is absent: where a working torchvision exists, streaming imports as usual.

Every module of tplus_dist that needs streaming calls :func:`import_streaming` instead of ``import streaming``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_streaming() -> types.ModuleType:
    """The ``streaming`` package, imported with an empty ``streaming.vision`` when torchvision is absent."""
    first_import = "streaming" not in sys.modules and "streaming.vision" not in sys.modules
    if first_import and importlib.util.find_spec("torchvision") is None:
        # The placeholder only has to exist before the first import; streaming never touches it afterwards.
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
    return importlib.import_module("streaming")
