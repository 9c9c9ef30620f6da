"""PEARL (METHODS.md section 7b) against independent computations: alignment, TLP, engine paths.

The references here use plain torch ops written out step by step (per-head loops, SVD and
eigendecompositions, dense matrices, F.interpolate / avg_pool2d chains), never the engine's
helpers, so a mistake in the weights, the centring, the polar factor, the score terms, the
stencils, the solver or the resampling shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG

from ovseg_ros import cli
from ovseg_ros.engine import Segmenter, SegmenterConfig, create_method, tlp
from ovseg_ros.engine.inference import dense_maps, resized_shape
from ovseg_ros.engine.methods import describe_methods
from ovseg_ros.engine.methods.pearl import (
    polar_newton_schulz,
    polar_svd,
    procrustes_scores,
    query_weights,
)
from ovseg_ros.evaluation.cli import dataset_spec, eval_config, eval_vocabulary

GRID = (3, 5)  # a 48 x 80 image with 16-pixel patches
VOCAB = ["cat; kitten", "dog", "tree"]


@pytest.fixture(scope="module")
def images(tiny_backbone):
    """Two normalised random 48 x 80 images."""
    g = torch.Generator().manual_seed(1)
    return tiny_backbone.normalize(torch.rand(2, 3, 48, 80, generator=g))


@pytest.fixture(scope="module")
def last_input(tiny_backbone, images):
    """The last block's input tokens of `images`."""
    x, grid, _ = tiny_backbone.forward_to_last(images)
    assert grid == GRID
    return x


@pytest.fixture(scope="module")
def wide_input(tiny_backbone):
    """Last-block input of a 144 x 176 image: 99 patches, more tokens than the 64-dim heads.

    With fewer tokens than dimensions M = K_c^T Q_c is singular and its orthogonal polar factor
    is not unique (U V^T then depends on the SVD's choice of null-space basis).
    """
    g = torch.Generator().manual_seed(2)
    image = tiny_backbone.normalize(torch.rand(1, 3, 144, 176, generator=g))
    x, grid, _ = tiny_backbone.forward_to_last(image)
    assert grid == (9, 11) and tiny_backbone.width // tiny_backbone.heads < 99
    return x


@pytest.fixture(scope="module")
def vocab(tiny_backbone):
    """A vocabulary with synonyms and background words."""
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=VOCAB, background_words=["sky", "wall"])
    return Segmenter(config, backbone=tiny_backbone).vocabulary


def ref_qkv(block, x, heads):
    """Q, K, V of ln_1(x) with the block's in_proj, as (B, heads, N, d)."""
    h = block.ln_1(x)
    q, k, v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    return [t.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3) for t in (q, k, v)]


def ref_out(block, attention, v):
    """out_proj(concat_heads(A @ V))."""
    b, heads, n, d = v.shape
    mixed = (attention @ v).permute(0, 2, 1, 3).reshape(b, n, heads * d)
    return mixed @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def reference_logits(backbone, y, grid, vocab, scale):
    """scale * cos(ln_post(patch tokens) @ proj, t) as (B, Q, h, w)."""
    feats = F.normalize(backbone.visual.ln_post(y[:, 1:]) @ backbone.visual.proj, dim=-1)
    logits = scale * feats @ vocab.embeddings.T
    return logits.permute(0, 2, 1).reshape(y.shape[0], -1, *grid)


