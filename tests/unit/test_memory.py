"""memory.saved_tensor_bytes: the bytes autograd keeps for backward, counted by hand for ops whose saved tensors
torch documents (a matmul keeps both operands; a view of one storage counts once; parameters do not count)."""

from __future__ import annotations

import torch

from tplus_dist.memory import saved_tensor_bytes


def test_counts_each_saved_storage_once_and_leaves_parameters_out() -> None:
    a = torch.randn(8, 16, requires_grad=True)  # a leaf that requires grad: counted as a parameter would be
    w = torch.nn.Parameter(torch.randn(16, 4))
    x = torch.randn(8, 16)

    def fwd() -> None:
        h = x * 2.0  # 8x16 fp32, saved by the matmul below (mul by a constant saves nothing)
        (h @ w).sum()  # saves h and w: w is a parameter
        (h.t() @ h).sum()  # h again, through a view: the same storage
        (a * a).sum()  # saves a (a leaf requiring grad)

    assert saved_tensor_bytes(fwd) == 8 * 16 * 4


def test_exclude_and_no_grad() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    buf = torch.randn(4, 4)
    assert saved_tensor_bytes(lambda: (buf @ w).sum()) == 64
    assert saved_tensor_bytes(lambda: (buf @ w).sum(), exclude=[buf]) == 0
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: (buf @ w).sum()) == 0
