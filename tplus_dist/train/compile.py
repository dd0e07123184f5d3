"""train.compile: torch.compile each decoder block, in place, and the attention backend order on CUDA.

Per block rather than the whole model (torchtitan's ``apply_compile``, torchtitan/models/llama3/infra/parallelize.py):
every block runs the same code, so with torch's default inlining of built-in modules (parameters become graph inputs)
one compiled graph serves them all, and a change in one place recompiles one block's graph, not the whole model's.
The embedding, output head and loss stay eager: under tensor parallelism they call megatron-core's collectives,
and the pipeline runtimes call the blocks of a stage one by one anyway.

``nn.Module.compile`` compiles the module's forward in place, so parameter and state-dict names stay those of the
eager model (``torch.compile(module)`` would wrap it and prefix every name with ``_orig_mod.``): checkpoints, HF
export and resharding do not see whether a run was compiled.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def apply_compile(model: nn.Module, *, fullgraph: bool = True, backend: str = "inductor") -> int:
    """Compile every decoder block (tplus_dist.model.block.Block) found in ``model`` in place; ``model`` may be the
    whole decoder, a pipeline stage (DeepSpeed's PipelineModule, the interleaved chunks) or an engine around them.
    Returns the number of blocks compiled. ``fullgraph``: refuse graph breaks inside a block (a break would silently
    cost the fusion). ``backend``: torch.compile's (tests use "aot_eager": the same tracing of forward and backward,
    without generating kernels). Raises ValueError when ``model`` holds no block."""
    from tplus_dist.model.block import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"train.compile: no decoder block found in {type(model).__name__} to compile")
    for block in blocks:
        block.compile(fullgraph=fullgraph, backend=backend)
    return len(blocks)


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, scaled_dot_product_attention tries FlashAttention first, then cuDNN, memory-efficient and the math
    kernel (each is skipped when it cannot take the inputs: an additive mask or ALiBi bias rules flash out). Stated
    rather than left to torch's default order, which has changed between releases. Elsewhere: no change."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)
