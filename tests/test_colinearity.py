"""Colinearity Decay math against autograd and hand-built cases."""
import pytest
import torch
from torch import nn

from mmcd.core import (ColinearityDecay, PairRule, SpectralNormEstimator,
                       alignment, discover_pairs, penalty_gradients)
from mmcd.core import VIT_RULES


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1]**-0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)


class Block(nn.Module):
    def __init__(self, dim=16, heads=4, hidden=40):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, depth=2, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**kwargs) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize('shape', [(2, 40, 16, 16), (3, 4, 16, 16)])
def test_penalty_gradients_match_autograd(shape):
    """Both association orders (wide and narrow inner dim) equal autograd
    of 1/2 ||B A||_F^2."""
    h, m, k, n = shape
    a = torch.randn(h, m, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(h, n, m, dtype=torch.float64, requires_grad=True)
    (0.5 * (b @ a).square().sum()).backward()
    ga, gb = penalty_gradients(a.detach(), b.detach())
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gb, b.grad)


def _penalty_of_model(model, kinds):
    """1/2 sum over pairs and heads of ||B A||_F^2, written from the
    definitions on the raw weights (independently of MatrixPair views)."""
    total = 0
    for blk in model.blocks:
        dim, heads = blk.norm1.normalized_shape[0], blk.attn.num_heads
        d = dim // heads
        wq, wk, wv = blk.attn.qkv.weight.split(dim)
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            if 'vo' in kinds:
                total = total + 0.5 * (blk.attn.proj.weight[:, rows] @ wv[
                    rows]).square().sum()
            if 'qk' in kinds:
                total = total + 0.5 * (wq[rows].T @ wk[rows]).square().sum()
        if 'ffn' in kinds:
            total = total + 0.5 * (blk.mlp.fc2.weight @
                                   blk.mlp.fc1.weight).square().sum()
    return total


@pytest.mark.parametrize('kind', ['ffn', 'vo', 'qk'])
def test_cd_update_equals_formula(kind):
    """A -= lr*lam*dR/dA / ||B||_2^2 and B -= lr*lam*dR/dB / ||A||_2^2 with
    dR from autograd and exact spectral norms."""
    torch.manual_seed(0)
    model = ViT().double()
    pairs = discover_pairs(model, VIT_RULES, kinds=[kind])
    assert len(pairs) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _penalty_of_model(model, [kind]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    # expected: per pair, per head, normalized by the partner's sigma_max
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    for pair in pairs:
        a, b = (t.clone() for t in pair.matrices())
        sig_a = torch.linalg.matrix_norm(a, ord=2)
        sig_b = torch.linalg.matrix_norm(b, ord=2)
        blk = pair.name.rsplit('.', 1)[0]
        if kind == 'ffn':
            expected[f'{blk}.mlp.fc1.weight'] = grads[
                f'{blk}.mlp.fc1.weight'] / sig_b[0]**2
            expected[f'{blk}.mlp.fc2.weight'] = grads[
                f'{blk}.mlp.fc2.weight'] / sig_a[0]**2
            continue
        heads, d = pair.num_heads, a.shape[1]
        dim = a.shape[-1]
        g = grads[f'{blk}.attn.qkv.weight'].view(3, heads, d, dim)
        e = expected[f'{blk}.attn.qkv.weight'].view(3, heads, d, dim)
        if kind == 'vo':
            e[2] = g[2] / sig_b[:, None, None]**2  # A = W_V
            gp = grads[f'{blk}.attn.proj.weight'].view(dim, heads, d)
            expected[f'{blk}.attn.proj.weight'] = (
                gp / sig_a[None, :, None]**2).view(dim, dim)
        else:  # A = W_K, B = W_Q^T
            e[1] = g[1] / sig_b[:, None, None]**2
            e[0] = g[0] / sig_a[:, None, None]**2
    lr, lam = 0.01, 0.5
    cd = ColinearityDecay(pairs, strength=lam)
    assert len(cd.groups) == 1  # both blocks batched together
    for _, sigma_a, sigma_b in cd.groups:  # converge power iteration first
        sigma_a.init_iters = sigma_b.init_iters = 200
    cd.step(lambda p: lr)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(),
                                   lr * lam * expected[n], rtol=1e-5,
                                   atol=1e-12, msg=n)


