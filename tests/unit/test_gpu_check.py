"""`make gpu-check`'s driver (tests/gpu/check.py) on CPU: its --dry-run for real (a subprocess that builds every
command, validates every config with the project's loader and prints the table), its budget arithmetic, the
benchmark goals, the final-loss reading, and the bench rows' overrides. The GPU minutes then go to GPU work only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import check
from tplus_dist.bench import provider_overrides
from tplus_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_plans_and_validates_every_step(tmp_path: Path) -> None:
    """The dry run as `make gpu-check-dry` starts it: exit 0, one table whose rows are the plan (the collect, the
    budget, pytest, five loss runs, six benchmark rows), every loss and bench config validated, JSON and markdown
    written with the commands the GPU run would start."""
    proc = subprocess.run([sys.executable, "tests/gpu/check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("\n\n")[1].splitlines()
    assert table[0].split() == ["step", "status", "time", "s", "figures"]
    names = [line[: line.index("  ")] for line in table[2:]]
    assert names == [
        "budget", "collect tests/gpu", "pytest -m gpu tests/gpu",
        "loss bf16", "loss te-bf16", "loss fp8-delayed", "loss fp8-current", "loss fp8-block",
        "bench nanogpt-compile", "bench torch-compile", "bench te-bf16", "bench te-fp8-delayed",
        "bench te-fp8-current", "bench te-fp8-block",
    ]  # fmt: skip
    for line in table[2:]:
        assert "  dry  " in line, line
    for line in table[5:]:
        assert "config ok" in line, line
    assert "fp8 block, 12x768, seq 256" in table[9] and "te, fp8 current, 16x2048, seq 2048" in table[14]

    data = json.loads((tmp_path / "gpu-check.json").read_text())
    rows = {r["step"]: r for r in data["rows"]}
    assert data["budget"]["total"] <= 480
    loss_cmd = rows["loss fp8-delayed"]["data"]["cmd"]
    assert loss_cmd[1:4] == ["-m", "tplus_dist", "train"] and loss_cmd[4].endswith("configs/models/llama-125m.yaml")
    assert {"--model.provider=te", "--precision.fp8=delayed", "--train.steps=200"} <= set(loss_cmd)
    bench_cmd = rows["bench te-fp8-block"]["data"]["cmd"]
    assert bench_cmd[bench_cmd.index("--provider") + 1] == "te-fp8-block"
    assert bench_cmd[bench_cmd.index("--model") + 1] == "llama-1.1b"
    assert (
        bench_cmd[bench_cmd.index("--seq-len") + 1] == "2048" and bench_cmd[bench_cmd.index("--batch-size") + 1] == "8"
    )
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| bench te-fp8-block | dry |" in md and "(dry run)" in md


def test_a_wrong_override_fails_the_dry_run(tmp_path: Path) -> None:
    """The dry run's validation is the real loader: an override naming no field raises, naming it."""
    args = check.parse_args(["--dry-run", "--only", "loss", "--loss-runs", "fp8-block"])
    step = check.plan(args, tmp_path)[1]
    assert step.name == "loss fp8-block" and step.config is not None
    assert check.validate(step).startswith("config ok: te, fp8 block")
    bad = check.Step(step.name, step.kind, step.cmd, step.cap_s, step.log, (step.config[0], ["--precision.fp9=block"]))
    with pytest.raises(ConfigError, match="fp9"):
        check.validate(bad)
    (row,) = check.dry_rows([bad])
    assert row.status == "fail" and "fp9" in row.figures


def test_budget_arithmetic(tmp_path: Path) -> None:
    """Side by side: max(pytest 180, prepare 30 + a loss run 140) = 180, then the bench rows one after another
    (two compiled rows of 75, four te rows of 32) = 278: 458 s. In series the pytest and loss caps add up. A budget
    below the plan's worst case stops the check before it starts (exit 2)."""
    steps = check.plan(check.parse_args([]), tmp_path)
    assert check.budget(steps, serial=False) == {"prepare": 30.0, "pytest_and_loss": 180.0, "bench": 278.0,
                                                  "total": 458.0}  # fmt: skip
    assert check.budget(steps, serial=True)["pytest_and_loss"] == 30 + 180 + 5 * 140
    assert check.main(["--dry-run", "--only", "bench", "--budget", "200", "--out", str(tmp_path)]) == 2


def test_goal_rows_against_the_issue() -> None:
    """te-bf16 needs >= 1.15x nanogpt-compile's tokens/s and >= 57% MFU; each te-fp8 row >= 1.4x and >= 70%."""

    def bench(p: str, tps: float, mfu: float) -> check.Row:
        return check.Row(f"bench {p}", "pass", "", 1.0, {"tokens_per_s": tps, "mfu": mfu})

    rows = [bench("nanogpt-compile", 70_000, 0.50), bench("torch-compile", 72_000, 0.51),
            bench("te-bf16", 81_200, 0.58), bench("te-fp8-delayed", 95_000, 0.72), bench("te-fp8-block", 99_000, 0.69),
            check.Row("bench te-fp8-current", "fail", "timed out")]  # fmt: skip
    goals = {r.step: (r.status, r.figures) for r in check.goal_rows(rows)}
    assert list(goals) == ["goal te-bf16", "goal te-fp8-delayed", "goal te-fp8-block"]
    assert goals["goal te-bf16"][0] == "met" and goals["goal te-bf16"][1].startswith("1.16x")  # 81.2 / 70
    assert goals["goal te-fp8-delayed"][0] == "not met"  # 95 / 70 = 1.357x < 1.4x (MFU 72% would do)
    assert goals["goal te-fp8-block"][0] == "not met"  # 1.414x, but MFU 69% < 70%
    assert "1.03x nanogpt-compile" in rows[1].figures  # the ratio also goes into the row's figures


def test_final_loss_is_the_mean_of_the_last_steps(tmp_path: Path) -> None:
    """metrics.jsonl's last ten training losses, averaged (a checkpoint's extra line merges into its step)."""
    lines = [json.dumps({"step": s, "loss": 10.0 - 0.1 * s}) for s in range(1, 21)]
    lines.append(json.dumps({"step": 20, "checkpoint_s": 1.5}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    loss, last = check.final_loss(tmp_path)
    assert last == 20
    assert loss == pytest.approx(sum(10.0 - 0.1 * s for s in range(11, 21)) / 10)


def test_bench_rows_overrides() -> None:
    """The te rows load the preset with the te provider, bf16 and their recipe; the others as it is."""
    assert provider_overrides("te-fp8-current") == ["--model.provider=te", "--precision.dtype=bf16",
                                                    "--precision.fp8=current"]  # fmt: skip
    assert provider_overrides("te-bf16")[-1] == "--precision.fp8=none"
    assert provider_overrides("nanogpt-compile") == [] and provider_overrides("torch-eager") == []
    with pytest.raises(ValueError, match="te-fp16"):
        provider_overrides("te-fp16")


def test_te_rows_say_why_they_cannot_run_on_cpu() -> None:
    """On CPU a te row is not measured: the row says why (Transformer Engine, or CUDA, missing)."""
    import torch

    from tplus_dist.bench import measure_one
    from tplus_dist.config import load_config

    run = load_config("models/tiny.yaml", provider_overrides("te-fp8-delayed"))
    row = measure_one(run.model, "te-fp8-delayed", 2, 16, 1, 1, torch.device("cpu"), None, run)
    assert set(row) == {"provider", "unavailable"} and row["unavailable"], row
    assert "issue 6" not in str(row["unavailable"])