def conditioned(d: int, low: float, seed: int) -> torch.Tensor:
    """A (d, d) float64 matrix with singular values spread over [low, 1]."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.linspace(low, 1.0, d, dtype=torch.float64)) @ v.T


def ref_polar_iterated(m: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """The coupled Newton-Schulz polar step through the eigenvalues of A = M^T M (scalar maps).

    Y_k and Z_k are polynomials in A~ = A / |A|_F + eps I, so they share its eigenvectors; on an
    eigenvalue a the recurrences are t = (3 - z y) / 2, y <- y t, z <- t z.
    """
    a = m.T @ m
    norm = torch.linalg.norm(a)
    vals, vecs = torch.linalg.eigh(a / norm + eps * torch.eye(a.shape[0], dtype=a.dtype))
    y, z = vals.clone(), torch.ones_like(vals)
    for _ in range(iters):
        t = 0.5 * (3.0 - z * y)
        y, z = y * t, t * z
    return m @ (vecs @ torch.diag(z) @ vecs.T) / norm.sqrt()


def ref_scores_per_head(q, k, alpha, rotation):
    """Scores of one image and head, written out: weights, means, M, R (via `rotation`), terms."""
    n, d = q.shape
    s = d**-0.5
    norms = torch.stack([q[i].norm() for i in range(n)])
    norms[0] = 0.0  # the CLS token does not weigh in
    w = norms / (norms.sum() + 1e-6)
    q_mu = sum(w[i] * q[i] for i in range(n))
    k_mu = sum(w[i] * k[i] for i in range(n))
    q_c, k_c = q - q_mu, k - k_mu
    m = sum(torch.outer(k_c[i], q_c[i]) for i in range(n))  # sum_i k_c,i q_c,i^T = K_c^T Q_c
    r = rotation(m)
    aligned = s * q @ (k @ r).T
    centred = s * k_c @ k_c.T
    return aligned + alpha * centred, r


def svd_rotation(m):
    """U V^T of M, computed in float64."""
    u, _, vh = torch.linalg.svd(m.double())
    return (u @ vh).to(m.dtype)


# --- the alignment ---------------------------------------------------------------------------


def test_query_weights_exclude_cls_and_follow_query_norms():
    q = torch.randn(2, 3, 7, 4)
    w = query_weights(q)
    assert w.shape == (2, 3, 7, 1)
    assert torch.all(w[..., 0, :] == 0)
    norms = q[..., 1:, :].norm(dim=-1)
    torch.testing.assert_close(w[..., 1:, 0], norms / (norms.sum(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svd_rotation_is_orthogonal(seed):
    m = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(seed))
    r = polar_svd(m)
    eye = torch.eye(16).expand(4, 16, 16)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, atol=1e-5, rtol=0)
    # The orthogonal polar factor: R^T M is symmetric positive semi-definite.
    p = r.transpose(-1, -2) @ m
    torch.testing.assert_close(p, p.transpose(-1, -2), atol=1e-4, rtol=0)
    assert torch.linalg.eigvalsh((p + p.transpose(-1, -2)) / 2).min() > -1e-4


@pytest.mark.parametrize(("d", "low"), [(8, 0.3), (16, 0.5), (64, 0.5)])
def test_polar_iteration_converges_to_the_svd_factor(d, low):
    m = conditioned(d, low, seed=d)
    r = polar_newton_schulz(m[None], iters=30)[0]
    # Converged up to the 1e-6 ridge the official code adds to A / |A|_F (relative eps / 2 a_min).
    torch.testing.assert_close(r.T @ r, torch.eye(d, dtype=m.dtype), atol=1e-4, rtol=0)
    torch.testing.assert_close(r, polar_svd(m[None])[0], atol=1e-4, rtol=0)
    assert (r - polar_svd(m[None])[0]).abs().max() > 1e-9  # the ridge: not the SVD's bit for bit


def test_polar_iteration_with_five_steps_is_the_published_recurrence():
    # Five steps do not converge for ViT-B's 64-dim heads; the result is the recurrence's, exactly.
    for seed, d in ((0, 8), (1, 64)):
        m = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for iters in (0, 1, 5):
            r = polar_newton_schulz(m[None], iters)[0]
            torch.testing.assert_close(r, ref_polar_iterated(m, iters), atol=1e-8, rtol=1e-6)
    m = conditioned(64, 0.5, seed=3)
    r5 = polar_newton_schulz(m[None], 5)[0]
    assert (r5.T @ r5 - torch.eye(64, dtype=m.dtype)).abs().max() > 1e-3  # not yet orthogonal


@pytest.mark.parametrize("alpha", [0.08, 0.3, 0.0])
def test_scores_term_by_term_against_per_head_reference(tiny_backbone, wide_input, alpha):
    q, k, _ = ref_qkv(tiny_backbone.blocks[-1], wide_input, tiny_backbone.heads)
    scores = procrustes_scores(q, k, alpha, "svd")
    polar = procrustes_scores(q, k, alpha, "polar", 5)
    b, heads, n, _ = q.shape
    assert scores.shape == (b, heads, n, n) and scores.dtype == torch.float32
    for i in range(b):
        for h in range(heads):
            expected, r = ref_scores_per_head(q[i, h], k[i, h], alpha, svd_rotation)
            torch.testing.assert_close(scores[i, h], expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(r.T @ r, torch.eye(r.shape[0]), atol=1e-5, rtol=0)

            expected, _ = ref_scores_per_head(q[i, h], k[i, h], alpha, five_steps)
            torch.testing.assert_close(polar[i, h], expected, atol=1e-4, rtol=1e-4)


def five_steps(m):
    """The published five Newton-Schulz steps, through the eigendecomposition."""
    return ref_polar_iterated(m.double(), 5).float()


@pytest.mark.parametrize("solver", ["polar", "svd"])
def test_last_block_and_logits_match_the_formula(
    tiny_backbone, images, last_input, wide_input, vocab, solver
):
    method = create_method("pearl", {"align_solver": solver})
    x = last_input if solver == "polar" else wide_input  # the SVD's factor needs N > d
    grid = GRID if solver == "polar" else (9, 11)
    y, _ = method.last_block(tiny_backbone, x, grid)
    q, k, v = ref_qkv(tiny_backbone.blocks[-1], x, tiny_backbone.heads)
    rotation = five_steps if solver == "polar" else svd_rotation
    attention = torch.zeros(*q.shape[:2], q.shape[2], q.shape[2])
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores, _ = ref_scores_per_head(q[i, h], k[i, h], 0.08, rotation)
            attention[i, h] = torch.softmax(scores, dim=-1)
    expected = ref_out(tiny_backbone.blocks[-1], attention, v)  # no residual, no FFN
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if solver == "svd":
        return
    logits = method.logits(tiny_backbone, images, vocab)
    ref = reference_logits(tiny_backbone, expected, GRID, vocab, 40.0)
    torch.testing.assert_close(logits, ref, atol=1e-3, rtol=1e-4)


def test_alpha_kk_and_solver_change_the_attention(tiny_backbone, last_input):
    q, k, v = tiny_backbone.qkv(tiny_backbone.blocks[-1], last_input)
    base = create_method("pearl").attention(q, k, v, GRID)
    torch.testing.assert_close(base.sum(-1), torch.ones(base.shape[:-1]))
    for change in ({"alpha_kk": 0.3}, {"align_solver": "svd"}, {"polar_iters": 1}):
        other = create_method("pearl", change).attention(q, k, v, GRID)
        assert not torch.allclose(base, other, atol=1e-5), change


# --- TLP -------------------------------------------------------------------------------------


def random_text(q: int, seed: int = 0) -> torch.Tensor:
    """(q, 16) L2-normalised random embeddings."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(q, 16, generator=g), dim=-1)


