"""CLIPtrase (METHODS.md section 3) against its formulas, written here independently.

The references use plain torch ops on the tiny model's weights (ln_1, in_proj, out_proj, mlp,
ln_post, proj), explicit loops, scikit-learn's DBSCAN on raw rows and scipy's median filter, so
a mistake in the engine's head handling, recalibration, clustering, region maps or vote shows up.
"""

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from scipy.ndimage import median_filter
from sklearn.cluster import DBSCAN

from ovseg_ros.engine import Segmenter, SegmenterConfig, create_method
from ovseg_ros.engine.methods import make_params
from ovseg_ros.engine.methods.base import Method, collect_timings
from ovseg_ros.engine.methods.cliptrase import (
    cluster_maps,
    dbscan_settings,
    patch_correlation,
    region_map,
    region_vote,
    remove_global,
    sample_rows,
)

GRID = (3, 5)  # a 48 x 80 image with 16-pixel patches


# --- independent reference math ------------------------------------------------------------


def split_heads(t, heads):
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def ref_qkv(block, x, heads):
    """Q, K, V of ln_1(x) with the block's in_proj, split into heads."""
    h = block.ln_1(x)
    q, k, v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def ref_last_block(backbone, x):
    """x + O(SM(sQQ^T) + SM(sKK^T) + SM(sVV^T)), then + MLP(ln_2(.))."""
    block = backbone.blocks[-1]
    q, k, v = ref_qkv(block, x, backbone.heads)
    s = q.shape[-1] ** -0.5
    a = sum(torch.softmax(s * t @ t.transpose(-1, -2), dim=-1) for t in (q, k, v))
    b, heads, n, d = v.shape
    mixed = (a @ v).permute(0, 2, 1, 3).reshape(b, n, heads * d)
    y = x + mixed @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    return y + block.mlp(block.ln_2(y))


def ref_correlation(q, k, v):
    """Mean over heads of (cos qq + cos kk + cos vv) / 3, with torch.cosine_similarity loops."""
    b, heads, n, _ = q.shape
    out = torch.zeros(b, n, n)
    for i in range(b):
        for h in range(heads):
            for t in (q, k, v):
                rows = t[i, h]
                out[i] += F.cosine_similarity(rows[:, None], rows[None, :], dim=-1)
    return out / (3 * heads)


def ref_remove_global(corr):
    """C'_ij = max(0, C_ij - C_0j) for patches i, j >= 1, written with loops."""
    b, n, _ = corr.shape
    out = torch.zeros(b, n - 1, n - 1)
    for i in range(1, n):
        for j in range(1, n):
            out[:, i - 1, j - 1] = (corr[:, i, j] - corr[:, 0, j]).clamp_min(0)
    return out


