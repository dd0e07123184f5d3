"""Throughput, MFU, and the run's plottable outputs (metrics.jsonl, tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak (no sparsity), FLOP/s. MFU divides by this whatever the precision (FP8 included),
# so that numbers stay comparable across precisions.
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The accelerator's dense bf16 peak, or None where MFU is not meaningful (CPU, unknown GPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        if "PCIe" in name:
            return PEAK_BF16_FLOPS["H100 PCIe"]
        return PEAK_BF16_FLOPS["H100 NVL"] if "NVL" in name else PEAK_BF16_FLOPS["H100 SXM"]
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * n_devices)


class MetricsWriter:
    """One JSON line per step in metrics.jsonl (plus one for a step whose end saved a checkpoint, with the save's
    timings: :func:`read_metrics` merges them), and the same scalars in tensorboard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_after: int | None = None) -> None:
        """``purge_after``: a resumed run's step; tensorboard drops the events logged after it (they are recomputed)."""
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if purge_after is None else purge_after + 1
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as one dict per step, in step order: the step's row merged with the line a checkpoint save
    wrote for that step (its ``checkpoint_s`` / ``checkpoint_stall_s``, written after the row so that a kill during
    the save cannot lose the row)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            steps.setdefault(int(row["step"]), {}).update(row)
    return [steps[k] for k in sorted(steps)]
