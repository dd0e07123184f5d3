"""`tplus plan` on a GPU: the 1.1B preset in one process (fp32 weights, bf16 autocast, fused AdamW), its predicted
peak within 10% of torch.cuda.max_memory_allocated over two real optimizer steps. Skipped without CUDA
(tests/gpu/conftest.py). About 30 s on an H100 (1.1B parameters: 17.6 GB of weights, gradients and AdamW states)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tplus_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_plan_peak_within_10_percent_of_max_memory_allocated(micro_batch: int) -> None:
    from tplus_dist.model import build_model
    from tplus_dist.optim import build_optimizer
    from tplus_dist.plan import Layout, make_plan
    from tplus_dist.precision import precision_context
    from tplus_dist.train.compile import attention_backends

    cfg = load_config(
        ROOT / "configs/llama-1.1b.yaml", ["--train.device=cuda", f"--train.micro_batch_size={micro_batch}"]
    ).resolved()
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.seq_len), device=device)
    for _ in range(2):  # the second step has the optimizer states from the first
        optimizer.zero_grad(set_to_none=True)
        with precision_context(cfg.precision, device), attention_backends(device):
            logits = model(tokens)
        loss, _ = model.loss(logits, tokens)
        del logits
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - base
    plan = make_plan(cfg, Layout.from_config(cfg, 1), 80 * 2**30, device="cuda")
    predicted = plan.peak.total
    print(f"1.1B micro-batch {micro_batch}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    print(plan.table())
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
