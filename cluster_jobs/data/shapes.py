"""`--dataset shapes`: procedural RGB images of one shape on a background, in labelled families.

A stand-in for real RGB data that needs no download, so tests, benchmarks and examples can
run colour images through the whole pipeline at any size. Each image is one shape (disc,
square, triangle, ring) in a warm (red to yellow) or cool (cyan to blue) colour, on a dark
plain background or light two-tone stripes: 4 x 2 x 2 = 16 families, and the family index
is the label. Within a family the position, size, rotation, colours and stripe angle, width
and phase vary, so no two images are alike; palette and background change an image's mean
colour, which is the structure a k-means on pixel features finds first.

Rendering is vectorised numpy over chunks of images: coordinate grids, signed distances and
edges anti-aliased over about one pixel. Every random draw is made once per image before
rendering, so a seed gives the same bytes whatever the chunking, and the same scenes at every
`image_size`.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import TYPE_CHECKING

import numpy as np

from ddm_nodes.errors import DDMError

if TYPE_CHECKING:
    from cluster_jobs.data.sources import ImageSet

MIN_SIZE = 8
CHUNK_PIXELS = 1 << 17  # pixels rendered at once: about 10 MB of scratch beside the output
# A shape's scale r, in half-sides of the image (it fits in a circle of radius EXTENT * r);
# its centre keeps that circle within MARGIN of the middle, so corners are background.
RADIUS_RANGE = (0.32, 0.5)
MARGIN = 0.95
STRIPE_PERIOD_RANGE = (0.25, 0.5)  # in half-sides: 4 to 8 stripe pairs across the image
MIN_STRIPE_PERIOD_PX = 3.0  # narrower stripes alias at small sizes
STRIPE_CONTRAST = (0.25, 0.4)  # how much darker the stripes are than their background

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Scenes = dict[str, np.ndarray]


def _disc(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - 0.9 * r


def _square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r  # exact inside, rounded by <1 px outside


def _triangle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Equilateral, circumradius 1.35 r: the farthest of its three edges' half-planes."""
    d = v  # edge normals at 90, 210 and 330 degrees; inradius = circumradius / 2
    for angle in (7 * np.pi / 6, 11 * np.pi / 6):
        d = np.maximum(d, np.float32(np.cos(angle)) * u + np.float32(np.sin(angle)) * v)
    return d - 0.675 * r


