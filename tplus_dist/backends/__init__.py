"""Layer providers: how the decoder's linears, norms and attention are implemented."""

from __future__ import annotations

from typing import Any

from tplus_dist.backends.base import LayerProvider, LinearRole


def get_provider(name: str = "torch", **kwargs: Any) -> LayerProvider:
    """The layer provider called ``name``: "torch" (no arguments), or "te" (Transformer Engine; ``kwargs`` are
    TEProvider's: tp_group, device, params_dtype; it raises TEUnavailableError where TE cannot run). ValueError for
    another name."""
    if name == "torch":
        from tplus_dist.backends.torch_provider import TorchProvider

        return TorchProvider()
    if name == "te":
        from tplus_dist.backends.te_provider import TEProvider  # imports TE only when constructed

        return TEProvider(**kwargs)
    raise ValueError(
        f"unknown layer provider {name!r}; available: torch, te (megatron is built with its process group)"
    )


__all__ = ["LayerProvider", "LinearRole", "get_provider"]