def test_text_matrix_rows_sum_to_one_and_match_the_definition():
    emb = random_text(6)
    s = tlp.text_matrix(emb, 0.5, 10.0)
    torch.testing.assert_close(s.sum(1), torch.ones(6), atol=1e-6, rtol=0)
    expected = torch.softmax(emb @ emb.T / 0.5, dim=1) + 10.0 * torch.eye(6)
    torch.testing.assert_close(s, expected / (expected.sum(1, keepdim=True) + 1e-6))
    assert torch.all(s.diagonal() > 10.0 / 11.0)
    no_boost = tlp.text_matrix(emb, 0.5, 0.0)
    torch.testing.assert_close(no_boost, torch.softmax(emb @ emb.T / 0.5, dim=1))


def test_text_coupling_diagonal_in_chunks_equals_the_matrix(monkeypatch):
    emb = random_text(9, seed=1)
    full = tlp.text_coupling(emb, 0.5, 10.0, "matrix")
    monkeypatch.setattr(tlp, "CHUNK_BYTES", 4 * 9 * 2)  # two rows per chunk
    diag = tlp.text_coupling(emb, 0.5, 10.0, "diagonal")
    assert diag.matrix is None
    torch.testing.assert_close(diag.diagonal, full.matrix.diagonal())
    with pytest.raises(ValueError, match="coupling"):
        tlp.text_coupling(emb, 0.5, 10.0, "rows")


