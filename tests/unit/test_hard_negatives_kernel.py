"""The Triton hard-negative sampler (kernels/hard_negatives.py) under TRITON_INTERPRET=1: its
distribution against torch.multinomial's (chi-square), never the positive, every degenerate row exactly
as the reference defines it, reproducibility from the seed, strided and stacked inputs. The
reference itself is tested in test_objectives."""

import pytest
import torch
import torch.nn.functional as F

from albef_kernels import _dispatch, sample_hard_negatives, sample_hard_negatives_reference
from albef_kernels._dispatch import use_backend
from albef_kernels.hard_negatives import sample_hard_negatives_forward

pytestmark = pytest.mark.skipif(not _dispatch.triton_available(), reason="needs Triton (interpreter)")

CHI2_999 = {3: 16.27, 4: 18.47}  # chi-square 0.999 quantiles by degrees of freedom


def multinomial_weights(sim: torch.Tensor) -> torch.Tensor:
    """ALBEF's sampling weights: softmax of each row, the positive (diagonal) zeroed, renormalised (what
    torch.multinomial draws from)."""
    w = F.softmax(sim.double(), dim=1) * (1 - torch.eye(sim.shape[0], dtype=torch.float64))
    return w / w.sum(dim=1, keepdim=True)


def test_distribution_matches_multinomial():
    """Columns come in K = 5 classes of 24 identical logits, so all rows of one class share one
    distribution over classes; 12 launches of a (2, 120, 120) stack give 24 * 2 * 12 = 576 draws per
    (row class). Chi-square over the 5 classes against the weights torch.multinomial would use."""
    K, per, launches = 5, 24, 12
    B = K * per
    cls = torch.arange(B) // per
    level = torch.tensor([0.0, 1.5, -1.0, 3.0, 0.5])
    sim = level[cls].expand(B, B).clone()  # row-independent logits: only the excluded diagonal differs
    sim.diagonal().add_(torch.linspace(-2, 6, B))  # the positive's own value must not matter
    stack = torch.stack([sim, sim.t().contiguous().t()])  # second slice: same values, column-major
    expected = torch.zeros(K, K, dtype=torch.float64)
    for c in range(K):  # per row class: probability of drawing each column class
        expected[c] = multinomial_weights(sim)[c * per].view(K, per).sum(dim=1)
    counts = torch.zeros(K, K, dtype=torch.float64)
    g = torch.Generator().manual_seed(2024)
    with use_backend("triton"):
        for _ in range(launches):
            idx, valid = sample_hard_negatives(stack, generator=g)
            assert valid.all() and (idx != torch.arange(B)).all()
            for r in range(2):
                counts.index_put_((cls, cls[idx[r]]), torch.ones(B, dtype=torch.float64), accumulate=True)
    n = counts.sum(dim=1, keepdim=True)
    assert (n == 2 * per * launches).all()
    exp = expected * n
    chi2 = ((counts - exp) ** 2 / exp).sum(dim=1)
    assert (chi2 < CHI2_999[K - 1]).all(), f"chi2 per row class {chi2.tolist()}, {K - 1} degrees of freedom"
    # the test can fail: the softmax with the positive's mass left in is rejected
    wrong = torch.stack([F.softmax(sim.double(), 1)[c * per].view(K, per).sum(1) for c in range(K)]) * n
    assert (((counts - wrong) ** 2 / wrong).sum(dim=1) > CHI2_999[K - 1]).any()


@pytest.mark.parametrize("B", [2, 3, 17, 40])
def test_never_the_positive(B):
    g = torch.Generator().manual_seed(B)
    sim = torch.randn(2, B, B, generator=g) * 4
    sim.diagonal(dim1=1, dim2=2).add_(200.0)  # every off-diagonal softmax weight underflows in fp32
    for seed in range(3):
        idx, valid = sample_hard_negatives_forward(sim, seed)
        assert valid.all() and (idx != torch.arange(B)).all()
        assert ((idx >= 0) & (idx < B)).all()


