"""The console filters drop each library notice by its exact text and library, and nothing else
(tplus_dist/console.py); the progress bar stays out of a stream that is not a terminal."""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import pytest

from tplus_dist.console import (
    DEEPSPEED_ACCELERATOR,
    is_terminal,
    quiet_library_notices,
    quiet_stdout,
)

TE_APEX = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
CUDA_CONN = (
    "When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS "
    "to 1 for maximum speedup"
)
ALL_GATHER = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single`"
)


def shown(
    rank: int, cuda: bool, monkeypatch: pytest.MonkeyPatch, *emitted: tuple[str, type[Warning], str]
) -> list[str]:
    """The messages that pass the filters, each warning emitted twice as if from ``module``."""
    monkeypatch.setenv("RANK", str(rank))
    with warnings.catch_warnings(record=True) as caught:  # (restores the process's filters afterwards)
        warnings.resetwarnings()
        warnings.simplefilter("default")
        quiet_library_notices(cuda=cuda)
        for message, category, module in emitted:
            for line in (1, 2):  # two call sites: "once" still shows one
                warnings.warn_explicit(message, category, f"{module}.py", line, module=module)
    return [str(w.message) for w in caught]


def test_library_notices_that_do_not_concern_the_user_are_dropped_on_every_rank(monkeypatch):
    for rank in (0, 1):
        assert shown(rank, True, monkeypatch, (TE_APEX, UserWarning, "megatron.core.optimizer")) == []
        assert shown(rank, True, monkeypatch, (ALL_GATHER, FutureWarning, "torch.distributed.c10d_logger")) == []


def test_a_cuda_notice_shows_once_on_rank_0_with_cuda_and_never_without(monkeypatch):
    emitted = (CUDA_CONN, UserWarning, "megatron.core.tensor_parallel.layers")
    assert shown(0, True, monkeypatch, emitted) == [CUDA_CONN]
    assert shown(1, True, monkeypatch, emitted) == []
    assert shown(0, False, monkeypatch, emitted) == []


@pytest.mark.parametrize(
    "message, category, module",
    [
        ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning, "mymodel"),
        ("something else went wrong", UserWarning, "megatron.core.optimizer"),
        ("`torch.distributed.all_gather_into_tensor` is deprecated.", DeprecationWarning, "torch.distributed.x"),
        ("`torch.load` is deprecated. Please use weights_only", FutureWarning, "torch.distributed.c10d_logger"),
    ],
)
def test_every_other_warning_still_shows(message: str, category: type[Warning], module: str, monkeypatch):
    # the same words from another library, another warning of the same library, another category
    assert shown(1, False, monkeypatch, (message, category, module)) == [message, message]  # (two call sites)


def test_the_deepspeed_accelerator_notice_is_kept_on_rank_0_only(monkeypatch):
    logger = logging.getLogger("DeepSpeed")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():  # (the warning filters it also installs are restored afterwards)
            quiet_library_notices(cuda=False)
            for rank in (0, 1):
                monkeypatch.setenv("RANK", str(rank))
                logger.warning(DEEPSPEED_ACCELERATOR)
                logger.warning("a real DeepSpeed warning")
    finally:
        logger.removeHandler(handler)
    assert records == [DEEPSPEED_ACCELERATOR, "a real DeepSpeed warning", "a real DeepSpeed warning"]


def test_quiet_stdout_drops_only_the_named_lines(capsys):
    with quiet_stdout():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("an ordinary line")
        print("DeepSpeed built successfully, but this is not the line")
        print("partial", end="")
    assert (
        capsys.readouterr().out == "an ordinary line\nDeepSpeed built successfully, but this is not the line\npartial"
    )


def test_a_stream_that_is_not_a_terminal_is_told_apart():
    assert not is_terminal(io.StringIO())

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert is_terminal(Tty())


def test_the_progress_bar_stays_out_of_a_redirected_log(capsys) -> None:
    """Before, tqdm wrote a carriage-return update per step into a redirected stderr (SLURM's log)."""
    from tplus_dist.train.hooks import ConsoleHook

    class Trainer:  # what ConsoleHook reads of the trainer
        total_steps = 30
        seq_len = 64

        class state:
            step = 0

    def metrics(step: int) -> dict[str, Any]:
        return {"step": step, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0}

    for stream, terminal in ((io.StringIO(), False), (_Tty(), True)):
        hook = ConsoleHook(interval=10, progress=True, stream=stream)
        trainer: Any = Trainer()
        trainer.state.step = 0
        hook.on_fit_start(trainer)
        for step in range(1, 31):
            trainer.state.step = step
            hook.on_step_end(trainer, metrics(step))
        hook.on_fit_end(trainer)
        text = stream.getvalue()
        lines = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()]
        assert lines == ["step 1", "step 10", "step 20", "step 30"]  # the log interval (and the first step)
        if terminal:
            assert "\r" in text  # a terminal still gets its live bar
        else:
            assert text == "" and "\r" not in text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prepare_draws_no_bar_into_a_redirected_stderr(tmp_path, capfd) -> None:
    """`tplus prepare` (and a run preparing its corpus) wrote its tqdm bar into a log that is not a terminal."""
    from tplus_dist.data.prepare import prepare

    (tmp_path / "doc.txt").write_text("hello world, " * 200)
    prepare([str(tmp_path / "doc.txt")], "bytes", 16, tmp_path / "out", progress=True)
    err = capfd.readouterr().err  # a pipe here, as in a SLURM log
    assert "\r" not in err and "prepare:" not in err