def test_constant_map_stays_constant():
    image = torch.randn(3, 12, 15)
    levels = torch.tensor([0.3, -0.1, 0.25, 0.2])
    logits = levels.view(-1, 1, 1).expand(4, 12, 15).clone()
    for coupling in ("diagonal", "matrix"):
        text = tlp.text_coupling(random_text(4), 0.5, 10.0, coupling)
        out = tlp.propagate(logits, image, text)
        torch.testing.assert_close(out, logits, atol=1e-6, rtol=0)


def dense_system(data, wx, wy):
    """The (HW, HW) matrix C + L with L built edge by edge."""
    h, w = data.shape
    n = h * w
    a = torch.diag(data.flatten().double())
    edges = [((i, j), (i, j + 1), wx[i, j]) for i in range(h) for j in range(w - 1)]
    edges += [((i, j), (i + 1, j), wy[i, j]) for i in range(h - 1) for j in range(w)]
    lap = torch.zeros(n, n, dtype=torch.float64)
    for (i0, j0), (i1, j1), weight in edges:
        p, r = i0 * w + j0, i1 * w + j1
        lap[p, p] += weight
        lap[r, r] += weight
        lap[p, r] -= weight
        lap[r, p] -= weight
    return a + lap, lap


def test_laplacian_stencil_and_cg_residual():
    g = torch.Generator().manual_seed(4)
    h, w, q = 4, 5, 3
    logits = torch.randn(q, h, w, generator=g) * 2.0  # confident pixels: a well-posed system
    image = torch.randn(3, h, w, generator=g)
    text = tlp.text_coupling(random_text(q), 0.5, 10.0, "diagonal")
    data, wx, wy = tlp.propagation_weights(logits, tlp.to_gray(image), text, tlp.TLPSettings())
    system, lap = dense_system(data, wx, wy)
    x = torch.randn(q, h, w, generator=g)
    stencil = tlp.laplacian(x, wx, wy)
    torch.testing.assert_close(stencil.double().reshape(q, -1), x.double().reshape(q, -1) @ lap.T)
    # 25 iterations (the published count) on 20 unknowns: solved to float precision.
    out = tlp.propagate(logits, image, text)
    b = (data * logits).double().reshape(q, -1)
    residual = out.double().reshape(q, -1) @ system.T - b
    assert residual.norm() / b.norm() < 1e-4
    exact = torch.linalg.solve(system, b.T).T
    torch.testing.assert_close(out.double().reshape(q, -1), exact, atol=1e-4, rtol=1e-4)


def test_cg_reduces_the_residual_on_a_large_grid():
    g = torch.Generator().manual_seed(5)
    x0 = torch.zeros(2, 30, 40)
    b = torch.randn(2, 30, 40, generator=g)
    wx, wy = torch.rand(30, 39, generator=g), torch.rand(29, 40, generator=g)
    apply = tlp.ScreenedLaplacian(torch.full((30, 40), 0.5), wx, wy, 1.0)
    x = torch.randn(2, 30, 40, generator=g)
    torch.testing.assert_close(apply(x), 0.5 * x + tlp.laplacian(x, wx, wy))
    out = tlp.conjugate_gradient(apply, b, x0, 25)
    assert (apply(out) - b).norm() < 1e-3 * b.norm()
    assert (apply(x0) - b).norm() == b.norm()


def test_edge_weights_follow_an_image_edge():
    h, w, edge = 10, 12, 6
    image = torch.zeros(3, h, w)
    image[:, :, edge:] = 1.0  # a vertical step edge between columns 5 and 6
    logits = torch.zeros(2, h, w)  # no text preference: the gate is the same everywhere
    text = tlp.text_coupling(random_text(2), 0.5, 10.0, "diagonal")
    _, wx, wy = tlp.propagation_weights(logits, tlp.to_gray(image), text, tlp.TLPSettings())
    assert wx.shape == (h, w - 1) and wy.shape == (h - 1, w)
    across = wx[:, edge - 1]
    gray_step = 1.0  # luma of a unit step in every channel
    mean = gray_step / (w - 1)
    gain = 1.0 + 2 * 0.5 * 0.5 * text.diagonal.mean()  # sum_q p_q S_qq p_q with p = 1/2
    torch.testing.assert_close(across, torch.full((h,), math.exp(-5.0 * gray_step / mean) * gain))
    assert torch.all(across < 1e-10)
    assert torch.all(torch.cat([wx[:, : edge - 1], wx[:, edge:]], 1) == 1.0)
    assert torch.all(wy == 1.0)