def two_cluster_rows(h=6, w=8, noise=0.02, seed=0):
    """A synthetic recalibrated correlation: left half and right half are two clusters."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    left = torch.tensor([(i % w) < w // 2 for i in range(n)])
    rows = torch.where(left[:, None] == left[None, :], 1.0, 0.0)
    return (rows + noise * torch.rand(n, n, generator=g)).clamp_min(0), left


@pytest.fixture(scope="module")
def images(tiny_backbone):
    """Two normalised random 48 x 80 images (a 3 x 5 patch grid)."""
    g = torch.Generator().manual_seed(3)
    return tiny_backbone.normalize(torch.rand(2, 3, 48, 80, generator=g))


@pytest.fixture(scope="module")
def vocab(tiny_backbone):
    """Synonyms and background words, as the engine builds them."""
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=["cat; kitten", "dog", "tree"])
    return Segmenter(config, backbone=tiny_backbone).vocabulary


# --- last block, correlation, recalibration --------------------------------------------------


def test_last_block_is_qq_kk_vv_with_residual_and_ffn(tiny_backbone, images):
    x, grid, _ = tiny_backbone.forward_to_last(images)
    y, _ = create_method("cliptrase").last_block(tiny_backbone, x, grid)
    torch.testing.assert_close(y, ref_last_block(tiny_backbone, x), atol=1e-5, rtol=1e-5)


def test_attention_rows_sum_to_three(tiny_backbone, images):
    x, grid, _ = tiny_backbone.forward_to_last(images)
    q, k, v = tiny_backbone.qkv(tiny_backbone.blocks[-1], x)
    a = create_method("cliptrase").attention(q, k, v, grid)
    torch.testing.assert_close(a.sum(-1), torch.full(a.shape[:-1], 3.0))


def test_patch_correlation_formula(tiny_backbone, images):
    x, _, cap = tiny_backbone.forward_to_last(images, capture_inputs=True)
    q, k, v = ref_qkv(tiny_backbone.blocks[-2], cap.inputs[-2], tiny_backbone.heads)
    torch.testing.assert_close(
        patch_correlation(q, k, v), ref_correlation(q, k, v), atol=1e-5, rtol=0
    )


def test_remove_global_formula():
    corr = torch.randn(2, 7, 7)
    out = remove_global(corr)
    torch.testing.assert_close(out, ref_remove_global(corr))
    assert out.shape == (2, 6, 6) and torch.all(out >= 0)


def test_correlation_uses_block_l_minus_1(tiny_backbone, images):
    # C' comes from the second-to-last block's normal forward, applied to that block's input.
    _, _, cap = tiny_backbone.forward_to_last(images, capture_inputs=True)
    block_input = cap.inputs[-2]
    torch.testing.assert_close(
        block_input, tiny_backbone.blocks[-2 - 1](cap.inputs[-3]), atol=1e-5, rtol=1e-5
    )
    q, k, v = ref_qkv(tiny_backbone.blocks[-2], block_input, tiny_backbone.heads)
    expected = ref_remove_global(ref_correlation(q, k, v))
    got = create_method("cliptrase").correlation(tiny_backbone, block_input)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- DBSCAN settings, budget and clusters ---------------------------------------------------


def test_dbscan_settings_reproduce_the_published_pairs():
    p = make_params("cliptrase")
    eps, min_samples = dbscan_settings(p, 196, 196)
    assert math.isclose(eps, 0.7) and min_samples == 3
    eps, min_samples = dbscan_settings(p, 441, 441)
    assert math.isclose(eps, 1.1) and min_samples == 7
    # In between and beyond: log-log interpolation, monotone.
    eps_588, ms_588 = dbscan_settings(p, 588, 588)  # 640x480 at short side 336: 21 x 28
    a = math.log(1.1 / 0.7) / math.log(441 / 196)
    assert math.isclose(eps_588, 0.7 * (588 / 196) ** a)
    assert eps_588 > 1.1 and ms_588 >= 7


def test_dbscan_settings_follow_subsampling_and_overrides():
    p = make_params("cliptrase")
    full = dbscan_settings(p, 441, 441)
    half = dbscan_settings(p, 441, 221)
    assert half[0] == full[0]  # rows keep all 441 columns: same distance scale
    assert half[1] == round(7 * 221 / 441)  # neighbourhoods thin out with the rows kept
    fixed = make_params("cliptrase", {"eps": 0.5, "min_samples": 4})
    assert dbscan_settings(fixed, 1000, 300) == (0.5, 4)


def test_sample_rows_stays_within_budget():
    assert torch.equal(sample_rows(588, 1024), torch.arange(588))
    rows = sample_rows(1036, 1024)  # 448 x 597 -> 28 x 37 patches
    assert len(rows) <= 1024 and torch.equal(rows, torch.arange(0, 1036, 2))
    assert len(sample_rows(2688, 1024)) <= 1024


def test_cluster_maps_match_sklearn_on_known_clusters():
    rows, left = two_cluster_rows()
    rows[5] = 5.0  # an outlier row: DBSCAN noise, in no cluster
    p = make_params("cliptrase", {"eps": 1.0, "min_samples": 3})
    maps = cluster_maps(rows, p)
    labels = DBSCAN(eps=1.0, min_samples=3).fit_predict(rows.numpy())
    assert labels[5] == -1 and sorted(set(labels) - {-1}) == [0, 1]
    expected = torch.stack([rows[torch.from_numpy(labels == c)].mean(0) for c in (0, 1)])
    torch.testing.assert_close(maps, expected)
    # The two known halves: each map is high on its own half.
    for m in maps:
        assert (m[left].mean() > 0.9) != (m[~left].mean() > 0.9)


def test_cluster_maps_with_a_budget_use_the_sampled_rows():
    rows, left = two_cluster_rows()
    p = make_params("cliptrase", {"eps": 1.0, "min_samples": 3, "max_cluster_patches": 20})
    maps = cluster_maps(rows, p)  # 48 rows, budget 20 -> every 3rd row (16 rows)
    kept = torch.arange(0, 48, 3)
    labels = DBSCAN(eps=1.0, min_samples=3).fit_predict(rows[kept].numpy())
    expected = torch.stack(
        [rows[kept][torch.from_numpy(labels == c)].mean(0) for c in sorted(set(labels) - {-1})]
    )
    assert maps.shape == (2, 48)
    torch.testing.assert_close(maps, expected)


def test_cluster_maps_may_find_nothing():
    rows, _ = two_cluster_rows()
    maps = cluster_maps(rows, make_params("cliptrase", {"eps": 0.01, "min_samples": 5}))
    assert maps.shape == (0, 48)


# --- region maps and vote -------------------------------------------------------------------


def test_region_map_matches_reference_pipeline():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(3, 4, 5, generator=g)
    regions = region_map(maps, (64, 80), upsample=4, median_size=7)
    up = F.interpolate(maps[None], size=(16, 20), mode="bilinear", align_corners=False)[0]
    smooth = torch.from_numpy(np.stack([median_filter(m, size=7) for m in up.numpy()]))
    full = F.interpolate(smooth[None], size=(64, 80), mode="bilinear", align_corners=False)[0]
    assert regions.shape == (64, 80) and regions.dtype == torch.long
    assert torch.equal(regions, full.argmax(0))


def test_region_map_of_known_clusters_splits_the_halves():
    rows, left = two_cluster_rows()
    maps = cluster_maps(rows, make_params("cliptrase", {"eps": 1.0, "min_samples": 3}))
    regions = region_map(maps.view(2, 6, 8), (96, 128), 4, 7)
    left_id = int(regions[48, 10])
    assert torch.all(regions[:, :60] == left_id) and torch.all(regions[:, 68:] == 1 - left_id)


def vote_case():
    """Queries: cat, kitten (class 0), dog (class 1), sky (background); two regions."""
    query_class = torch.tensor([0, 0, 1, 2])
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 8, generator=g)
    regions = torch.zeros(6, 8, dtype=torch.long)
    regions[:, 4:] = 1
    return logits, regions, query_class


def test_region_vote_majority(make_segmenter):
    logits, regions, query_class = vote_case()
    out = region_vote(logits, regions, 2, query_class, 3, "majority")
    group = query_class[logits.argmax(0)]
    out_group = query_class[out.argmax(0)]
    for r in (0, 1):
        mask = regions == r
        counts = torch.bincount(group[mask], minlength=3)
        winner = int(counts.argmax())
        assert torch.all(out_group[mask] == winner)
        agree = mask & (group == winner)
        # Agreeing pixels keep their logits; the others get one agreeing pixel's logits: the one
        # nearest to the agreeing pixels' mean.
        torch.testing.assert_close(out[:, agree], logits[:, agree])
        members = logits[:, agree].T
        rep = members[((members - members.mean(0)) ** 2).sum(1).argmin()]
        others = mask & ~agree
        assert others.any()
        torch.testing.assert_close(out[:, others], rep[:, None].expand(-1, int(others.sum())))


def test_region_vote_counts_synonyms_as_one_class():
    query_class = torch.tensor([0, 0, 1, 2])
    logits = torch.full((4, 1, 10), -5.0)
    # 3 pixels "cat", 3 "kitten" (class 0: 6 votes) and 4 "dog": the region becomes class 0,
    # although "dog" is the most frequent single query.
    for px, q in enumerate([0, 0, 0, 1, 1, 1, 2, 2, 2, 2]):
        logits[q, 0, px] = 5.0
    out = region_vote(logits, torch.zeros(1, 10, dtype=torch.long), 1, query_class, 3)
    assert torch.all(query_class[out.argmax(0)] == 0)


def test_region_vote_background_words_form_one_group():
    query_class = torch.tensor([0, 1, 2, 2, 2])  # cat, dog, then three background words
    logits = torch.full((5, 1, 7), -5.0)
    for px, q in enumerate([0, 0, 0, 2, 3, 4, 4]):
        logits[q, 0, px] = 5.0
    out = region_vote(logits, torch.zeros(1, 7, dtype=torch.long), 1, query_class, 3)
    assert torch.all(query_class[out.argmax(0)] == 2)  # 4 background votes beat 3 cat votes


def test_region_vote_mean():
    logits, regions, query_class = vote_case()
    out = region_vote(logits, regions, 2, query_class, 3, "mean")
    for r in (0, 1):
        mask = regions == r
        mean = logits[:, mask].mean(1)
        torch.testing.assert_close(out[:, mask], mean[:, None].expand(-1, int(mask.sum())))


# --- the method ----------------------------------------------------------------------------


def test_logits_without_clusters_are_the_upsampled_patch_logits(tiny_backbone, images, vocab):
    method = create_method("cliptrase", {"min_samples": 10_000})
    out = method.logits(tiny_backbone, images, vocab)
    x, _, _ = tiny_backbone.forward_to_last(images)
    y = ref_last_block(tiny_backbone, x)
    feats = F.normalize(tiny_backbone.visual.ln_post(y[:, 1:]) @ tiny_backbone.visual.proj, dim=-1)
    patch = (100.0 * feats @ vocab.embeddings.T).permute(0, 2, 1).reshape(2, -1, *GRID)
    expected = F.interpolate(patch, size=(48, 80), mode="bilinear", align_corners=False)
    assert out.shape == (2, len(vocab.queries), 48, 80)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-4)


def test_logits_vote_inside_each_region(tiny_backbone, images, vocab):
    method = create_method("cliptrase", {"eps": 1.0, "min_samples": 2})
    out = method.logits(tiny_backbone, images, vocab)
    plain = create_method("cliptrase", {"min_samples": 10_000}).logits(tiny_backbone, images, vocab)
    x, grid, cap = tiny_backbone.forward_to_last(images, capture_inputs=True)
    recal = method.correlation(tiny_backbone, cap.inputs[-2])
    groups = vocab.num_classes + 1
    for i in range(2):
        maps = cluster_maps(recal[i], method.params)
        assert maps.shape[0] >= 1
        regions = region_map(maps.view(-1, *grid), (48, 80), 4, 7)
        expected = region_vote(plain[i], regions, maps.shape[0], vocab.query_class, groups)
        torch.testing.assert_close(out[i], expected)
        label = vocab.query_class[out[i].argmax(0)]
        for r in regions.unique():
            assert len(label[regions == r].unique()) == 1  # one label per region


def test_published_defaults():
    p = create_method("cliptrase").params
    assert p.logit_scale == 100.0 and p.keep_residual and p.keep_ffn
    assert (p.eps_224, p.min_samples_224, p.eps_336, p.min_samples_336) == (0.7, 3, 1.1, 7)
    assert (p.upsample, p.median_size, p.vote) == (4, 7, "majority")
    assert p.max_cluster_patches == 1024


@pytest.mark.parametrize(
    ("key", "value"),
    [("vote", "median"), ("eps", -1.0), ("eps_224", 0.0), ("min_samples_336", 0),
     ("max_cluster_patches", 0), ("upsample", 0), ("median_size", 0)],
)  # fmt: skip
def test_invalid_parameters(key, value):
    with pytest.raises(ValueError, match=key):
        create_method("cliptrase", {key: value})


# --- extra timings -----------------------------------------------------------------------------


def test_segment_reports_the_clustering_time(make_segmenter):
    seg = make_segmenter(method="cliptrase", short_side=64)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    result = seg.segment(image)
    assert {"model", "postprocess", "total", "cluster", "regions"} <= set(result.timings)
    assert 0 <= result.timings["cluster"] <= result.timings["model"]
    seg.update(mode="slide", crop=32, stride=16)  # several crops: the times add up per frame
    assert seg.segment(image).timings["cluster"] >= 0
    seg.set_method("naclip")
    assert set(seg.segment(image).timings) == {"model", "postprocess", "total"}


def test_timings_are_collected_per_thread():
    seen = {}

    def frame(name, ms):
        with collect_timings() as sink:
            Method.record_timing("cluster", ms)
            Method.record_timing("cluster", ms)
            barrier.wait()
            seen[name] = dict(sink)

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=frame, args=(n, ms)) for n, ms in (("a", 1.0), ("b", 5.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": {"cluster": 2.0}, "b": {"cluster": 10.0}}
    Method.record_timing("cluster", 1.0)  # outside a frame: ignored


# --- the real architecture ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("size", "short_side"), [((480, 640), 336), ((250, 250), 224)])
def test_vitb16_end_to_end(vitb16_backbone, size, short_side):
    config = SegmenterConfig(
        **{**TINY_CONFIG, "model_name": "ViT-B-16"},
        method="cliptrase",
        short_side=short_side,
        vocabulary=["cat", "dog; puppy", "tree"],
    )
    seg = Segmenter(config, backbone=vitb16_backbone)
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    logits, vocab = seg.dense_logits(image)
    h, w = (short_side, round(size[1] * short_side / size[0]))
    assert logits.shape == (len(vocab.queries), h, w)
    assert torch.isfinite(logits).all()
    result = seg.segment(image)
    assert result.labels.shape == size
    assert set(np.unique(result.labels)) <= set(range(3)) | {255}
    assert result.timings["cluster"] < result.timings["model"]
