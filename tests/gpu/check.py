"""`make gpu-check`: every GPU path of the project proven in one command of at most eight minutes, one table at the end.

On a GPU host with the kit (``source .gpu/setup.sh``, ../shared/gpu/README.md) it runs, each step in its own
subprocess (a crash or a hang is one failed row) under its own time cap, all of them under one deadline:

1. ``pytest -m gpu tests/gpu`` (the junit XML read back: a row of counts and a row per failed test);
2. the loss comparison: the 125M preset (configs/models/llama-125m.yaml) trained for 200 steps on the prepared
   corpus (Python's documentation, byte-level tokens, as configs/tiny.yaml) in bf16 with the torch provider, then with
   the te provider in bf16 and in each FP8 recipe; each run's final loss (the mean of its last 10 steps' training
   losses: every run sees the same batches in the same order) within 1% of the bf16 torch run's;
3. `tplus bench` for the 1.1B preset (configs/models/llama-1.1b.yaml) with the providers nanogpt-compile (the plain
   reference), torch-compile, te-bf16 and te-fp8-delayed/current/block, one process per row, one after the other:
   tokens/s, MFU against the bf16 peak, peak memory, and the issue's goals against nanogpt-compile (te-bf16 >= 1.15x
   and >= 57% MFU; te-fp8 >= 1.4x and >= 70%) as met / not met: a benchmark, not a pass or fail of the check.

Steps 1 and 2 run side by side (the GPU has room for them, and their minutes are mostly start-up); the benchmark rows
run alone. The table is also written as JSON and markdown under --out (default $TPLUS_GPU_ARTIFACTS, else
runs/gpu-check), to be committed (BENCHMARKS.md takes the markdown).

``--dry-run`` (CPU, CI: tests/unit/test_gpu_check.py) does everything that needs no CUDA: parses the arguments, builds
every command, loads and validates every config a step will run with the project's own loader (a wrong override name
fails here, not on the GPU), checks the 1.1B preset's shape against the issue's, does the time-budget arithmetic,
collects tests/gpu (an import error there fails here), and prints the table with ``dry`` rows. Exit status: 0 when no
row failed, 1 otherwise, 2 for bad arguments or a plan that does not fit the budget."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script (tests/gpu/run.sh): the project must import
    sys.path.insert(0, str(ROOT))

BUDGET_S = 480.0
"""The whole check: eight minutes (issue 16), after ``source .gpu/setup.sh``."""
PYTEST_CAP_S = 180.0
LOSS_CAP_S = 140.0
"""Each loss run, from its start (they run side by side, beside pytest): start-up, 200 steps of the 125M preset."""
PREPARE_CAP_S = 30.0
"""Preparing the corpus once before the loss runs start (they would otherwise race to prepare it)."""
BENCH_CAP_S = {"nanogpt-compile": 75.0, "torch-compile": 75.0}
"""Per benchmark row; the compiled rows spend most of theirs in torch.compile."""
BENCH_CAP_DEFAULT_S = 32.0
LOSS_TOLERANCE = 0.01
"""Final loss of each run within 1% of the bf16 torch run's (issue 16)."""
LOSS_TAIL = 10
"""The final loss is the mean over this many last steps (a single batch's loss is noisier than FP8's effect)."""

LOSS_PRESET = "configs/models/llama-125m.yaml"
LOSS_RUNS: dict[str, list[str]] = {
    "bf16": ["--model.provider=torch", "--precision.fp8=none"],
    "te-bf16": ["--model.provider=te", "--precision.fp8=none"],
    "fp8-delayed": ["--model.provider=te", "--precision.fp8=delayed"],
    "fp8-current": ["--model.provider=te", "--precision.fp8=current"],
    "fp8-block": ["--model.provider=te", "--precision.fp8=block"],
}
"""The loss comparison's runs: the bf16 torch run is the reference; the te bf16 run separates the provider's effect
from FP8's."""
LOSS_REFERENCE = "bf16"

