"""Reference preprocessing in numpy (no TensorFlow): normalisation, training patches, test patches, stitching.

The geometry follows ``tf.image.extract_patches`` exactly as the reference uses it (spec §2.2, §2.3):

* training: centre crop to whole patches (rows 88:1112, cols 110:1390 at 1200x1500/256), then
  non-overlapping patches in row-major order -> (20, 256, 256, C);
* test: TF "SAME" zero padding (56 rows top and bottom, 82 columns left and right) and stride
  ``patch - overlap`` = 176 -> 7 x 9 = 63 patches;
* stitch: keep the central ``stride x stride`` of every test patch, tile them, crop at (16, 42) -> (1200, 1500, C).

Every output pixel of ``stitch`` comes from exactly one patch centre, so ``stitch(test_patches(x)) == x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Channel layout of an input image: refs (S1-S6 reflectance) then bts (S7-S9 brightness temperature).
N_REFS = 6
N_BTS = 3
N_CHANNELS = N_REFS + N_BTS

# Fixed normalisation of the reference v1.1 (and of the NYU runs behind the published 0.896).
BT_OFFSET, BT_SCALE = 270.0, 22.0
REFS_OFFSET = 0.5


@dataclass(frozen=True)
class Geometry:
    """Patch geometry derived from image size, patch size and test-patch overlap (CROP_SIZE)."""

    height: int = 1200
    width: int = 1500
    patch: int = 256
    overlap: int = 80

    @classmethod
    def from_config(cls, cfg) -> "Geometry":
        img = cfg.image
        return cls(img.height, img.width, img.patch_size, img.overlap)

    # -- training patches ------------------------------------------------------------------------------------
    @property
    def train_grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch

    @property
    def train_crop(self) -> tuple[slice, slice]:
        rows, cols = self.train_grid
        top = (self.height % self.patch) // 2
        left = (self.width % self.patch) // 2
        return slice(top, top + rows * self.patch), slice(left, left + cols * self.patch)

    @property
    def patches_per_train_image(self) -> int:
        rows, cols = self.train_grid
        return rows * cols

    # -- test patches ----------------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.patch - self.overlap

    @property
    def test_grid(self) -> tuple[int, int]:
        return math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)

    @property
    def patches_per_test_image(self) -> int:
        rows, cols = self.test_grid
        return rows * cols

    @property
    def test_padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """TF 'SAME' padding: the total is split with the smaller half first."""
        pads = []
        for size, n in ((self.height, self.test_grid[0]), (self.width, self.test_grid[1])):
            total = max((n - 1) * self.stride + self.patch - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)  # type: ignore[return-value]

    @property
    def stitch_offset(self) -> tuple[int, int]:
        """Where the original image starts in the tiled patch centres: padding minus the trimmed border."""
        trim = self.overlap // 2
        (top, _), (left, _) = self.test_padding
        return top - trim, left - trim


DEFAULT_GEOMETRY = Geometry()


def _check_image(a: np.ndarray, g: Geometry, what: str) -> None:
    if a.ndim != 3 or a.shape[:2] != (g.height, g.width):
        raise ValueError(f"{what} expects an array of shape ({g.height}, {g.width}, C), got {a.shape}")


def train_patches(a: np.ndarray, geometry: Geometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Centre-cropped, non-overlapping patches in row-major order: (H, W, C) -> (rows*cols, P, P, C)."""
    g = geometry
    _check_image(a, g, "train_patches")
    rows, cols = g.train_grid
    r, c = g.train_crop
    crop = a[r, c]
    p = g.patch
    return np.ascontiguousarray(
        crop.reshape(rows, p, cols, p, a.shape[2]).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p, p, a.shape[2])
    )


def test_patches(a: np.ndarray, geometry: Geometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Zero-padded (TF SAME), overlapping patches with stride ``patch - overlap``: (H, W, C) -> (63, P, P, C)."""
    g = geometry
    _check_image(a, g, "test_patches")
    padded = np.pad(a, (*g.test_padding, (0, 0)))
    rows, cols = g.test_grid
    s, p = g.stride, g.patch
    out = np.empty((rows * cols, p, p, a.shape[2]), dtype=a.dtype)
    for i in range(rows):
        for j in range(cols):
            out[i * cols + j] = padded[i * s: i * s + p, j * s: j * s + p]
    return out


def stitch(patches: np.ndarray, geometry: Geometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Inverse of ``test_patches``: keep each patch's central stride x stride, tile, crop -> (H, W, C)."""
    g = geometry
    rows, cols = g.test_grid
    p, s = g.patch, g.stride
    if patches.ndim != 4 or patches.shape[0] != rows * cols or patches.shape[1:3] != (p, p):
        raise ValueError(f"stitch expects ({rows * cols}, {p}, {p}, C) patches, got {patches.shape}")
    trim = g.overlap // 2
    centres = patches[:, trim: trim + s, trim: trim + s]
    c = patches.shape[3]
    tiled = centres.reshape(rows, cols, s, s, c).transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, c)
    top, left = g.stitch_offset
    return np.ascontiguousarray(tiled[top: top + g.height, left: left + g.width])


