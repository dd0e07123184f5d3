"""Sequence parallelism (parallel.sequence_parallel, Megatron SP through megatron-core's layers) computes what one
process computes: the same losses, gradient norms and final parameters over five steps (within the tensor-parallel
tests' fp32 bounds, tplus_dist/tolerances.py), for model choices that touch every sequence-parallel piece; and each
rank keeps about 1/TP of the one-process activations of the decoder layers (measured: bytes saved for backward),
where plain tensor parallelism keeps the norms' and the residual stream's whole.

The expected values come from one process, which never runs any sequence-parallel code (the torch provider). Each
world size runs all its cases in one spawn (groups torn down between cases, the world kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_conditioning_tp import give_modulation_values
from tests.distributed.test_tp_training import BASE, CHOICES, UNEVEN, compare, run_and_gather, single
from tplus_dist.config import load_config
from tplus_dist.spawn import run_distributed
from tplus_dist.tolerances import Fp32Run

SP = ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"]

# Choices that change what crosses the sequence split, each run trained 5 steps (grad_accum 2) under TP 2 + SP:
# replicated kv projection (gathered input), biases (row-parallel biases summed over the ranks), LayerNorm gains and
# biases, the embedding norm, a parallel block, ALiBi + sliding windows (attention on the whole sequence); T5's shared
# bias (the whole length in a part after the embedding), sandwich norms, tied head, z-loss, uneven targets (extended).
TRAIN = {
    "mqa-bias-layernorm-embednorm-parallel-alibi-window": [
        "--model.n_kv_heads=1",
        "--model.linear_bias=true",
        "--model.norm=layernorm",
        "--model.norm_bias=true",
        "--model.embed_norm=true",
        "--model.block=parallel",
        "--model.position=alibi",
        "--model.sliding_window=16",
        "--model.layer_pattern=[local, global]",
        "--model.tie_embeddings=false",
    ],
}
# the same in the extended set (the main set's time is spent)
TRAIN_MORE = {
    "t5-shared-sandwich-tied-zloss-uneven": [
        "--model.position=t5_bias",
        "--model.t5_bias_buckets=8",
        "--model.t5_bias_max_distance=32",
        "--model.norm_placement=sandwich",
        "--model.z_loss=1e-4",
        "--train.eval_interval=5",
        UNEVEN,
    ],
}
# adaLN (modulation summed over the ranks) with Shaw's relative positions: one forward and backward, the gradients of
# the conditioning parameters compared (they start at zero in training, so a 5-step run would barely use them)
ADALN = ["--model.adaln=adaln_zero", "--model.n_conditions=3", "--model.n_kv_heads=2", "--model.position=shaw"]

Job = tuple[str, list[str]]

FULL = ["--parallel.recompute_granularity=full", "--parallel.recompute_method=uniform"]
SELECTIVE = [
    "--parallel.recompute_granularity=selective",
    "--parallel.recompute_modules=[core_attn, mlp_act, layernorm]",
]


def conditioned_grads(overrides: list[str]) -> dict[str, Any]:
    """Loss and the adaLN / label-embedding / norm gradients of one forward and backward (fixed tokens, labels and
    modulation values)."""
    from tplus_dist.train.run import build_decoder, seed_everything, setup_layout

    cfg = load_config("configs/tiny.yaml", [*BASE, *overrides])
    layout = setup_layout(cfg, torch.device("cpu"))
    seed_everything(cfg.train.seed)
    model = build_decoder(cfg, layout, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    give_modulation_values(model, gen)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=gen)
    loss, _ = model.loss(model(tokens[:, :-1], torch.tensor([0, 1, 2, 1])), tokens[:, 1:])
    loss.backward()
    # parameters whole on every rank, used on each rank's part of the sequence (or, Shaw's, by each rank's heads)
    wanted = (".ada.weight", ".ada.bias", "cond_embed.weight", "norm1.weight", "final_norm.weight", "shaw.keys")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(wanted)}
    return {"loss": float(loss.detach()), "grads": grads}


def layer_activation_bytes(overrides: list[str]) -> int:
    """Bytes the decoder layers save for backward on this rank (tplus_dist/memory.py), for 4 sequences of 64 tokens:
    the embedding, head and loss left out (their split is the vocabulary's, the same with and without SP)."""
    from tplus_dist.memory import saved_tensor_bytes
    from tplus_dist.train.run import build_decoder, seed_everything, setup_layout

    cfg = load_config("configs/tiny.yaml", [*BASE, *overrides])
    layout = setup_layout(cfg, torch.device("cpu"))
    seed_everything(cfg.train.seed)
    model: Any = build_decoder(cfg, layout, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 64), generator=torch.Generator().manual_seed(3))
    x = model.embed_tokens(tokens)

    def layers() -> None:
        h = x
        for layer in model.layers.values():
            h = layer(h)

    return saved_tensor_bytes(layers, exclude=list(model.buffers()))