BENCH_MODEL = "llama-1.1b"
BENCH_SHAPE = {"d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "d_ff": 8192, "vocab_size": 32000}
"""The 1.1B preset the issue names (and ../shared/gpu/README.md measured): checked against the preset in every run."""
BENCH_SEQ, BENCH_MICRO = 2048, 8
BENCH_PROVIDERS = ("nanogpt-compile", "torch-compile", "te-bf16", "te-fp8-delayed", "te-fp8-current", "te-fp8-block")
BENCH_REFERENCE = "nanogpt-compile"
GOALS = {"te-bf16": (1.15, 0.57), "te-fp8": (1.4, 0.70)}
"""(tokens/s ratio to nanogpt-compile, MFU against the bf16 peak) each te row should reach: issue 16's goals."""


def loss_overrides(name: str, run_dir: Path, steps: int) -> list[str]:
    """The `tplus train` overrides of one loss run: the 125M preset on the pydoc corpus (byte-level tokens, as
    configs/tiny.yaml), seq 256 x micro-batch 16 (4096 tokens a step: FP8 GEMMs need multiples of 16, and 200 steps
    take seconds), bf16 autocast, no evaluation, no checkpoint, its own run directory."""
    return [
        f"--train.steps={steps}",
        "--train.seq_len=256",
        "--train.micro_batch_size=16",
        "--train.device=cuda",
        "--train.eval_interval=0",
        "--train.log_interval=50",
        "--train.seed=1234",
        "--optim.lr=1.0e-3",
        "--schedule.warmup_steps=20",
        "--schedule.min_lr=1.0e-4",
        "--data.source=builtin:pydoc",
        "--data.tokenizer=bytes",
        "--precision.dtype=bf16",
        "--checkpoint.at_end=false",
        "--checkpoint.resume=none",
        "--log.tensorboard=false",
        "--log.progress=false",
        f"--log.name=gpu-check-{name}",
        f"--log.run_dir={run_dir}",
        *LOSS_RUNS[name],
    ]


@dataclass
class Step:
    """One row's work: a command run in its own process group under ``cap_s`` seconds."""

    name: str
    kind: str
    """pytest | loss | bench"""
    cmd: list[str]
    cap_s: float
    log: Path
    config: tuple[str, list[str]] | None = None
    """(config path, overrides) the command loads: validated by the dry run with the real loader."""
    run_dir: Path | None = None
    provider: str | None = None


@dataclass
class Row:
    """One line of the table."""

    step: str
    status: str
    """pass | fail | skipped | dry | met | not met (the last two: benchmark goals, not the check's verdict)"""
    figures: str = ""
    seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def plan(args: argparse.Namespace, out: Path) -> list[Step]:
    """Every step the check will run, in order, for ``--only``; pure (builds commands, starts nothing)."""
    py = sys.executable
    steps: list[Step] = []
    if "pytest" in args.only:
        cmd = [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={out / 'pytest.xml'}", *args.pytest_args]  # fmt: skip
        steps.append(Step("pytest -m gpu tests/gpu", "pytest", cmd, PYTEST_CAP_S, out / "logs" / "pytest.log"))
    if "loss" in args.only:
        for name in args.loss_runs:
            run_dir = out / "loss" / name
            over = loss_overrides(name, run_dir, args.loss_steps)
            cmd = [py, "-m", "tplus_dist", "train", str(ROOT / LOSS_PRESET), *over]
            steps.append(Step(f"loss {name}", "loss", cmd, LOSS_CAP_S, out / "logs" / f"loss-{name}.log",
                              config=(str(ROOT / LOSS_PRESET), over), run_dir=run_dir))  # fmt: skip
    if "bench" in args.only:
        from tplus_dist.bench import provider_overrides

        for p in args.providers:
            cmd = [py, "-m", "tplus_dist", "bench", "--model", BENCH_MODEL, "--provider", p, "--json",
                   "--seq-len", str(BENCH_SEQ), "--batch-size", str(BENCH_MICRO), "--steps", str(args.bench_steps),
                   "--repeats", str(args.bench_repeats)]  # fmt: skip
            cap = BENCH_CAP_S.get(p, BENCH_CAP_DEFAULT_S)
            steps.append(Step(f"bench {p}", "bench", cmd, cap, out / "logs" / f"bench-{p}.log",
                              config=(f"models/{BENCH_MODEL}.yaml", provider_overrides(p)), provider=p))  # fmt: skip
    return steps


def budget(steps: list[Step], serial: bool) -> dict[str, float]:
    """The worst case in seconds: pytest beside the loss runs (all side by side unless ``serial``), then the
    benchmark rows one after the other. Every cap is an upper bound, so the check ends within ``total``."""
    side = [s.cap_s for s in steps if s.kind in ("pytest", "loss")]
    prepare = PREPARE_CAP_S if any(s.kind == "loss" for s in steps) else 0.0
    loss_caps = [s.cap_s for s in steps if s.kind == "loss"]
    pytest_caps = [s.cap_s for s in steps if s.kind == "pytest"]
    # side by side, pytest starts at once and the loss runs after the corpus is prepared
    side_by_side = max(max(pytest_caps, default=0.0), prepare + max(loss_caps, default=0.0))
    first = prepare + sum(side) if serial else side_by_side
    bench = sum(s.cap_s for s in steps if s.kind == "bench")
    return {"prepare": prepare, "pytest_and_loss": first, "bench": bench, "total": first + bench}


# ---------------------------------------------------------------------------------------------- the dry run's checks


def validate(step: Step) -> str:
    """Load ``step``'s config with the project's loader (raises ConfigError naming the field); a one-line summary."""
    from tplus_dist.config import load_config

    assert step.config is not None
    path, overrides = step.config
    cfg = load_config(path, overrides)
    m = cfg.model
    if step.kind == "bench":
        got = {k: getattr(m, k) for k in BENCH_SHAPE}
        if got != BENCH_SHAPE or m.seq_len != BENCH_SEQ or m.activation != "swiglu":
            raise ValueError(f"configs/models/{BENCH_MODEL}.yaml is {got} (seq {m.seq_len}, {m.activation}), "
                             f"not the issue's 1.1B shape {BENCH_SHAPE} (seq {BENCH_SEQ}, swiglu)")  # fmt: skip
    fp8 = getattr(cfg.precision, "fp8", "none")
    return f"config ok: {m.provider}, fp8 {fp8}, {m.n_layers}x{m.d_model}, seq {cfg.seq_len}"


def collect_gpu_tests() -> Row:
    """`pytest --collect-only tests/gpu`: the GPU tests import and collect here (on CPU they are then skipped)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    took = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    n = sum(1 for line in lines if "::" in line)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        return Row("collect tests/gpu", "fail", (lines or ["(no output)"])[-1], took)
    return Row("collect tests/gpu", "dry", f"{n} GPU tests collect", took, {"tests": n})


def dry_rows(steps: list[Step]) -> list[Row]:
    rows = [collect_gpu_tests()] if any(s.kind == "pytest" for s in steps) else []
    for s in steps:
        try:
            text = validate(s) if s.config is not None else "command built"
            rows.append(Row(s.name, "dry", f"{text}; cap {s.cap_s:.0f} s", None, {"cmd": s.cmd}))
        except Exception as e:  # ConfigError (naming the field), or the preset's shape
            rows.append(Row(s.name, "fail", f"{type(e).__name__}: {e}", None, {"cmd": s.cmd}))
    return rows


# ---------------------------------------------------------------------------------------------------- running


class Running:
    """A step's process (its own session, so a timeout kills everything it started) and its log."""

    def __init__(self, step: Step, timeout_s: float) -> None:
        self.step = step
        self.timeout_s = timeout_s
        step.log.parent.mkdir(parents=True, exist_ok=True)
        self.log = step.log.open("w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))  # reruns reuse compiled kernels
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        self.timed_out = False
        self.seconds: float | None = None

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is None and time.perf_counter() - self.t0 > self.timeout_s:
            self.kill()
            self.timed_out = True
            rc = self.proc.wait()
        if rc is not None:
            self.seconds = time.perf_counter() - self.t0
            self.log.close()
        return rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group it started (compile workers, spawned ranks)
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, n: int = 1) -> str:
        lines = [line for line in self.step.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-n:]) if lines else "(no output)"


def run_all(procs: list[Running]) -> dict[str, Running]:
    """Wait for every process; each is killed at its own timeout."""
    done: dict[str, Running] = {}
    while len(done) < len(procs):
        for r in procs:
            if r.step.name not in done and r.poll() is not None:
                done[r.step.name] = r
        time.sleep(0.2)
    return done


def pytest_rows(r: Running, junit: Path) -> list[Row]:
    """A row of counts, then one per failed or errored test (every test's result goes to the JSON)."""
    took = r.seconds
    if r.timed_out:
        return [Row(r.step.name, "fail", f"timed out after {r.timeout_s:.0f} s: {r.tail()}", took)]
    if not junit.is_file():
        return [Row(r.step.name, "fail", f"exit {r.proc.returncode}, no junit XML: {r.tail()}", took)]
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tests.append({"test": name, "result": kind, "seconds": float(case.get("time", 0)), "message": message})
    count = {k: sum(t["result"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    bad = count["failure"] + count["error"]
    text = f"{count['passed']} passed, {count['failure']} failed, {count['error']} errors, {count['skipped']} skipped"
    ok = bad == 0 and r.proc.returncode in (0, 5) and count["passed"] > 0
    rows = [Row(r.step.name, "pass" if ok else "fail", text, took, {"tests": tests, "exit": r.proc.returncode})]
    for t in tests:
        if t["result"] in ("failure", "error"):
            first = (t["message"].splitlines() or [""])[0][:160]
            rows.append(Row(f"  {t['test'].split('.')[-1]}", "fail", first, t["seconds"]))
    return rows


def final_loss(run_dir: Path) -> tuple[float, int]:
    """The mean of the last LOSS_TAIL steps' training losses in run_dir/metrics.jsonl, and the last step."""
    from tplus_dist.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss")
    tail = [float(r["loss"]) for r in rows[-LOSS_TAIL:]]
    return sum(tail) / len(tail), int(rows[-1]["step"])


def loss_rows(done: dict[str, Running], steps: list[Step], expected_steps: int) -> list[Row]:
    """Each loss run's final loss and its relative difference to the bf16 torch run's (within 1%: pass)."""
    losses: dict[str, float] = {}
    rows = []
    for s in steps:
        r = done[s.name]
        if r.timed_out or r.proc.returncode != 0:
            why = f"timed out after {r.timeout_s:.0f} s" if r.timed_out else f"exit {r.proc.returncode}"
            rows.append(Row(s.name, "fail", f"{why}: {r.tail()}", r.seconds))
            continue
        try:
            assert s.run_dir is not None
            loss, last = final_loss(s.run_dir)
        except (OSError, ValueError) as e:
            rows.append(Row(s.name, "fail", str(e), r.seconds))
            continue
        if last != expected_steps or not math.isfinite(loss):
            rows.append(Row(s.name, "fail", f"ended at step {last} with loss {loss}", r.seconds))
            continue
        losses[s.name] = loss
        rows.append(Row(s.name, "pass", f"final loss {loss:.4f}", r.seconds, {"loss": loss, "steps": last}))
    ref = losses.get(f"loss {LOSS_REFERENCE}")
    for row in rows:
        if row.status != "pass" or row.step == f"loss {LOSS_REFERENCE}":
            continue
        if ref is None:
            row.status, row.figures = "fail", row.figures + f"; no {LOSS_REFERENCE} reference to compare with"
            continue
        rel = (row.data["loss"] - ref) / ref
        row.data["relative_to_bf16"] = rel
        ok = abs(rel) <= LOSS_TOLERANCE
        row.status = "pass" if ok else "fail"
        row.figures += f" ({100 * rel:+.2f}% of bf16 {ref:.4f}, limit {100 * LOSS_TOLERANCE:.0f}%)"
    return rows


def bench_row(r: Running) -> Row:
    if r.timed_out:
        return Row(r.step.name, "fail", f"timed out after {r.timeout_s:.0f} s: {r.tail()}", r.seconds)
    lines = [line for line in r.step.log.read_text(errors="replace").splitlines() if line.startswith("{")]
    if r.proc.returncode != 0 or not lines:
        return Row(r.step.name, "fail", f"exit {r.proc.returncode}: {r.tail()}", r.seconds)
    data = json.loads(lines[-1])
    if "unavailable" in data:
        return Row(r.step.name, "fail", f"unavailable: {data['unavailable']}", r.seconds, data)
    mfu = data.get("mfu")
    text = (f"{data['tokens_per_s']:,.0f} tok/s, MFU {100 * mfu:.1f}%" if isinstance(mfu, float)
            else f"{data['tokens_per_s']:,.0f} tok/s, MFU -") + f", peak {data['peak_memory_gb']:.1f} GB"  # fmt: skip
    return Row(r.step.name, "pass", text, r.seconds, data)


def goal_rows(bench: list[Row]) -> list[Row]:
    """Each te row's tokens/s ratio to nanogpt-compile and MFU against issue 16's goals: ``met`` / ``not met``
    (a benchmark: these rows never fail the check)."""
    by = {r.step.removeprefix("bench "): r for r in bench if r.status == "pass"}
    ref = by.get(BENCH_REFERENCE)
    rows = []
    for p, r in by.items():
        if p == BENCH_REFERENCE:
            continue
        ratio = r.data["tokens_per_s"] / ref.data["tokens_per_s"] if ref else None
        r.data["ratio_to_reference"] = ratio
        if ratio is not None:
            r.figures += f", {ratio:.2f}x {BENCH_REFERENCE}"
        goal = GOALS.get("te-fp8" if p.startswith("te-fp8") else p)
        if goal is None:
            continue
        want_ratio, want_mfu = goal
        mfu = r.data.get("mfu")
        if ratio is None or not isinstance(mfu, float):
            rows.append(Row(f"goal {p}", "not met", f"cannot tell: no {BENCH_REFERENCE} row or no MFU"))
            continue
        met = ratio >= want_ratio and mfu >= want_mfu
        text = f"{ratio:.2f}x (goal {want_ratio}x), MFU {100 * mfu:.1f}% (goal {100 * want_mfu:.0f}%)"
        rows.append(Row(f"goal {p}", "met" if met else "not met", text))
    return rows


def prepare_corpus(steps: list[Step]) -> Row | None:
    """Prepare the loss runs' corpus once (CPU work, seconds), so that runs starting together do not race."""
    first = next((s for s in steps if s.kind == "loss"), None)
    if first is None or first.config is None:
        return None
    t0 = time.perf_counter()
    try:
        from tplus_dist.config import load_config
        from tplus_dist.train.run import ensure_prepared

        path = ensure_prepared(load_config(*first.config))
    except Exception as e:
        return Row("prepare corpus", "fail", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
    return Row("prepare corpus", "pass", path, time.perf_counter() - t0)


def execute(steps: list[Step], args: argparse.Namespace, out: Path) -> list[Row]:
    """Run the plan: pytest and the loss runs side by side (or one after another with --serial), then the
    benchmark rows one at a time; every step under min(its cap, what is left of the budget)."""
    deadline = time.perf_counter() + args.budget

    def left() -> float:
        return deadline - time.perf_counter()

    rows: list[Row] = []
    first = [s for s in steps if s.kind in ("pytest", "loss")]
    for s in first:
        if s.run_dir is not None and s.run_dir.exists():
            shutil.rmtree(s.run_dir)  # a fresh run every time (an old one would be resumed or renamed)
    done: dict[str, Running] = {}
    pytest_steps = [s for s in first if s.kind == "pytest"]
    loss_steps = [s for s in first if s.kind == "loss"]
    if args.serial:
        for s in pytest_steps:
            done |= run_all([Running(s, min(s.cap_s, left()))])
        prep = prepare_corpus(loss_steps)
        for s in loss_steps if prep is None or prep.status == "pass" else []:
            done |= run_all([Running(s, min(s.cap_s, left()))])
    else:
        started = [Running(s, min(s.cap_s, left())) for s in pytest_steps]
        prep = prepare_corpus(loss_steps)
        if prep is None or prep.status == "pass":
            started += [Running(s, min(s.cap_s, left())) for s in loss_steps]
        done = run_all(started)
    for s in pytest_steps:
        rows += pytest_rows(done[s.name], out / "pytest.xml")
    if prep is not None:
        rows.append(prep)
    if loss_steps and (prep is None or prep.status == "pass"):
        rows += loss_rows(done, loss_steps, args.loss_steps)
    else:
        rows += [Row(s.name, "skipped", "the corpus was not prepared") for s in loss_steps]
    bench: list[Row] = []
    for s in (s for s in steps if s.kind == "bench"):
        if left() < min(s.cap_s, 20.0):  # too little left for the row to mean anything
            bench.append(Row(s.name, "skipped", f"the {args.budget:.0f} s budget is spent"))
            continue
        bench.append(bench_row(run_all([Running(s, min(s.cap_s, left()))])[s.name]))
    rows += bench + goal_rows(bench)
    return rows


# ---------------------------------------------------------------------------------------------------- the table


def table_text(rows: list[Row]) -> str:
    """The plain-text table (step, status, figures, seconds), one row a line."""
    w = max([len(r.step) for r in rows] + [4])
    lines = [f"{'step':<{w}}  {'status':<8}  {'time s':>7}  figures", "-" * (w + 30)]
    for r in rows:
        t = f"{r.seconds:7.1f}" if r.seconds is not None else f"{'-':>7}"
        lines.append(f"{r.step:<{w}}  {r.status:<8}  {t}  {r.figures}")
    return "\n".join(lines)


def table_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    head = f"### gpu-check {meta['date']}, {meta['device']}\n\n" + "; ".join(
        f"{k} {v}" for k, v in meta.items() if k not in ("date", "device")
    )
    body = ["| step | status | time s | figures |", "|---|---|---|---|"]
    for r in rows:
        t = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        body.append(f"| {r.step.strip()} | {r.status} | {t} | {r.figures.replace('|', '/')} |")
    return head + "\n\n" + "\n".join(body) + "\n"


def environment(dry: bool) -> dict[str, Any]:
    """Where and with what the check ran (date, device, versions, commit)."""
    import importlib.metadata

    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device + (" (dry run)" if dry else ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "transformer_engine": version("transformer_engine"),
        "deepspeed": version("deepspeed"),
        "commit": commit.stdout.strip() or "unknown",
    }


def write_outputs(rows: list[Row], meta: dict[str, Any], out: Path, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, **extra, "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "gpu-check.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(table_markdown(rows, meta))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tests/gpu/check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: plan, validate every config, print dry rows")
    ap.add_argument("--out", default=None, help="where the JSON, markdown, logs and runs go "
                    "(default $TPLUS_GPU_ARTIFACTS, else runs/gpu-check)")  # fmt: skip
    ap.add_argument("--only", default="pytest,loss,bench", help="comma-separated steps: pytest, loss, bench")
    ap.add_argument("--providers", default=",".join(BENCH_PROVIDERS), help="benchmark rows (tplus bench providers)")
    ap.add_argument("--loss-runs", default=",".join(LOSS_RUNS), help=f"loss runs: {', '.join(LOSS_RUNS)}")
    ap.add_argument("--loss-steps", type=int, default=200)
    ap.add_argument("--bench-steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--bench-repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--serial", action="store_true", help="run pytest and the loss runs one after another")
    ap.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed on to pytest (last)")
    args = ap.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.providers = [p for p in args.providers.split(",") if p]
    args.loss_runs = [n for n in args.loss_runs.split(",") if n]
    from tplus_dist.bench import PROVIDERS

    for what, got, allowed in (
        ("--only", args.only, ("pytest", "loss", "bench")),
        ("--providers", args.providers, PROVIDERS),
        ("--loss-runs", args.loss_runs, tuple(LOSS_RUNS)),
    ):
        bad = [g for g in got if g not in allowed]
        if bad:
            ap.error(f"{what} {','.join(bad)}: not one of {', '.join(allowed)}")
    if "loss" in args.only and LOSS_REFERENCE not in args.loss_runs:
        args.loss_runs.insert(0, LOSS_REFERENCE)  # every loss run is compared with it
    if args.loss_steps <= LOSS_TAIL:
        ap.error(f"--loss-steps must be more than {LOSS_TAIL} (the final loss is the mean of the last {LOSS_TAIL})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # the configs' relative paths (data.cache_dir) mean the same here as in the steps' processes
    out = Path(args.out or os.environ.get("TPLUS_GPU_ARTIFACTS") or ROOT / "runs" / "gpu-check").resolve()
    steps = plan(args, out)
    b = budget(steps, args.serial)
    print(f"gpu-check: {len(steps)} steps, worst case {b['total']:.0f} s of the {args.budget:.0f} s budget "
          f"(pytest beside the loss runs {b['pytest_and_loss']:.0f} s, benchmark {b['bench']:.0f} s); "
          f"writing {out}", flush=True)  # fmt: skip
    if b["total"] > args.budget:
        print(f"gpu-check: the steps' caps add up to {b['total']:.0f} s, more than the budget "
              f"({args.budget:.0f} s): run fewer (--only, --providers, --loss-runs)", file=sys.stderr)  # fmt: skip
        return 2
    if args.dry_run:
        rows = [Row("budget", "dry", f"worst case {b['total']:.0f} s of {args.budget:.0f} s (pytest beside the loss "
                    f"runs {b['pytest_and_loss']:.0f} s, benchmark {b['bench']:.0f} s)", None, b)]  # fmt: skip
        rows += dry_rows(steps)
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: torch sees no CUDA device; use --dry-run on CPU", file=sys.stderr)
            return 2
        rows = execute(steps, args, out)
    meta = environment(args.dry_run)
    write_outputs(rows, meta, out, {"budget": b, "argv": sys.argv[1:] if argv is None else argv})
    print("\n" + table_text(rows), flush=True)
    print(f"\n{meta['date']}; {meta['device']}; torch {meta['torch']}; TE {meta['transformer_engine']}; "
          f"commit {meta['commit']}; {out / 'gpu-check.md'}", flush=True)  # fmt: skip
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
