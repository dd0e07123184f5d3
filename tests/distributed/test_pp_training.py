"""Pipeline parallelism (DeepSpeed's pipeline engine, 1F1B over gradient-accumulation micro-batches) alone and with
data and tensor parallelism computes what one process computes: the same losses and gradient norms over five
steps, and the same parameters afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_tp_training import UNEVEN, compare, distributed, single


def assert_short_last_validation_batch() -> None:
    """The whole val split of the test corpus (174 samples at seq_len 64) in batches of 4 ends with a short one (2
    samples): a pipeline fixes its activation shapes at first use, and a short batch used to make one stage fail
    while the other waited for it forever (issue 14)."""
    from tests.distributed.test_tp_training import BASE
    from tplus_dist.config import load_config
    from tplus_dist.data.loader import fetch_manifest
    from tplus_dist.train.run import ensure_prepared

    cfg = load_config("configs/tiny.yaml", BASE)
    samples = fetch_manifest(ensure_prepared(cfg), cfg.data.cache_dir)["splits"]["val"]["samples"]
    assert samples % cfg.train.micro_batch_size != 0, (samples, cfg.train.micro_batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_equals_one_process(tmp_path: Path, zero: int, tied: bool) -> None:
    model = [f"--model.tie_embeddings={str(tied).lower()}", "--model.z_loss=1e-4"]
    if zero == 1 and tied:  # validation over the whole split (a short last batch); uneven ignored targets
        model += ["--train.eval_interval=5", UNEVEN]
        assert_short_last_validation_batch()
    compare(
        single(tmp_path, "--train.grad_accum=4", *model),
        distributed(
            tmp_path,
            2,
            "--train.grad_accum=4",
            "--parallel.pipeline_parallel=2",
            f"--parallel.zero_stage={zero}",
            *model,
        ),
    )


@pytest.mark.slow
def test_pipeline_and_data_parallel_equal_one_process(tmp_path: Path) -> None:
    # PP 2 x DP 2: global batch 8 = 4 x 1 x 2 replicas; 2 micro-batches per replica keep the pipeline busy;
    # validation at step 5 runs through the pipeline engine's eval_batch: 5 samples in batches of 2, 2 and 1, dealt
    # to the replicas (2 + 1, and 2 + a stand-in without counted targets)
    ev = ["--train.eval_interval=5", "--train.eval_samples=5", "--model.z_loss=1e-4", UNEVEN]
    compare(
        single(tmp_path, "--train.micro_batch_size=2", "--train.grad_accum=4", *ev),
        distributed(
            tmp_path, 4, "--train.micro_batch_size=2", "--train.grad_accum=2", "--parallel.pipeline_parallel=2", *ev
        ),
    )


@pytest.mark.slow
def test_tensor_pipeline_layout_equals_one_process(tmp_path: Path) -> None:
    compare(
        single(tmp_path, "--train.grad_accum=2", "--model.qk_norm=rmsnorm", "--model.n_kv_heads=1"),
        distributed(
            tmp_path, 4, "--train.grad_accum=2", "--parallel.pipeline_parallel=2", "--parallel.tensor_parallel=2",
            "--model.qk_norm=rmsnorm", "--model.n_kv_heads=1",
        ),
    )  # fmt: skip


@pytest.mark.slow
def test_relative_bias_tables_per_layer_split_over_stages_and_heads(tmp_path: Path) -> None:
    # a T5 relative-bias table per layer: each stage holds its layers' tables, each TP rank its heads' columns
    model = ["--model.position=t5_bias", "--model.t5_bias_shared=false", "--model.n_kv_heads=2"]
    compare(
        single(tmp_path, "--train.grad_accum=2", *model),
        distributed(
            tmp_path, 4, "--train.grad_accum=2", "--parallel.pipeline_parallel=2", "--parallel.tensor_parallel=2",
            *model,
        ),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_interleaved_pipeline_equals_one_process(tmp_path: Path, zero: int) -> None:
    # 4 layers in 4 chunks: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3; the tied embedding spans ranks
    model = ["--model.tie_embeddings=true", "--model.z_loss=1e-4"]
    if zero == 0:  # validation with a short last batch, as above; uneven ignored targets
        model += ["--train.eval_interval=5", UNEVEN]
        assert_short_last_validation_batch()
    compare(
        single(tmp_path, "--train.grad_accum=4", *model),
        distributed(
            tmp_path, 2, "--train.grad_accum=4", "--parallel.pipeline_parallel=2",
            "--parallel.virtual_pipeline_stages=2", f"--parallel.zero_stage={zero}", *model,
        ),
    )  # fmt: skip


@pytest.mark.slow
def test_interleaved_pipeline_and_data_parallel_with_evaluation_equal_one_process(tmp_path: Path) -> None:
    # PP 2 x DP 2, 2 chunks per rank, untied; validation through the pipeline's forward-only schedule at steps 2, 4
    # and 5, between training steps (a schedule that shared stages with evaluation got step 3's gradient wrong)
    model = ["--model.tie_embeddings=false", "--train.eval_interval=2", "--train.eval_samples=5", UNEVEN]
    compare(
        single(tmp_path, "--train.micro_batch_size=2", "--train.grad_accum=4", *model),
        distributed(
            tmp_path, 4, "--train.micro_batch_size=2", "--train.grad_accum=2", "--parallel.pipeline_parallel=2",
            "--parallel.virtual_pipeline_stages=2", *model,
        ),
    )  # fmt: skip


@pytest.mark.slow
def test_interleaved_pipeline_with_a_growing_batch_equals_one_process(tmp_path: Path) -> None:
    # the micro-batch count grows 2 -> 4 during the run: each count gets its own schedule and stages
    ramp = [
        "--schedule.unit=tokens",
        "--schedule.warmup_steps=0",
        "--schedule.warmup_tokens=256",
        "--train.batch_ramp_tokens=512",
    ]
    batch = ["--train.micro_batch_size=2", "--train.grad_accum=4", "--train.batch_size_start=4"]
    batch += ["--train.batch_size_increment=4"]
    compare(
        single(tmp_path, *ramp, *batch),
        distributed(
            tmp_path, 2, *ramp, *batch, "--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline_stages=2"
        ),
    )