def test_alignment_scale_free_for_random_matrices():
    torch.manual_seed(0)
    for m, k, n in [(8, 16, 16), (64, 32, 128), (384, 96, 96)]:
        a, b = torch.randn(64, m, k), torch.randn(64, n, m) * 3
        assert alignment(a, b).mean().item() == pytest.approx(1.0, abs=0.05)
    u, v, w = torch.randn(12, 1), torch.randn(1, 7), torch.randn(5, 1)
    a, b = (u @ v)[None], (w @ u.T)[None]  # rank one, directions coincide
    assert alignment(a, b).item() == pytest.approx(12, rel=1e-5)
    b_orth = torch.zeros(1, 5, 12)  # sees nothing of A's range
    b_orth[0, :, :] = w @ torch.linalg.svd(u.T)[2][1:2]
    assert alignment(a, b_orth).item() == pytest.approx(0, abs=1e-6)


def _ffn_pair(fc1_weight, fc2_weight):
    model = ViT(depth=1, dim=fc1_weight.shape[1], heads=1,
                hidden=fc1_weight.shape[0]).double()
    model.blocks[0].mlp.fc1.weight.data.copy_(fc1_weight)
    model.blocks[0].mlp.fc2.weight.data.copy_(fc2_weight)
    return discover_pairs(model, VIT_RULES, kinds=['ffn'])


