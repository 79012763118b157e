"""`--dataset shapes` (procedural RGB families) and `count`/`seed` subsets of the other sources."""

from __future__ import annotations

import numpy as np
import pytest

from cluster_jobs.data import shapes as shapes_module
from cluster_jobs.data.clustering import cluster_images
from cluster_jobs.data.sources import load_source
from ddm_nodes.errors import DDMError

N_FAMILIES = 16  # 4 shapes x 2 palettes x 2 backgrounds


def _palette_and_background(data) -> tuple[np.ndarray, np.ndarray]:
    """Per image, read from its class name "shape/palette/background": 1 = cool / stripes."""
    parts = [name.split("/") for name in data.class_names]
    cool = np.array([p[1] == "cool" for p in parts], np.int64)
    stripes = np.array([p[2] == "stripes" for p in parts], np.int64)
    return cool[data.labels], stripes[data.labels]


def _purity(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose cluster's most common label is their own."""
    return sum(np.bincount(labels[assignments == c]).max() for c in np.unique(assignments)) / len(
        labels
    )


# --- shapes --------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images():
    a = load_source("shapes", 32, count=64, seed=3)
    b = load_source("shapes", 32, count=64, seed=3)
    c = load_source("shapes", 32, count=64, seed=4)
    assert a.images.tobytes() == b.images.tobytes()
    np.testing.assert_array_equal(a.labels, b.labels)
    # every image of another seed differs from its counterpart, by a lot on average
    diff = np.abs(a.images.astype(int) - c.images.astype(int)).mean(axis=(1, 2, 3))
    assert diff.min() > 0 and diff.mean() > 30
    # and no two images of one seed are the same
    assert len({im.tobytes() for im in a.images}) == 64


def test_bytes_do_not_depend_on_chunking(monkeypatch):
    whole = load_source("shapes", 16, count=50, seed=5)
    monkeypatch.setattr(shapes_module, "CHUNK_PIXELS", 16 * 16 * 3)  # 3 images per chunk
    chunked = load_source("shapes", 16, count=50, seed=5)
    assert whole.images.tobytes() == chunked.images.tobytes()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_sizes_dtypes_and_balanced_families(size):
    data = load_source("shapes", size, count=100, seed=0)
    assert data.source == "shapes"
    assert data.images.shape == (100, size, size, 3)
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
    assert len(data.class_names) == N_FAMILIES == len(set(data.class_names))
    counts = np.bincount(data.labels, minlength=N_FAMILIES)
    assert len(counts) == N_FAMILIES  # labels in range
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # 100 = 16 * 6 + 4
    # the images use the whole range: dark backgrounds, light stripes, saturated shapes
    assert data.images.min() < 40 and data.images.max() > 200


def test_defaults_are_4000_images_of_32_pixels():
    data = load_source("shapes")
    assert data.images.shape == (4000, 32, 32, 3)
    assert (np.bincount(data.labels) == 4000 // N_FAMILIES).all()


def test_class_names_are_shape_palette_background():
    names = load_source("shapes", 16, count=16).class_names
    parts = [name.split("/") for name in names]
    assert all(len(p) == 3 for p in parts)
    assert {p[0] for p in parts} == {"disc", "square", "triangle", "ring"}
    assert {p[1] for p in parts} == {"warm", "cool"}
    assert {p[2] for p in parts} == {"plain", "stripes"}
    assert len(set(map(tuple, parts))) == N_FAMILIES


@pytest.mark.parametrize("size", [16, 32, 64])
def test_each_image_shows_its_family(size):
    """Palette and background, read back from the pixels of every image."""
    data = load_source("shapes", size, count=400, seed=1)
    im = data.images.astype(int)
    palette, background = _palette_and_background(data)
    # The shape never reaches a corner: corners are background. Plain backgrounds are dark
    # (value <= 0.3), stripes light (value >= 0.4).
    corners = im[:, [0, 0, -1, -1], [0, -1, 0, -1]].max(axis=(1, 2))
    assert (corners[background == 0] <= 0.3 * 255 + 1).all()
    assert (corners[background == 1] >= 0.4 * 255 - 1).all()
    # The most saturated pixel is the shape's (backgrounds are near-grey): red over blue
    # when warm (hues 0-50 degrees), blue over red when cool (185-245 degrees).
    flat = im.reshape(len(im), -1, 3)
    top = flat[np.arange(len(im)), (flat.max(-1) - flat.min(-1)).argmax(1)]
    assert ((top[:, 0] > top[:, 2]) == (palette == 0)).all()


def test_sizes_render_the_same_scenes():
    """2x2-averaged 64-pixel images match the 32-pixel ones: edges are anti-aliased."""
    big = load_source("shapes", 64, count=200, seed=7).images.astype(float)
    small = load_source("shapes", 32, count=200, seed=7).images.astype(float)
    pooled = big.reshape(200, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    # measured 0.35 (hard edges: 1.1); out of 255, where another seed differs by ~78
    assert np.abs(pooled - small).mean() < 0.6


def test_shapes_too_small_is_refused():
    with pytest.raises(DDMError, match="shapes needs --image-size 8 or more"):
        load_source("shapes", 6, count=10)


def test_kmeans_on_pca_finds_the_families():
    """The pipeline's own clustering (PCA then k-means, K=4) on 2,000 images of 16 families.

    Chance: the purity of random clusters of the same sizes (about 0.075); the ceiling with
    4 clusters over 16 balanced families is 4/16 = 0.25. Measured for seeds 0-4: 0.248-0.250,
    and every cluster is one palette x background pair to within 1%: the clusters are made
    of whole families."""
    data = load_source("shapes", 16, count=2000, seed=0)
    assignments = cluster_images(data.images, k=4, method="pca", dims=64, seed=0).assignments
    rng = np.random.default_rng(0)
    chance = np.mean([_purity(rng.permutation(assignments), data.labels) for _ in range(20)])
    purity = _purity(assignments, data.labels)
    assert chance < 0.1
    assert purity > 0.22 and purity > 2.5 * chance
    palette, background = _palette_and_background(data)
    assert _purity(assignments, palette * 2 + background) > 0.95


# --- count and seed on the other sources ---------------------------------------------------


def test_count_takes_a_seeded_subset_in_order(digits_set):
    a = load_source("digits", count=100, seed=1)
    again = load_source("digits", count=100, seed=1)
    other = load_source("digits", count=100, seed=2)
    assert a.images.shape == (100, 8, 8, 1)
    np.testing.assert_array_equal(a.images, again.images)
    np.testing.assert_array_equal(a.labels, again.labels)
    assert a.images.tobytes() != other.images.tobytes()
    assert a.class_names == digits_set.class_names
    # each kept image is one of the source's, with its label, in the source's order
    where = {}
    for i, (im, y) in enumerate(zip(digits_set.images, digits_set.labels, strict=True)):
        where.setdefault((im.tobytes(), int(y)), []).append(i)
    last = -1
    for im, y in zip(a.images, a.labels, strict=True):
        later = [i for i in where.get((im.tobytes(), int(y)), []) if i > last]
        assert later, "a kept image is not in the source after the previous one"
        last = later[0]
    # not simply the first 100
    assert not np.array_equal(a.images, digits_set.images[:100])


def test_count_of_all_images_keeps_the_source(digits_set):
    data = load_source("digits", count=len(digits_set), seed=9)
    np.testing.assert_array_equal(data.images, digits_set.images)
    np.testing.assert_array_equal(data.labels, digits_set.labels)


def test_count_then_resize(digits_set):
    small = load_source("digits", count=10, seed=4)
    data = load_source("digits", 16, count=10, seed=4)
    assert data.images.shape == (10, 16, 16, 1)
    np.testing.assert_array_equal(data.labels, small.labels)


def test_count_larger_than_the_source_names_the_limit():
    with pytest.raises(DDMError) as info:
        load_source("digits", count=1798)
    message = str(info.value)
    assert "\n" not in message
    assert "--count 1798 is more than the 1797 images in digits" in message
    assert "use --count 1797 or fewer" in message


@pytest.mark.parametrize("name", ["digits", "shapes"])
@pytest.mark.parametrize("count", [1, 0, -5])
def test_count_below_two_is_refused(name, count):
    with pytest.raises(DDMError, match=rf"--count {count} is too small; use 2 or more"):
        load_source(name, count=count)


@pytest.mark.parametrize("name", ["shapes:extra", "shape"])
def test_unknown_names_list_shapes(name):
    with pytest.raises(DDMError, match="unknown dataset") as info:
        load_source(name)
    assert "'shapes'" in str(info.value)