def _rank(rank: int, world: int, jobs: list[Job], out: str) -> None:
    """Every job in turn in these processes (the process groups made and torn down for each, the world kept)."""
    del world
    from tplus_dist.parallel.groups import destroy_process_groups

    results: list[Any] = []
    try:
        for kind, overrides in jobs:
            try:
                if kind == "train":
                    results.append(run_and_gather(overrides))
                elif kind == "grads":
                    results.append(conditioned_grads(overrides))
                else:
                    results.append(layer_activation_bytes(overrides))
            finally:
                destroy_process_groups(keep_world=True)
    finally:
        destroy_process_groups()
    torch.save(results, f"{out}.{rank}")


def spawn(tmp_path: Path, world: int, jobs: list[Job]) -> list[list[Any]]:
    """Run ``jobs`` in one spawn of ``world`` processes; each rank's results."""
    out = tmp_path / "sp"
    run_distributed(_rank, world, jobs, str(out))
    return [torch.load(f"{out}.{r}") for r in range(world)]


def train_job(tmp_path: Path, name: str, *extra: str) -> Job:
    return ("train", [*BASE, f"--log.run_dir={tmp_path}/{name}", *extra])


def compare_grads(one: dict[str, Any], two: dict[str, Any], overrides: list[str]) -> None:
    """One forward and backward from the same parameters: step 1's bounds (as test_conditioning_tp.py)."""
    run = Fp32Run.of(load_config("configs/tiny.yaml", [*BASE, *overrides]), [4 * 64], [0.0])
    assert abs(one["loss"] - two["loss"]) <= run.loss(1, one["loss"]), (one["loss"], two["loss"])
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) >= 6, one["grads"].keys()
    for name, g in one["grads"].items():
        assert g.abs().sum() > 0, name
        rel = float((two["grads"][name] - g).norm()) / float(g.norm())
        assert rel <= run.grad_rel(1), (name, rel, run.grad_rel(1))


@pytest.mark.slow
def test_sequence_parallel_tp2_equals_one_process(tmp_path: Path) -> None:
    jobs = [train_job(tmp_path, name, "--train.grad_accum=2", *SP, *extra) for name, extra in TRAIN.items()]
    jobs.append(("grads", [*ADALN, *SP, f"--log.run_dir={tmp_path}/adaln"]))
    jobs += [("bytes", [f"--log.run_dir={tmp_path}/b{i}", *layout]) for i, layout in enumerate([SP, SP[:1]])]
    ranks = spawn(tmp_path, 2, jobs)
    for i, (name, extra) in enumerate(TRAIN.items()):
        print(name)
        compare(single(tmp_path / name, "--train.grad_accum=2", *extra), ranks[0][i], extra)
    n = len(TRAIN)
    compare_grads(conditioned_grads([*ADALN, f"--log.run_dir={tmp_path}/adaln1"]), ranks[0][n], ADALN)
    # activations: with SP every part of the layers is split over the 2 ranks (1/2 of one process's), without it the
    # norms' inputs and outputs and the residual stream stay whole on each rank
    one = layer_activation_bytes([f"--log.run_dir={tmp_path}/b"])
    for r in range(2):
        sp, plain = ranks[r][n + 1], ranks[r][n + 2]
        print(f"rank {r}: layer activations one process {one}, TP2 {plain} ({plain / one:.3f}), "
              f"TP2+SP {sp} ({sp / one:.3f})")  # fmt: skip
        assert abs(sp - one / 2) <= 0.05 * one / 2, (sp, one)
        assert plain > 1.2 * sp, (plain, sp)  # (measured: 1.29)