def normalise(image: np.ndarray, method: str = "fixed") -> np.ndarray:
    """Normalise a (H, W, 9) refs+bts image in place-safe fashion (returns a new float32 array).

    ``fixed`` (reference v1.1, NYU): bts -> (bts - 270) / 22, refs -> refs - 0.5.
    ``zscore`` (reference v1.2): one scalar mean/std over all pixels of all refs channels, likewise for bts,
    computed over the whole image (zero borders included, as the reference does). A constant group
    (std 0) is only centred, instead of dividing by zero.
    """
    if image.ndim != 3 or image.shape[2] != N_CHANNELS:
        raise ValueError(f"normalise expects (H, W, {N_CHANNELS}), got {image.shape}")
    out = image.astype(np.float32, copy=True)
    refs, bts = out[..., :N_REFS], out[..., N_REFS:]
    if method == "fixed":
        refs -= REFS_OFFSET
        bts -= BT_OFFSET
        bts /= BT_SCALE
    elif method == "zscore":
        for group in (refs, bts):
            mean = group.mean(dtype=np.float64)
            std = group.std(dtype=np.float64)
            group -= np.float32(mean)
            if std > 0:
                group /= np.float32(std)
    else:
        raise ValueError(f"unknown normalisation {method!r} (fixed | zscore)")
    return out


def normalise_fixed_into(refs: np.ndarray, bts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``normalise(concat(refs, bts), "fixed")`` written straight into ``out`` (..., 9), which may be a strided
    view such as the patch layout: the same float32 operations, so the same bits, in one pass instead of four."""
    np.subtract(refs, np.float32(REFS_OFFSET), out=out[..., :N_REFS], dtype=np.float32)
    bts_out = out[..., N_REFS:]
    np.subtract(bts, np.float32(BT_OFFSET), out=bts_out, dtype=np.float32)
    np.divide(bts_out, np.float32(BT_SCALE), out=bts_out)
    return out


def fixed_train_patches(refs: np.ndarray, bts: np.ndarray, geometry: Geometry = DEFAULT_GEOMETRY,
                        overwrite_input: bool = False) -> np.ndarray:
    """``train_patches(normalise(concat(refs, bts), "fixed"))``, identical bits, normalising only the cropped
    pixels (the fixed normalisation is per pixel, so crop-then-normalise equals the reference's
    normalise-then-crop). ``overwrite_input``: native float32 inputs are normalised in place, in contiguous
    passes, and their pixels then copied as whole 24- and 12-byte records into the patch layout (twice as fast
    as arithmetic on the strided layout)."""
    g = geometry
    rows, cols = g.train_grid
    r, c = g.train_crop
    p = g.patch
    out = np.empty((rows * cols, p, p, N_CHANNELS), np.float32)
    as_image = out.reshape(rows, cols, p, p, N_CHANNELS).transpose(0, 2, 1, 3, 4)  # (rows, p, cols, p, C) view

    def tiles(a):
        return a[r, c].reshape(rows, p, cols, p, a.shape[2])

    native = all(a.dtype == np.float32 and a.dtype.isnative and a.flags.c_contiguous for a in (refs, bts))
    if not (overwrite_input and native):
        normalise_fixed_into(tiles(refs), tiles(bts), as_image)
        return out
    np.subtract(refs, np.float32(REFS_OFFSET), out=refs)
    np.subtract(bts, np.float32(BT_OFFSET), out=bts)
    np.divide(bts, np.float32(BT_SCALE), out=bts)
    pixel = np.dtype([("refs", f"V{4 * N_REFS}"), ("bts", f"V{4 * N_BTS}")])
    records = out.view(pixel)[..., 0].reshape(rows, cols, p, p).transpose(0, 2, 1, 3)  # (rows, p, cols, p)
    records["refs"] = tiles(refs.view(f"V{4 * N_REFS}"))[..., 0]
    records["bts"] = tiles(bts.view(f"V{4 * N_BTS}"))[..., 0]
    return out


# The name is fixed by the reference API; keep pytest from collecting it when a test module imports it.
test_patches.__test__ = False  # type: ignore[attr-defined]
