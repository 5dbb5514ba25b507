"""Hessian accumulation and GPTQ preparation (exl2-format.md 4.9, H1–H4)."""

import pytest
import torch

from exlbuild.errors import ExlbuildError
from exlbuild.quant.gptq import (
    HessianAccumulator,
    act_order,
    damping,
    invert_permutation,
    prepare_hessian,
)


def test_hessian_is_mean_over_rows_of_xtx():
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(7, 16, generator=generator, dtype=torch.float64) for _ in range(3)]
    accumulator = HessianAccumulator(16)
    for x in rows:
        accumulator.add(x.to(torch.float16))  # any input dtype; accumulated in float32
    expected = sum(x.to(torch.float16).double().T @ x.to(torch.float16).double() for x in rows) / 3
    assert accumulator.rows == 3
    assert accumulator.hessian().dtype == torch.float32
    torch.testing.assert_close(accumulator.hessian().double(), expected, rtol=1e-5, atol=1e-5)

    batched = HessianAccumulator(16)
    batched.add(torch.stack(rows[:2]).float())  # (rows, tokens, K)
    batched.add(rows[2][None].float())  # (1, tokens, K)
    assert batched.rows == 3
    torch.testing.assert_close(batched.hessian(), accumulator.hessian(), rtol=1e-3, atol=1e-3)


def test_hessian_without_rows_is_identity_and_shapes_are_checked():
    assert torch.equal(HessianAccumulator(4).hessian(), torch.eye(4))
    with pytest.raises(ValueError, match="tokens, 4"):
        HessianAccumulator(4).add(torch.zeros(3, 5))


def test_act_order_example():
    hessian = torch.diag(torch.tensor([0.1, 3.0, 0.5, 2.0]))
    perm = act_order(hessian)
    assert perm.tolist() == [1, 3, 2, 0]
    assert invert_permutation(perm).tolist() == [3, 0, 2, 1]
    assert act_order(torch.eye(3)).tolist() == [0, 1, 2]  # ties keep feature order


def test_damping():
    assert damping(torch.diag(torch.tensor([1.0, 2.0, 3.0]))).item() == pytest.approx(0.24)
    assert damping(torch.zeros(3, 3)).item() == 1e-5


def test_prepare_hessian_factor():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=generator) * torch.linspace(0.1, 3, 32)
    hessian = x.T @ x / 4
    prepared = prepare_hessian(hessian)
    perm, upper = prepared.perm, prepared.inverse_factor
    assert torch.equal(perm, act_order(hessian))
    assert torch.equal(prepared.invperm[perm], torch.arange(32))
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all()
    d = damping(hessian).item()
    assert prepared.damping == pytest.approx(d)
    damped = hessian[perm][:, perm].double() + d * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(upper.double().T @ upper.double(), torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)
    # The one such factor (upper, positive diagonal), to float32 precision.
    truth = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert (upper.double() - truth).norm() / truth.norm() < 1e-5


def test_singular_hessian_is_fixed_by_damping():
    x = torch.ones(10, 1) @ torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    hessian = x.T @ x  # rank 1
    prepared = prepare_hessian(hessian)
    assert prepared.damping == pytest.approx(damping(hessian).item())
    assert torch.isfinite(prepared.inverse_factor).all()


def test_damping_retry_adds_d_again():
    hessian = torch.diag(torch.tensor([1.0, -0.1]))  # d = 0.054: -0.046 fails, +0.008 works
    prepared = prepare_hessian(hessian)
    assert prepared.damping == pytest.approx(2 * damping(hessian).item())
    damped = torch.diag(torch.tensor([1.0, -0.1])) + prepared.damping * torch.eye(2)
    torch.testing.assert_close(prepared.inverse_factor.T @ prepared.inverse_factor, torch.linalg.inv(damped))


def test_hopeless_hessian_raises():
    with pytest.raises(ExlbuildError, match="model.layers.2.mlp.down_proj: Hessian is not invertible after 10"):
        prepare_hessian(-torch.eye(4), "model.layers.2.mlp.down_proj")
    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    with pytest.raises(ExlbuildError, match="q_proj: Hessian has NaN"):
        prepare_hessian(bad, "q_proj")


def test_speculative_preparation_reads_nothing_and_says_whether_it_worked():
    """The first damping attempt, unread: the same factor as the read path where it works; `usable` False where
    the Hessian needs more damping or is not finite (the caller then prepares it again without `speculative`)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=generator)
    hessian = x.T @ x / 64
    read, unread = prepare_hessian(hessian), prepare_hessian(hessian, speculative=True)
    assert unread.usable.dtype == torch.bool and unread.usable.item() and unread.damping is None
    assert torch.equal(unread.inverse_factor, read.inverse_factor) and torch.equal(unread.perm, read.perm)
    assert read.usable is None
    assert not prepare_hessian(torch.diag(torch.tensor([1.0, -0.1])), speculative=True).usable.item()  # needs 2 · d
    bad = torch.eye(4)
    bad[1, 2] = float("inf")
    assert not prepare_hessian(bad, speculative=True).usable.item()