def _ring(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(np.hypot(u, v) - 0.72 * r) - 0.28 * r


# Each shape fits inside a circle of radius EXTENT * r, with areas within 10% of each other.
SHAPES: dict[str, Sdf] = {"disc": _disc, "square": _square, "triangle": _triangle, "ring": _ring}
EXTENT = 1.35
PALETTES = {"warm": (0.0, 50.0), "cool": (185.0, 245.0)}  # foreground hue ranges, degrees
BACKGROUNDS = ("plain", "stripes")  # plain: dark, near-grey; stripes: light two-tone
FAMILIES = [f"{s}/{p}/{b}" for s, p, b in product(SHAPES, PALETTES, BACKGROUNDS)]


def shapes(count: int, image_size: int, seed: int) -> ImageSet:
    """`count` images (count, image_size, image_size, 3) uint8, families balanced within 1."""
    from cluster_jobs.data.sources import ImageSet

    labels, scenes = shape_scenes(count, image_size, seed)
    return ImageSet("shapes", render(scenes, image_size), labels, list(FAMILIES))


def shape_scenes(count: int, image_size: int, seed: int) -> tuple[np.ndarray, Scenes]:
    """The labels and every random choice of `count` images: a few numbers per image, so a
    reader renders any subset (`render(take(scenes, idx), size)`) without the others."""
    if image_size < MIN_SIZE:
        raise DDMError(f"shapes needs --image-size {MIN_SIZE} or more, not {image_size}")
    if count < 1:
        raise DDMError(f"shapes needs a count of 1 or more images, not {count}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(FAMILIES)).astype(np.int64)
    return labels, _draw_scenes(rng, labels)


def take(scenes: Scenes, idx: np.ndarray | slice) -> Scenes:
    return {k: a[idx] for k, a in scenes.items()}


def render(scenes: Scenes, image_size: int) -> np.ndarray:
    """Scenes -> (n, image_size, image_size, 3) uint8, rendered a chunk at a time."""
    count = len(scenes["shape"])
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    chunk = max(1, CHUNK_PIXELS // image_size**2)
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        images[part] = _render(take(scenes, part), image_size)
    return images


def _draw_scenes(rng: np.random.Generator, labels: np.ndarray) -> Scenes:
    """Every random choice per image: arrays of length N (colours (N, 3)), float32 but the
    integer shape index."""
    n = len(labels)
    shape, palette, background = np.unravel_index(
        labels, (len(SHAPES), len(PALETTES), len(BACKGROUNDS))
    )
    r = rng.uniform(*RADIUS_RANGE, n)
    reach = MARGIN - EXTENT * r  # the centre may move this far from the middle
    lo, hi = np.array(list(PALETTES.values())).T / 360.0
    hue = rng.uniform(lo[palette], hi[palette]) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.75, 1.0, n), rng.uniform(0.7, 1.0, n))
    # backgrounds: a faint tint of any hue; plain ones dark, striped ones light with
    # darker stripes
    striped = background == BACKGROUNDS.index("stripes")
    tint_hue, tint_sat = rng.random(n), rng.uniform(0.0, 0.2, n)
    base = np.where(striped, rng.uniform(0.8, 0.95, n), rng.uniform(0.1, 0.3, n))
    stripe = np.where(striped, base - rng.uniform(*STRIPE_CONTRAST, n), base)
    scenes = {
        "shape": shape,
        "r": r,
        "cx": rng.uniform(-1, 1, n) * reach,
        "cy": rng.uniform(-1, 1, n) * reach,
        "theta": rng.uniform(0, 2 * np.pi, n),
        "fg": fg,
        "bg_a": _hsv_to_rgb(tint_hue, tint_sat, base),
        "bg_b": _hsv_to_rgb(tint_hue, tint_sat, stripe),
        "stripe_angle": rng.uniform(0, np.pi, n),
        "stripe_period": rng.uniform(*STRIPE_PERIOD_RANGE, n),
        "stripe_phase": rng.uniform(0, 2 * np.pi, n),
    }
    return {k: a if k == "shape" else a.astype(np.float32) for k, a in scenes.items()}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) hue in [0, 1), saturation, value -> (N, 3) RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
    return v[:, None] * (1 - s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _render(scene: Scenes, size: int) -> np.ndarray:
    """One chunk of scenes -> (B, size, size, 3) uint8."""
    px = np.float32(2.0 / size)  # one pixel, in half-sides
    grid = (np.arange(size, dtype=np.float32) + 0.5) * px - 1  # pixel centres in [-1, 1]

    def col(name: str) -> np.ndarray:
        return scene[name][:, None, None]  # (B, 1, 1): broadcasts over rows and columns

    dx, dy = grid[None, None, :] - col("cx"), grid[None, :, None] - col("cy")  # (B, H, W)
    cos, sin = np.cos(col("theta")), np.sin(col("theta"))
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # the shape's own frame
    sdf = np.empty_like(u)
    for k, sdf_of in enumerate(SHAPES.values()):
        mine = scene["shape"] == k
        if mine.any():
            sdf[mine] = sdf_of(u[mine], v[mine], col("r")[mine])
    alpha = np.clip(0.5 - sdf / px, 0, 1)  # coverage: the edge fades over one pixel

    # stripes: a sine steepened so that it swings between the two tones within one pixel
    period = np.maximum(col("stripe_period"), MIN_STRIPE_PERIOD_PX * px)
    across = np.cos(col("stripe_angle")) * dx + np.sin(col("stripe_angle")) * dy
    wave = np.sin(2 * np.pi * across / period + col("stripe_phase"))
    tone = np.clip(0.5 + 0.5 * wave * period / (np.pi * px), 0, 1)

    bg_a, bg_b, fg = (scene[k][:, None, None, :] for k in ("bg_a", "bg_b", "fg"))
    bg = bg_a + (bg_b - bg_a) * tone[..., None]  # (B, H, W, 3)
    rgb = bg + (fg - bg) * alpha[..., None]
    return np.rint(rgb * 255).astype(np.uint8)