def test_official_coupling_uses_only_the_diagonal():
    g = torch.Generator().manual_seed(6)
    logits, image = torch.randn(4, 6, 7, generator=g), torch.randn(3, 6, 7, generator=g)
    full = tlp.text_coupling(random_text(4), 0.5, 10.0, "matrix")
    diag = tlp.TextCoupling(full.diagonal, None)
    other = tlp.TextCoupling(full.diagonal, torch.diag(full.diagonal))  # off-diagonal zeroed
    settings = tlp.TLPSettings()
    a = tlp.propagation_weights(logits, image[0], diag, settings)
    b = tlp.propagation_weights(logits, image[0], other, settings)
    c = tlp.propagation_weights(logits, image[0], full, settings)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(a[0], c[0])  # the paper's S P differs


def official_chain(grids, boxes, crop, padded, size, frame, factors):
    """Crops upsampled, averaged, resized to the frame, block-averaged: the official order."""
    q = grids.shape[1]
    total = torch.zeros(1, q, *size, dtype=torch.float64)
    count = torch.zeros(1, 1, *size, dtype=torch.float64)
    for n, (y, x) in enumerate(boxes):
        up = F.interpolate(grids[n : n + 1].double(), padded, mode="bilinear")
        total[..., y : y + crop[0], x : x + crop[1]] += up[..., : crop[0], : crop[1]]
        count[..., y : y + crop[0], x : x + crop[1]] += 1
    at_frame = F.interpolate(total / count, frame, mode="bilinear")
    return F.avg_pool2d(at_frame, factors, factors)[0]