def test_degenerate_rows_match_the_reference_exactly():
    """Rows with no candidate give (b, False) and rows with one candidate give that candidate, in both
    paths; NaN counts as -inf; a +inf logit makes the row invalid (the reference's rule)."""
    nan, inf = float("nan"), float("inf")
    sim = torch.tensor([
        [0.0, nan, nan, nan, nan],  # only NaN off the diagonal -> none
        [-inf, 5.0, -inf, -inf, -inf],  # only -inf -> none
        [nan, -inf, 1.0, 2.0, nan],  # exactly one finite candidate: 3
        [1.0, 2.0, inf, 0.0, 3.0],  # +inf -> not finite -> invalid, as the reference
        [nan, nan, nan, nan, nan],  # all NaN (diagonal too) -> none
    ])
    want_idx, want_valid = sample_hard_negatives_reference(sim)
    assert want_idx.tolist() == [0, 1, 3, 3, 4] and want_valid.tolist() == [False, False, True, False, False]
    for seed in (0, 1, 12345):
        idx, valid = sample_hard_negatives_forward(sim, seed)
        assert torch.equal(idx, want_idx) and torch.equal(valid, want_valid)
    idx, valid = sample_hard_negatives_forward(torch.randn(1, 1), 3)  # B = 1
    assert idx.tolist() == [0] and valid.tolist() == [False]
    idx, valid = sample_hard_negatives_forward(torch.full((6, 6), 3.0), 3)  # identical rows
    assert valid.all() and (idx != torch.arange(6)).all()


def test_reproducible_from_the_seed_and_strides():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(2, 33, 33, generator=g)
    a = sample_hard_negatives_forward(sim, 77)
    b = sample_hard_negatives_forward(sim.transpose(1, 2).contiguous().transpose(1, 2), 77)  # strided view
    c = sample_hard_negatives_forward(sim, 78)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.int64 and a[1].dtype == torch.bool and a[0].shape == (2, 33)
    with use_backend("triton"):  # the public entry point: same generator state -> same draws
        x = sample_hard_negatives(sim[0], generator=torch.Generator().manual_seed(5))
        y = sample_hard_negatives(sim[0], generator=torch.Generator().manual_seed(5))
        torch.manual_seed(9)
        z1 = sample_hard_negatives(sim[0])  # default: the global CPU generator
        torch.manual_seed(9)
        z2 = sample_hard_negatives(sim[0])
    assert x[0].shape == (33,) and torch.equal(x[0], y[0]) and torch.equal(z1[0], z2[0])


def test_public_entry_validates_and_dispatches():
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        sample_hard_negatives(torch.randn(3, 4))
    with pytest.raises(ValueError, match="float"):
        sample_hard_negatives(torch.ones(3, 3, dtype=torch.long))
    # CPU tensors under the default backend take the reference, also for a stack
    idx, valid = sample_hard_negatives(torch.randn(2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert idx.shape == (2, 4) and valid.all() and (idx != torch.arange(4)).all()


def test_seed_from_a_device_tensor_equals_the_int_seed():
    """The key read by the kernel from a (1,) int64 tensor (CUDA graphs, torch.compile) draws exactly
    what the same key passed as an int does; a malformed key tensor is refused by name."""
    sim = torch.randn(2, 9, 9, generator=torch.Generator().manual_seed(3))
    for seed in (0, 12345, 2**31 - 2):
        a = sample_hard_negatives_forward(sim, seed)
        b = sample_hard_negatives_forward(sim, torch.tensor([seed]))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"seed tensor must be \(1,\) int64"):
        sample_hard_negatives_forward(sim, torch.tensor([1], dtype=torch.int32))


def test_op_registration_opcheck():
    sim = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(4))
    result = torch.library.opcheck(torch.ops.albef_kernels.sample_hard_negatives.default,
                                   (sim, torch.tensor([77])))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend, op_in_graph", [("triton", True), ("auto", False)])
def test_torch_compile_fullgraph(backend, op_in_graph):
    """torch.compile(fullgraph=True) of the sampler: no graph break (the host seed draw of the eager
    Triton path would break it; compiled, the key is drawn on the device inside the graph), the fused
    path is one node, and the draws keep the sampler's contract (never the positive, valid rows)."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def draw(sim):
        with use_backend(backend):
            return sample_hard_negatives(sim)

    torch._dynamo.reset()
    compiled = torch.compile(draw, fullgraph=True, backend=recording)
    sim = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    first = compiled(sim)
    second = compiled(sim)
    assert len(graphs) == 1 and ("albef_kernels.sample_hard_negatives" in graphs[0]) == op_in_graph
    for index, valid in (first, second):
        assert index.shape == (2, 12) and valid.all() and (index != torch.arange(12)).all()
    assert not torch.equal(first[0], second[0])  # each call draws a fresh key (2 x 12 draws of 11)