@pytest.mark.extended
def test_sequence_parallel_every_choice(tmp_path: Path) -> None:
    """The tensor-parallel tests' choices under TP 2 + SP (one spawn of 2), each equal to one process."""
    # (ALiBi / window / parallel block / LayerNorm biases: the main set's run; GQA, tied head, z-loss and uneven
    # targets: TRAIN_MORE's run and the 4-process test)
    skip = ("parallel-block-window-alibi-bias", "gqa-tied-zloss")
    choices = {**TRAIN_MORE, **{k: v for k, v in CHOICES.items() if k not in skip}}
    two = [train_job(tmp_path, f"c{name}", "--train.grad_accum=2", *SP, *extra) for name, extra in choices.items()]
    ranks = spawn(tmp_path, 2, two)
    for (name, extra), got in zip(choices.items(), ranks[0], strict=True):
        print(name)
        compare(single(tmp_path / f"c{name}", "--train.grad_accum=2", *extra), got, extra)


@pytest.mark.extended
def test_sequence_parallel_with_data_and_pipeline_parallel(tmp_path: Path) -> None:
    """TP 2 x DP 2 (ZeRO 1 and 3) and TP 2 x PP 2 (DeepSpeed's pipeline engine) with SP, and two of them with
    activation recompute (full, selective), in one spawn of 4, each equal to one process (uneven targets, z-loss,
    validation)."""
    # the global batch stays 8: micro 4 x accumulation x data-parallel replicas
    model = ["--model.z_loss=1e-4", "--train.eval_interval=5", "--train.eval_samples=26", UNEVEN]
    four = [
        train_job(tmp_path, "z1", "--train.grad_accum=1", "--parallel.zero_stage=1", *SP, *model),
        train_job(tmp_path, "z3", "--train.grad_accum=1", "--parallel.zero_stage=3", *SP, *model),
        train_job(tmp_path, "pp", "--train.grad_accum=2", "--parallel.pipeline_parallel=2", *SP, *model),
        # with activation recompute: the recomputed forward re-runs SP's collectives on every rank in step
        train_job(tmp_path, "pprc", "--train.grad_accum=2", "--parallel.pipeline_parallel=2", *SP, *model, *FULL),
        train_job(tmp_path, "z1rc", "--train.grad_accum=1", "--parallel.zero_stage=1", *SP, *model, *SELECTIVE),
    ]
    ranks = spawn(tmp_path, 4, four)
    want = single(tmp_path / "one", "--train.grad_accum=2", *model)
    names = ("tp2-dp2-zero1", "tp2-dp2-zero3", "tp2-pp2", "tp2-pp2-recompute-full", "tp2-dp2-recompute-selective")
    for name, got in zip(names, ranks[0], strict=True):
        print(name)
        compare(want, got, model)


def test_sequence_parallel_dropout_keeps_each_ranks_part_of_the_whole_sequences_mask() -> None:
    import torch.nn.functional as F

    from tplus_dist.backends.megatron_provider import sequence_parallel_dropout

    x = torch.randn(4, 64, 128)
    torch.manual_seed(11)
    whole = F.dropout(x, 0.25)  # one process, the whole sequence
    after = torch.rand(1).item()
    parts = []
    for rank in (0, 1):
        torch.manual_seed(11)  # every tensor-parallel rank's default generator is in the same state
        parts.append(sequence_parallel_dropout(x[:, rank * 32 : (rank + 1) * 32], 0.25, rank, 2))
        assert torch.rand(1).item() == after  # the shared generator advanced as one process's
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert abs((whole == 0).float().mean().item() - 0.25) < 0.01
