"""On CUDA, a training step does not synchronise the host once per micro-batch (issue 16): its loss terms are summed
on the device and read once per step. torch.cuda.set_sync_debug_mode("warn") reports every synchronising call (an
.item(), a device-to-host copy); the same step with 1 and with 8 micro-batches must report the same number."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_synchronisations_per_step_do_not_grow_with_micro_batches() -> None:
    from tests.unit.test_token_mean import _batches, _cfg, _ConstantLR, _Source
    from tplus_dist.model import build_model
    from tplus_dist.train.trainer import Trainer

    device = torch.device("cuda")
    seen = {}
    for sizes in ([8], [1] * 8):
        cfg = _cfg()
        cfg.precision.dtype = "fp32"
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = Trainer(cfg, model, opt, _ConstantLR(), _Source(_batches(sizes, seed=4)), None, device)
        trainer.train_step()  # (first step: lazy state, kernels loaded)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen[len(sizes)] = sum("synchroniz" in str(w.message) for w in caught)
    assert seen[1] == seen[8], seen
