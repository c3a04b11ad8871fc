"""Tests for loralens.lens.lenses.losses: exact and top-k subset KL."""

import pytest
import torch
import torch.nn.functional as F

from loralens.lens.lenses.losses import kl_exact, kl_subset, log1mexp

T, V = 13, 50


def _logits(seed: int, shape=(T, V), temp: float = 2.0) -> torch.Tensor:
    return temp * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference_kl(target: torch.Tensor, lens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked rows of KL(target || lens) via torch's kl_div, in float64."""
    logp = F.log_softmax(target.double(), -1)
    logq = F.log_softmax(lens.double(), -1)
    rows = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    return rows[mask].mean()


def _topk(target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(target, -1)
    vals, ids = logp.topk(k, dim=-1)
    return ids, vals


@pytest.fixture
def mask() -> torch.Tensor:
    m = torch.ones(T, dtype=torch.bool)
    m[[2, 7, 12]] = False
    return m


def test_kl_exact_matches_reference(mask):
    target, lens = _logits(0), _logits(1)
    got = kl_exact(target, lens, mask, chunk=4)
    torch.testing.assert_close(got.double(), _reference_kl(target, lens, mask), rtol=1e-5, atol=1e-6)
    assert got.item() > 0.1


def test_kl_exact_zero_for_identical_and_shift_invariant(mask):
    target = _logits(0)
    assert kl_exact(target, target + 3.0, mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
def test_kl_exact_chunk_invariant_value_and_grad(mask, chunk):
    target = _logits(0)
    lens_ref = _logits(1).requires_grad_()
    kl_exact(target, lens_ref, mask, chunk=T).backward()
    lens = _logits(1).requires_grad_()
    loss = kl_exact(target, lens, mask, chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss, kl_exact(target, _logits(1), mask, chunk=T))
    torch.testing.assert_close(lens.grad, lens_ref.grad)
    # Gradient of mean KL w.r.t. logits of a row is (q - p) / n_masked.
    p, q = F.softmax(target, -1), F.softmax(_logits(1), -1)
    expected = (q - p) / mask.sum() * mask[:, None]
    torch.testing.assert_close(lens.grad, expected, rtol=1e-4, atol=1e-6)


def test_kl_exact_callable_equals_tensor_and_only_sees_chunks(mask):
    target = _logits(0)
    w = torch.randn(V, V, generator=torch.Generator().manual_seed(3)).requires_grad_()
    h = _logits(4)
    seen = []

    def fn(rows: slice) -> torch.Tensor:
        seen.append(rows.stop - rows.start)
        return h[rows] @ w

    loss = kl_exact(target, fn, mask, chunk=4)
    loss.backward()
    g_fn = w.grad.clone()
    w.grad = None
    loss_t = kl_exact(target, h @ w, mask, chunk=4)
    loss_t.backward()
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(g_fn, w.grad)
    assert max(seen) <= 4  # forward + checkpoint recompute, never the whole batch


def test_kl_exact_ignores_masked_tokens(mask):
    target, lens = _logits(0), _logits(1).requires_grad_()
    base = kl_exact(target, lens, mask)
    target2 = target.clone()
    target2[~mask] = _logits(9)[~mask]
    torch.testing.assert_close(kl_exact(target2, lens, mask), base)
    base.backward()
    assert torch.count_nonzero(lens.grad[~mask]) == 0
    assert torch.count_nonzero(lens.grad[mask]) > 0


def test_all_padding_skips_lens_and_returns_zero():
    calls = []
    pad = torch.zeros(T, dtype=torch.bool)
    loss = kl_exact(_logits(0), lambda rows: calls.append(rows) or _logits(1)[rows], pad)
    assert loss.item() == 0.0 and calls == []


def test_per_head_lens_is_mean_over_heads(mask):
    target = _logits(0)
    lens = _logits(1, shape=(T, 3, V))
    per = [kl_exact(target, lens[:, h], mask) for h in range(3)]
    torch.testing.assert_close(kl_exact(target, lens, mask), torch.stack(per).mean())
    ids, lp = _topk(target, 7)
    per_s = [kl_subset(ids, lp, lens[:, h], mask) for h in range(3)]
    torch.testing.assert_close(kl_subset(ids, lp, lens, mask), torch.stack(per_s).mean())


def test_log1mexp_accuracy():
    x = -torch.logspace(-20, 1.3, 200, dtype=torch.float64)
    ref = torch.log(-torch.expm1(x))
    torch.testing.assert_close(log1mexp(x.float()).double(), ref, rtol=1e-6, atol=0)
    assert torch.isneginf(log1mexp(torch.tensor([0.0, 1e-7])).float()).all()  # >= 0 -> empty tail


@pytest.mark.parametrize("seed, temp", [(0, 1.0), (1, 3.0), (2, 6.0)])
def test_subset_is_monotone_lower_bound_exact_at_full_vocab(mask, seed, temp):
    target, lens = _logits(seed, temp=temp), _logits(seed + 100, temp=temp)
    exact = kl_exact(target, lens, mask).item()
    ks = [1, 2, 5, 10, 20, 35, 49, V]
    subs = [kl_subset(*_topk(target, k), lens, mask).item() for k in ks]
    for s in subs:
        assert s <= exact + 1e-5
    for a, b in zip(subs[:-1], subs[1:], strict=True):
        assert b >= a - 1e-5
    assert subs[0] < 0.9 * exact  # k=1 really is coarser
    assert subs[-1] == pytest.approx(exact, rel=1e-5, abs=1e-6)
    assert subs[-2] == pytest.approx(exact, rel=1e-3)  # k = vocab-1: tail is one token


def test_subset_matches_coarsened_reference(mask):
    target, lens = _logits(0), _logits(1)
    k = 6
    ids, lp = _topk(target, k)
    p, q = F.softmax(target.double(), -1), F.softmax(lens.double(), -1)
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    ref = (P * (P.log() - Q.log())).sum(-1)[mask].mean()
    torch.testing.assert_close(kl_subset(ids, lp, lens, mask).double(), ref, rtol=1e-5, atol=1e-6)


def test_subset_grad_finite_when_lens_tail_tiny(mask):
    target = _logits(0)
    ids, lp = _topk(target, 5)
    lens = torch.full((T, V), -60.0)
    lens.scatter_(-1, ids, 10.0)  # lens tail mass ~ e^-70: log1p(-sum) would round to -inf
    lens.requires_grad_()
    loss = kl_subset(ids, lp, lens, mask, chunk=3)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10  # target tail is not tiny
    assert torch.isfinite(lens.grad).all()


def test_subset_callable_equals_tensor(mask):
    target = _logits(0)
    ids, lp = _topk(target, 8)
    lens = _logits(1).requires_grad_()
    a = kl_subset(ids, lp, lens, mask, chunk=3)
    b = kl_subset(ids, lp, lambda rows: lens[rows], mask, chunk=3)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, lens)
    (gb,) = torch.autograd.grad(b, lens)
    torch.testing.assert_close(ga, gb)


def test_subset_shape_mismatch_raises():
    with pytest.raises(ValueError, match="topk_ids and topk_logprobs"):
        kl_subset(torch.zeros(T, 3, dtype=torch.long), torch.zeros(T, 4), _logits(0))


def test_kl_from_logits_equals_the_direct_kl_per_head_and_per_row():
    from loralens.lens.lenses.losses import exact_target, kl_from_logits

    torch.manual_seed(0)
    target = torch.log_softmax(torch.randn(5, 50) * 3, -1)
    target[0, :10] = -torch.inf  # zero-probability tokens: 0 log 0 = 0
    target = torch.log_softmax(target, -1)
    p = target.exp()
    prepared = exact_target(target)
    heads = torch.randn(5, 3, 50) * 2
    direct = (p[:, None] * (target[:, None] - torch.log_softmax(heads, -1))).nan_to_num().sum(-1)
    assert torch.allclose(kl_from_logits(prepared, heads), direct, atol=1e-5)
    rows = heads[:, 0]
    assert torch.allclose(kl_from_logits(prepared, rows), direct[:, 0], atol=1e-5)
    assert kl_from_logits(prepared, target.clamp_min(-1e4)).abs().max() < 1e-4  # KL(p || p) = 0
    torch.testing.assert_close(kl_from_logits(prepared.rows(slice(1, 3)), heads[1:3]), direct[1:3], atol=1e-5,
                               rtol=0)