def test_alignment_falls_monotonically_and_unaligned_pair_is_untouched():
    torch.manual_seed(1)
    dim, hidden = 16, 48
    u = torch.randn(hidden, 1, dtype=torch.float64)
    fc1 = 0.1 * torch.randn(hidden, dim, dtype=torch.float64) + \
        u @ torch.randn(1, dim, dtype=torch.float64)
    fc2 = 0.1 * torch.randn(dim, hidden, dtype=torch.float64) + \
        torch.randn(dim, 1, dtype=torch.float64) @ u.T
    aligned = _ffn_pair(fc1, fc2)
    # unaligned: fc2 only reads hidden units that fc1 never writes
    fc1_u = torch.zeros(hidden, dim, dtype=torch.float64)
    fc1_u[:hidden // 2] = torch.randn(hidden // 2, dim, dtype=torch.float64)
    fc2_u = torch.zeros(dim, hidden, dtype=torch.float64)
    fc2_u[:, hidden // 2:] = torch.randn(dim, hidden // 2,
                                         dtype=torch.float64)
    unaligned = _ffn_pair(fc1_u, fc2_u)
    cd = ColinearityDecay(aligned + unaligned, strength=1.0)
    history = [alignment(*aligned[0].matrices()).item()]
    for _ in range(40):
        cd.step(lambda p: 0.05)
        history.append(alignment(*aligned[0].matrices()).item())
    assert history[0] > 10
    assert all(x1 < x0 for x0, x1 in zip(history, history[1:]))
    assert history[-1] < 0.5 * history[0]
    a_u, b_u = unaligned[0].matrices()
    assert torch.equal(a_u[0], fc1_u) and torch.equal(b_u[0], fc2_u)


def test_full_alignment_decays_like_weight_decay():
    """Along a fully aligned rank-1 direction, one step scales both
    matrices by (1 - lr*lam), as AdamW's decoupled weight decay does."""
    u = torch.nn.functional.normalize(torch.randn(12, 1, dtype=torch.float64),
                                      dim=0)
    fc1 = 3 * u @ torch.randn(1, 6, dtype=torch.float64)
    fc2 = 2 * torch.randn(6, 1, dtype=torch.float64) @ u.T
    pairs = _ffn_pair(fc1, fc2)
    ColinearityDecay(pairs, strength=0.5).step(lambda p: 0.1)
    a, b = pairs[0].matrices()
    torch.testing.assert_close(a[0], fc1 * 0.95)
    torch.testing.assert_close(b[0], fc2 * 0.95)


def test_spectral_norm_estimator_converges_and_warm_starts():
    torch.manual_seed(0)
    mats = torch.randn(3, 20, 30, dtype=torch.float64)
    est = SpectralNormEstimator(iters=1, init_iters=100)
    torch.testing.assert_close(est(mats), torch.linalg.matrix_norm(mats, 2))
    mats2 = mats * 1.01  # a small change: one warm iteration suffices
    torch.testing.assert_close(est(mats2), torch.linalg.matrix_norm(
        mats2, 2), rtol=1e-6, atol=0)


def test_bad_strength_and_non_finite_weights():
    model = ViT(depth=2)
    pairs = discover_pairs(model, VIT_RULES, kinds=['ffn'])
    with pytest.raises(ValueError, match='strength'):
        ColinearityDecay(pairs, strength=-1)
    with pytest.raises(ValueError, match='strength'):
        ColinearityDecay(pairs, strength=float('nan'))
    model.blocks[0].mlp.fc1.weight.data[0, 0] = float('nan')
    fc1_0 = model.blocks[0].mlp.fc1.weight.detach().clone()
    fc1_1 = model.blocks[1].mlp.fc1.weight.detach().clone()
    stats = ColinearityDecay(pairs, strength=1).step(lambda p: 0.1)
    assert stats['names'] == ['blocks.0.ffn', 'blocks.1.ffn']
    assert stats['finite'].tolist() == [False, True]
    assert torch.isfinite(stats['update_sq'])
    w0 = model.blocks[0].mlp.fc1.weight.detach()
    assert torch.equal(w0.isnan(), fc1_0.isnan())  # no new NaN written
    assert not torch.equal(model.blocks[1].mlp.fc1.weight.detach(), fc1_1)


def test_pair_rule_validation_and_wrong_shapes():
    with pytest.raises(ValueError, match='pair kind'):
        PairRule('xy', 'a')
    with pytest.raises(ValueError, match='heads_from'):
        PairRule('vo', 'a', 'b')
    model = ViT(depth=1)
    bad = PairRule('ffn', r'(?P<b>.+)\.mlp\.fc1', '{b}.norm2')
    with pytest.raises(ValueError, match="no 2-D 'weight'"):
        discover_pairs(model, [bad])
    bad_vo = PairRule('vo', r'(?P<b>.+)\.mlp\.fc1', '{b}.mlp.fc2',
                      num_heads=4)
    with pytest.raises(ValueError, match='fused qkv'):
        discover_pairs(model, [bad_vo])


def test_swin_t_pair_counts_and_heads():
    """mmdet's Swin-T: 12 blocks x 3 kinds, heads from each stage."""
    from mmdet.models.backbones import SwinTransformer
    from mmcd.core import SWIN_RULES
    swin_t = SwinTransformer(embed_dims=96, depths=[2, 2, 6, 2],
                             num_heads=[3, 6, 12, 24])
    pairs = discover_pairs(swin_t, SWIN_RULES + VIT_RULES)
    assert len(pairs) == 36
    for kind in ('ffn', 'vo', 'qk'):
        of_kind = [p for p in pairs if p.kind == kind]
        assert len(of_kind) == 12
        if kind != 'ffn':
            assert sorted(p.num_heads for p in of_kind) == sorted(
                [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2)
    a, b = next(p for p in pairs if p.name == 'stages.2.blocks.0.vo'
                ).matrices()
    assert a.shape == (12, 32, 384) and b.shape == (12, 384, 32)
