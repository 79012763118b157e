"""k-means in a PCA feature space, and the stratified held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster_jobs.data.clustering import cluster_images, heldout_mask
from ddm_nodes.errors import DDMError
from ddm_nodes.pixels import to_model_range

K = 4
DIMS = 16


@pytest.fixture(scope="module")
def clustered(digits_set):
    return cluster_images(digits_set.images, K, dims=DIMS, seed=0)


def test_same_seed_gives_the_same_clustering(digits_set, clustered):
    again = cluster_images(digits_set.images, K, dims=DIMS, seed=0)
    # bitwise: the same code on the same bytes in this process; PCA runs on one BLAS thread,
    # and OpenMP's summation order moves only the last bits of the float64 k-means, which
    # rounding to the float32 centroids drops
    np.testing.assert_array_equal(again.assignments, clustered.assignments)
    assert torch.equal(again.space.centroids, clustered.space.centroids)
    assert torch.equal(again.space.extractor.components, clustered.space.extractor.components)
    # inertia is a float sum whose order OpenMP may change; everything else is exact
    assert again.stats.model_copy(update={"inertia": 0.0}) == clustered.stats.model_copy(
        update={"inertia": 0.0}
    )
    assert again.stats.inertia == pytest.approx(clustered.stats.inertia, rel=1e-9)


def _check_consistent(images, result, k):
    n = len(images)
    a = result.assignments
    assert a.shape == (n,) and a.dtype == np.int64
    assert set(np.unique(a)) == set(range(k))
    counts = [int((a == c).sum()) for c in range(k)]
    assert result.stats.counts == counts
    assert sum(result.stats.counts) == n
    assert result.stats.largest_smallest_ratio == pytest.approx(max(counts) / min(counts))
    assert result.stats.silhouette_sample == min(5000, n)
    assert result.space.centroids.shape == (k, result.space.extractor.dims)

    # k-means' own invariants, recomputed here in float64
    z = result.space.embed(to_model_range(images)).double().numpy()
    centroids = result.space.centroids.double().numpy()
    d = np.sqrt(((z[:, None, :] - centroids[None]) ** 2).sum(-1))
    own = d[np.arange(n), a]
    # every image sits at its nearest centroid (up to float32 rounding of the centroids)
    assert np.all(own <= d.min(axis=1) * (1 + 1e-5) + 1e-5)
    # each centroid is the mean of its members
    for c in range(k):
        np.testing.assert_allclose(centroids[c], z[a == c].mean(axis=0), atol=1e-3)
    assert result.stats.inertia == pytest.approx(float((own**2).sum()), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_stats_are_consistent_with_assignments(digits_set, clustered, seed):
    result = clustered if seed == 0 else cluster_images(digits_set.images, K, dims=DIMS, seed=seed)
    _check_consistent(digits_set.images, result, K)


def test_silhouette_matches_sklearn_on_the_whole_set(digits_set, clustered):
    from sklearn.metrics import silhouette_score

    z = clustered.space.embed(to_model_range(digits_set.images)).double().numpy()
    # the sample (5000) covers all 1,797 images, so the score is the full one
    expected = silhouette_score(z, clustered.assignments)
    assert clustered.stats.silhouette == pytest.approx(expected, abs=1e-4)


def test_pca_dims_capped_by_pixels(digits_set):
    result = cluster_images(digits_set.images[:200], 3, dims=500, seed=0)
    assert result.space.extractor.dims == 8 * 8
    _check_consistent(digits_set.images[:200], result, 3)


def test_pixel_features(digits_set):
    result = cluster_images(digits_set.images[:300], 3, method="pixels", seed=0)
    assert result.space.extractor.dims == 64
    _check_consistent(digits_set.images[:300], result, 3)


@pytest.mark.parametrize("k", [1, 0, -3, 11])
def test_k_out_of_range(digits_set, k):
    with pytest.raises(DDMError, match="--clusters"):
        cluster_images(digits_set.images[:10], k)


def test_too_few_distinct_images_is_a_user_error():
    images = np.zeros((10, 4, 4, 1), np.uint8)
    images[5:] = 200  # two distinct images, three clusters asked
    with pytest.warns(Warning):  # scikit-learn's own "fewer distinct clusters" notice
        with pytest.raises(DDMError, match="fewer --clusters"):
            cluster_images(images, 3, dims=2)


# --- held-out split ------------------------------------------------------------------------


def _assignments(sizes: list[int], seed: int = 0) -> np.ndarray:
    a = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(a)


@pytest.mark.parametrize(
    "sizes,fraction",
    [([10, 7, 1, 33], 0.1), ([3, 4, 20], 0.9), ([50, 50], 0.0), ([2, 9, 40], 0.3)],
)
def test_heldout_is_stratified_by_cluster(sizes, fraction):
    a = _assignments(sizes)
    mask = heldout_mask(a, fraction, seed=7)
    assert mask.shape == a.shape and mask.dtype == bool
    for c, n in enumerate(sizes):
        held = int(mask[a == c].sum())
        assert held == min(round(fraction * n), n - 1)
        assert n - held >= 1  # every cluster keeps at least one image for training


def test_heldout_is_deterministic_and_seeded():
    a = _assignments([200, 300, 150])
    first = heldout_mask(a, 0.2, seed=5)
    np.testing.assert_array_equal(first, heldout_mask(a, 0.2, seed=5))
    others = [heldout_mask(a, 0.2, seed=s) for s in range(6, 10)]
    # the counts are the same for every seed, the chosen images are not all the same
    assert all(o.sum() == first.sum() for o in others)
    assert any(not np.array_equal(o, first) for o in others)