@pytest.mark.parametrize("slide", [False, True])
def test_stitching_equals_the_full_size_chain(slide):
    g = torch.Generator().manual_seed(7)
    size, frame = (75, 105), (330, 462)
    if slide:
        crop, padded = (40, 48), (48, 48)
        boxes = [(y, x) for y in (0, 35) for x in (0, 29, 57)]
    else:
        crop, padded, boxes = size, (80, 112), [(0, 0)]
    grids = torch.randn(len(boxes), 3, padded[0] // 16, padded[1] // 16, generator=g)
    factors = tlp.downsample_factors(frame, 80)
    assert factors == (4, 6)  # round(4.125), round(5.775)
    image = torch.randn(1, 3, *size, generator=g)
    out, pooled = tlp.stitch_to_grid(grids, boxes, crop, padded, size, frame, factors, image)
    expected = official_chain(grids, boxes, crop, padded, size, frame, factors)
    assert out.shape == (3, 82, 77)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    img = F.avg_pool2d(F.interpolate(image.double(), frame, mode="bilinear"), factors, factors)
    torch.testing.assert_close(pooled.double(), img[0], atol=1e-5, rtol=1e-5)


# --- the engine, CLI, evaluation and node parameters ----------------------------------------


def make(tiny_backbone, **overrides):
    """A PEARL Segmenter on the tiny backbone."""
    settings = {"vocabulary": VOCAB, "background_words": ["sky"], "method": "pearl"}
    return Segmenter(SegmenterConfig(**TINY_CONFIG | settings | overrides), backbone=tiny_backbone)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_segment_runs_tlp_on_the_frame(tiny_backbone, mode):
    seg = make(tiny_backbone, mode=mode, short_side=64, crop=48, stride=32)
    frame = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    result = seg.segment(frame)
    assert result.labels.shape == (120, 160) and "tlp" in result.timings
    assert 0 < result.timings["tlp"] < result.timings["model"]
    with_tlp, vocab = seg.dense_logits(frame)
    seg.set_method("pearl", {"tlp": False})
    without, _ = seg.dense_logits(frame)
    assert with_tlp.shape == without.shape == (len(vocab.queries), 64, 85)
    assert "tlp" not in seg.segment(frame).timings
    assert not torch.allclose(with_tlp, without, atol=1e-3)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_frame_step_is_the_official_chain_then_propagation(tiny_backbone, vocab, mode):
    g = torch.Generator().manual_seed(8)
    image = tiny_backbone.normalize(torch.rand(1, 3, 64, 85, generator=g))
    frame = (130, 173)
    plain = create_method("pearl", {"tlp": False})
    raw = dense_maps(plain, tiny_backbone, image, vocab, mode, 48, 32, frame_size=frame)
    assert len(raw.boxes) == (1 if mode == "whole" else 6)
    method = create_method("pearl")
    maps = dense_maps(method, tiny_backbone, image, vocab, mode, 48, 32, frame_size=frame)
    factors = (round(130 / 80), round(173 / 80))
    stitched = official_chain(raw.grids, raw.boxes, raw.crop, raw.padded, raw.size, frame, factors)
    img = F.interpolate(image.double(), frame, mode="bilinear")
    pooled = F.avg_pool2d(img, factors, factors)[0]
    text = tlp.text_coupling(vocab.embeddings, 0.5, 10.0, "diagonal")
    expected = 40.0 * tlp.propagate((stitched / 40.0).float(), pooled.float(), text)
    assert maps.whole and maps.grids.shape == (1, len(vocab.queries), 65, 86)
    torch.testing.assert_close(maps.grids[0], expected, atol=1e-3, rtol=1e-4)


def test_prob_threshold_and_background_words_apply(tiny_backbone):
    frame = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    seg = make(tiny_backbone, short_side=48, prob_threshold=0.99)
    assert np.all(seg.segment(frame).labels == 255)
    seg = make(tiny_backbone, short_side=48, vocabulary=["cat"], background_words=["sky", "dog"])
    labels = seg.segment(frame).labels
    assert set(np.unique(labels)) <= {0, 255}


def test_vocabulary_is_bound_once_and_switching_methods_works(tiny_backbone, monkeypatch):
    seg = make(tiny_backbone, short_side=48)
    calls = []
    real = tlp.text_coupling
    monkeypatch.setattr(tlp, "text_coupling", lambda *a: calls.append(1) or real(*a))
    frame = np.zeros((48, 64, 3), dtype=np.uint8)
    seg.segment(frame)
    assert calls == []  # bound when the Segmenter was built
    seg.set_vocabulary(["door", "chair"])
    assert len(calls) == 1
    seg.segment(frame)
    seg.segment(frame)
    assert len(calls) == 1  # nothing per frame
    seg.set_method("naclip")
    assert "tlp" not in seg.segment(frame).timings
    seg.set_method("pearl", {"alpha_kk": 0.3})
    assert len(calls) == 2 and seg.method.params.alpha_kk == 0.3
    assert "tlp" in seg.segment(frame).timings


def test_published_defaults_and_validation():
    p = create_method("pearl").params
    assert (p.logit_scale, p.keep_residual, p.keep_ffn) == (40.0, False, False)
    assert (p.alpha_kk, p.align_solver, p.polar_iters) == (0.08, "polar", 5)
    assert (p.tlp, p.grid, p.text_temperature, p.diag_boost, p.text_coupling) == (
        True, 80, 0.5, 10.0, "diagonal",
    )  # fmt: skip
    assert (p.edge_sharpness, p.conf_floor, p.smoothness, p.cg_iters) == (5.0, 0.05, 1.0, 25)
    for bad in (
        {"align_solver": "qr"},
        {"text_coupling": "full"},
        {"grid": 0},
        {"cg_iters": -1},
        {"alpha_kk": -0.1},
        {"text_temperature": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_method("pearl", bad)
    assert "pearl" in {d["name"] for d in describe_methods()}


def test_cli_segment_with_pearl(tmp_path, capsys):
    import cv2

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (40, 70, 3), np.uint8))
    tiny = ["--model", "ovseg-tiny", "--pretrained", "none", "--templates", "single"]
    args = ["segment", str(path), "--out", str(tmp_path / "out"), "--classes", "cat", "dog"]
    code = cli.main([*args, "--method", "pearl", "--param", "align_solver=svd", "-q", *tiny])
    assert code == 0
    assert (tmp_path / "out" / "a_labels.png").is_file()
    assert cli.main(["methods"]) == 0 and "pearl" in capsys.readouterr().out


def eval_cfg(tmp_path, *flags):
    """The eval config of `ovseg eval` with these flags."""
    args = cli.build_parser().parse_args(["eval", "--root", str(tmp_path), *flags])
    vocabulary = eval_vocabulary(args)
    return eval_config(args, dataset_spec(args, vocabulary), vocabulary)


def test_eval_presets_follow_the_official_configs(tmp_path):
    voc = eval_cfg(tmp_path, "--dataset", "voc21", "--method", "pearl")
    assert (voc.mode, voc.short_side, voc.prob_threshold) == ("whole", 336, 0.1)
    assert voc.background_words  # the class file's background words
    assert eval_cfg(tmp_path, "--dataset", "voc20", "--method", "pearl").mode == "whole"
    assert eval_cfg(tmp_path, "--dataset", "coco_stuff", "--method", "pearl").short_side == 336
    city = eval_cfg(tmp_path, "--dataset", "cityscapes", "--method", "pearl")
    assert (city.mode, city.short_side) == ("slide", 560)
    assert city.method_params == {"alpha_kk": 0.3, "grid": 224}
    ade = eval_cfg(tmp_path, "--dataset", "ade20k", "--method", "pearl", "--param", "alpha_kk=0.2")
    assert ade.method_params == {"alpha_kk": "0.2"}  # a flag wins over the preset
    ctx = eval_cfg(tmp_path, "--dataset", "context60", "--method", "pearl")
    assert (ctx.mode, ctx.prob_threshold, ctx.method_params) == ("slide", 0.1, {})
    forced = eval_cfg(tmp_path, "--dataset", "voc21", "--method", "pearl", "--mode", "slide")
    assert forced.mode == "slide"
    other = eval_cfg(tmp_path, "--dataset", "voc21", "--method", "naclip")
    assert other.mode == "slide" and other.method_params == {}


def test_node_parameters_cover_pearl():
    from ovseg_ros.ros import params as P
    from ovseg_ros.ros.param_table import method_parameters

    names = {mp.name: mp.default for mp in method_parameters()}
    assert names["method_params.pearl.alpha_kk"] == 0.08
    assert names["method_params.pearl.tlp"] is True
    values = {"method": "pearl", "method_params.pearl.tlp": False, "method_params.pearl.grid": 80}
    cfg, _ = P.split_values(values)
    assert cfg.method == "pearl" and cfg.method_params == {"tlp": False}


# --- the real ViT-B/16 architecture ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "short_side", "mode"), [((240, 320), 224, "whole"), ((200, 260), 224, "slide")]
)
def test_vitb16_end_to_end(vitb16_backbone, size, short_side, mode):
    config = SegmenterConfig(
        **TINY_CONFIG | {"model_name": "ViT-B-16"},
        method="pearl",
        short_side=short_side,
        mode=mode,
        vocabulary=VOCAB,
    )
    seg = Segmenter(config, backbone=vitb16_backbone)
    frame = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    logits, vocab = seg.dense_logits(frame)
    assert logits.shape == (len(vocab.queries), *resized_shape(*size, short_side, 16))
    assert torch.isfinite(logits).all()
    result = seg.segment(frame)
    assert result.labels.shape == size
    assert set(np.unique(result.labels)) <= set(range(len(VOCAB))) | {255}
    assert result.timings["tlp"] < result.timings["model"]
    # 64-dim heads with 12 of them: the scores on the real block's q, k against the reference.
    image = vitb16_backbone.normalize(torch.rand(1, 3, 32, 48, generator=torch.Generator()))
    with torch.inference_mode():
        x, _, _ = vitb16_backbone.forward_to_last(image)
        q, k, _ = ref_qkv(vitb16_backbone.blocks[-1], x, vitb16_backbone.heads)
        scores = procrustes_scores(q, k, 0.08, "polar", 5)
    assert scores.shape == (1, 12, 7, 7)
    expected, _ = ref_scores_per_head(q[0, 5], k[0, 5], 0.08, five_steps)
    torch.testing.assert_close(scores[0, 5], expected, atol=1e-3, rtol=1e-4)
