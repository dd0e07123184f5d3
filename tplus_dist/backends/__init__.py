"""Layer providers: how the decoder's linears, norms and attention are implemented."""

from __future__ import annotations

from tplus_dist.backends.base import LayerProvider, LinearRole


def get_provider(name: str = "torch") -> LayerProvider:
    if name == "torch":
        from tplus_dist.backends.torch_provider import TorchProvider

        return TorchProvider()
    raise ValueError(f"unknown layer provider {name!r}; available: torch (megatron is built with its process group)")


__all__ = ["LayerProvider", "LinearRole", "get_provider"]
