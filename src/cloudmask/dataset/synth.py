"""Synthetic SLSTR-like dataset files with the real structure, for running the benchmark without the 180 GB download.

Each file holds ``refs`` (H, W, 6) reflectance of S1-S6, ``bts`` (H, W, 3) brightness temperature of S7-S9 in K
and ``bayes`` (H, W, 1) cloud bit flags, laid out and named like cloud_slstr_ds1. The scenes are simple radiative
toy physics rather than real imagery, chosen so that the label is learnable but not trivially:

* clouds are a thresholded power-law random field of optical thickness ``tau``; the label is ``tau > 0``, so
  thin cloud edges are nearly invisible and cap the attainable accuracy;
* clouds are cold (cloud top 8-60 K below the sea surface, mixed in with emissivity ``1 - exp(-tau)``) and,
  by day, bright; the surface varies within and between files (land/sea, temperature gradients, cold
  mountains, sun-zenith ramp, sun glint), so no single channel threshold separates cloud from clear;
* at night the reflectances are noise, and only the brightness temperatures carry the label.

Every file depends only on ``(seed, split, index)``, so a dataset grows or shrinks without changing the
files it shares with another size.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np

from .. import fileio
from ..cli.progress import Progress
from ..errors import DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
GENERATOR = f"cloudmask.synth {GENERATOR_VERSION}"  # bump the number whenever the arrays for a given seed change
DAY_FRACTION = 0.55
# split -> (id mixed into the seed, directory, month of acquisition: test in October like the real test set)
SPLITS = {"train": (0, "training", 9), "test": (1, "inference", 10)}

# SLSTR frame naming: 3-minute frames; a day window 09:00-12:00 UTC and a night window 20:00-23:00 UTC
# hold 60 start slots each.
FRAME = dt.timedelta(minutes=3)
SLOTS_PER_WINDOW = 60
WINDOW_START_HOUR = {True: 9, False: 20}
CYCLE_DAYS, ORBITS_PER_CYCLE, ORBIT_SECONDS = 27, 385, 6060
CYCLE_EPOCH = dt.datetime(2016, 1, 29, 20, 30)  # start of cycle 1: 2019-09-15 10:15 is cycle 050, orbit 023

# Surface reflectance of S1-S6 (555, 659, 865, 1375, 1610, 2250 nm). 1375 nm is dark over every surface
# (water-vapour absorption), which is why it sees only high cloud.
SEA_REFLECTANCE = np.array([0.055, 0.035, 0.02, 0.003, 0.01, 0.005], np.float32)
SOIL_REFLECTANCE = np.array([0.12, 0.17, 0.25, 0.004, 0.32, 0.25], np.float32)
VEGETATION_REFLECTANCE = np.array([0.06, 0.04, 0.38, 0.004, 0.2, 0.09], np.float32)

# Cloud optical thickness above which the Bayesian mask sets each further bit.
BAYES_BITS = ((0.0, 1), (2.0, 2), (8.0, 4), (20.0, 8))


# ------------------------------------------------------------------------------------------- random fields


def _gaussian_fields(rng: np.random.Generator, n: int, shape: tuple[int, int], slope: float,
                     outer_scale: float) -> np.ndarray:
    """``n`` zero-mean, unit-variance random fields with power spectrum ``(k^2 + k0^2)^(-slope/2)``.

    ``k`` is in cycles per pixel and ``k0 = 1/outer_scale``: the fields are self-similar below the outer
    scale (like cloud and terrain statistics) and uncorrelated beyond it.
    """
    h, w = shape
    k2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2 + outer_scale ** -2.0
    amplitude = k2 ** (-slope / 4)
    spectrum = (rng.standard_normal((n, h, w // 2 + 1)) + 1j * rng.standard_normal((n, h, w // 2 + 1))) * amplitude
    fields = np.fft.irfft2(spectrum, s=shape)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields.astype(np.float32)


def _upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear interpolation of a coarse field spanning the image onto the full pixel grid."""
    def weights(n_out: int, n_in: int):
        pos = np.linspace(0, n_in - 1, n_out, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), n_in - 2)
        return lo, pos - lo

    r0, fr = weights(height, field.shape[0])
    c0, fc = weights(width, field.shape[1])
    rows = field[r0] * (1 - fr)[:, None] + field[r0 + 1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c0 + 1] * fc


def _smooth_fields(rng: np.random.Generator, n: int, height: int, width: int, slope: float = 4.0,
                   outer_scale: float = 60.0, coarse: int = 8) -> np.ndarray:
    """Large-scale fields (surface, cloud height) computed on a grid ``coarse`` times smaller, then upsampled:
    they carry no fine detail, and this keeps a full image at about a second."""
    shape = (height // coarse + 2, width // coarse + 2)
    return np.stack([_upsample(f, height, width) for f in _gaussian_fields(rng, n, shape, slope, outer_scale)])


# -------------------------------------------------------------------------------------------------- scene


def synth_image(rng: np.random.Generator, day: bool, height: int = 1200,
                width: int = 1500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (refs float32 (H,W,6), bts float32 (H,W,3), bayes uint8 (H,W,1))."""
    f32 = np.float32
    tau, cloud_height = _clouds(rng, height, width)
    land_field, vegetation, sst_detail, land_detail, elevation = _smooth_fields(rng, 5, height, width)
    land = land_field > np.quantile(land_field[::4, ::4], 1 - rng.uniform(0.1, 0.5))
    vegetation = np.clip(0.5 + 0.3 * vegetation, 0, 1)
    ice = np.clip((cloud_height - 0.5) / 0.3, 0, 1)
    # Pixel-scale surface heterogeneity: it hides the thinnest cloud, as real surfaces do.
    texture = _gaussian_fields(rng, 1, (height, width), 2.0, 20.0)[0]

    # Surface temperature: a meridional gradient across rows, warmer land by day and cooler land by night,
    # and mountains (peaks of 0.5-3 km at 6.5 K/km) that are as cold as low cloud.
    gradient = np.linspace(-1, 1, height, dtype=f32)[:, None] * f32(rng.uniform(-5, 5))
    sst = np.clip(f32(rng.uniform(279, 298)) + gradient + f32(1.5) * sst_detail, 275, 302)
    land_offset = rng.uniform(4, 15) if day else -rng.uniform(2, 10)
    mountains = f32(6.5 * rng.uniform(0.5, 3)) * np.clip((elevation - 0.5) / 2, 0, 1)
    surface = sst + f32(0.5) * texture + land * (f32(land_offset) + f32(3) * land_detail
                                                 + f32(rng.uniform(2, 4)) * texture - mountains)
    # Low water cloud tops are 8 K below the sea surface, high ice cloud tops 60 K.
    cloud_top = sst - (8 + 52 * cloud_height)

    # Clear-sky brightness temperatures: water vapour cools S8 and S9 more over warm (moist) surfaces.
    moisture = np.clip((sst - 275) / 27, 0, 1)
    clear_s8 = surface - (1 + 2 * moisture)
    clear_s9 = clear_s8 - (0.5 + 1.5 * moisture)
    clear_s7 = clear_s8 - 0.5

    mu0 = np.linspace(*rng.uniform(0.35, 0.95, 2), height, dtype=f32)[:, None]  # cosine of sun zenith, by row
    if day:
        refs = np.empty((height, width, 6), f32)
        clear_s7 = clear_s7 + mu0 * np.where(land, f32(rng.uniform(3, 8)), f32(1))
        glint = _sun_glint(rng, height, width) * ~land
        clear_s7 = clear_s7 + 40 * glint
        # Two-stream albedo: rises with tau towards ~0.9; ice absorbs at 1610 and 2250 nm; 1375 nm sees
        # only cloud above the water vapour.
        albedo = f32(0.92) * tau / (tau + 7)
        transmission2 = (1 - albedo) ** 2
        cloud_albedo = (albedo, albedo, albedo, albedo * np.clip((cloud_height - 0.4) / 0.5, 0, 1),
                        albedo * (0.85 - 0.35 * ice), albedo * (0.7 - 0.35 * ice))
        glint_weight = (1, 1, 1, 0, 0.8, 0.6)
        brightness = 1 + f32(0.15) * land_detail + f32(0.15) * texture
        for c in range(6):
            land_refl = (SOIL_REFLECTANCE[c] * (1 - vegetation) + VEGETATION_REFLECTANCE[c] * vegetation) * brightness
            surface_refl = np.where(land, land_refl, SEA_REFLECTANCE[c] + f32(glint_weight[c]) * glint)
            refs[..., c] = mu0 * (cloud_albedo[c] + transmission2 * surface_refl)
        refs += f32(0.002) * rng.standard_normal(refs.shape, dtype=f32)
        np.clip(refs, 0, 1, out=refs)
    else:
        refs = rng.random((height, width, 6), dtype=f32)
        refs *= f32(0.005)

    # Cloudy brightness temperatures mix surface and cloud top by emissivity; ice absorbs more at 12 um
    # (larger S8-S9 over thin cirrus). At 3.7 um water clouds are less emissive (night: colder than S8)
    # and reflect sunlight (day: warmer).
    e7, e8, e9 = (1 - np.exp(-k * tau) for k in (f32(0.45), f32(0.5), f32(0.5) + f32(0.15) * ice))
    bts = np.empty((height, width, 3), f32)
    water_cloud = 1 - cloud_height
    top_s7 = cloud_top + (mu0 * (5 + 20 * water_cloud) if day else -2 * water_cloud)
    bts[..., 0] = e7 * top_s7 + (1 - e7) * clear_s7
    bts[..., 1] = e8 * cloud_top + (1 - e8) * clear_s8
    bts[..., 2] = e9 * (cloud_top - 0.3) + (1 - e9) * clear_s9
    bts += rng.standard_normal(bts.shape, dtype=f32) * np.array([0.2, 0.1, 0.1], f32)
    np.clip(bts, 185, 325, out=bts)

    bayes = np.zeros((height, width, 1), np.uint8)
    for min_tau, bit in BAYES_BITS:
        bayes[..., 0] |= np.where(tau > min_tau, np.uint8(bit), np.uint8(0))

    _zero_borders(rng, (refs, bts, bayes))
    return refs, bts, bayes


def _clouds(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Optical thickness and cloud-top height (0 = low water cloud, 1 = high ice cloud) of one scene.

    The main layer is a thresholded rough field whose cloud fraction varies per file; rougher fields (lower
    slope) look like broken cumulus, smoother ones like stratiform decks. In most scenes thin cirrus (tau
    mostly below 1, high) lies over part of it: hard to see, as in the real Bayesian masks.
    """
    f32 = np.float32
    main, cirrus = _gaussian_fields(rng, 2, (height, width), rng.uniform(2.6, 3.4), rng.uniform(80, 300))
    # Pixel-scale roughness breaks cloud edges into thin speckle that context cannot extrapolate.
    main += f32(rng.uniform(0.2, 0.4)) * _gaussian_fields(rng, 1, (height, width), 2.0, 20.0)[0]
    main_threshold = np.quantile(main[::4, ::4], 1 - rng.uniform(0.2, 0.8))
    tau_main = f32(rng.uniform(4, 25)) * np.maximum(main - f32(main_threshold), 0) ** 2
    cirrus_fraction = rng.uniform(0.05, 0.3) if rng.random() < 0.7 else 0.0
    cirrus_threshold = np.quantile(cirrus[::4, ::4], 1 - cirrus_fraction) if cirrus_fraction else np.inf
    tau_cirrus = f32(rng.uniform(0.2, 1.5)) * np.maximum(cirrus - f32(cirrus_threshold), 0)
    main_height = np.clip(0.5 + 0.25 * _smooth_fields(rng, 1, height, width)[0], 0, 1)
    tau = tau_main + tau_cirrus
    # One effective layer: the cloud top is the optical-thickness weighted height of the two layers.
    cloud_height = np.where(tau > 0, (tau_main * main_height + tau_cirrus) / np.maximum(tau, f32(1e-6)), main_height)
    return tau, cloud_height


def _sun_glint(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Specular reflection off the sea in half the day scenes: a bright (but warm) blob that mimics cloud."""
    if rng.random() < 0.5:
        return np.zeros((height, width), np.float32)
    rows = (np.arange(height, dtype=np.float32) / height - rng.uniform(0.1, 0.9))[:, None]
    cols = (np.arange(width, dtype=np.float32) / width - rng.uniform(0.1, 0.9))[None, :]
    radius = rng.uniform(0.1, 0.3)
    return np.float32(rng.uniform(0.1, 0.4)) * np.exp(-(rows ** 2 + cols ** 2) / np.float32(2 * radius ** 2))


def _zero_borders(rng: np.random.Generator, arrays: tuple[np.ndarray, ...]) -> None:
    """Blank the swath edges (20-100 columns) and frame ends (0-40 rows) as in the real files, scaled to size."""
    height, width = arrays[0].shape[:2]
    left, right = (max(1, round(rng.uniform(20, 100) * width / 1500)) for _ in range(2))
    top, bottom = (round(rng.uniform(0, 40) * height / 1200) for _ in range(2))
    for a in arrays:
        a[:, :left] = 0
        a[:, width - right:] = 0
        a[:top] = 0
        a[height - bottom:] = 0


# ------------------------------------------------------------------------------------------------- naming


def file_name(split: str, index: int, day: bool) -> str:
    """A realistic, unique, deterministic Sentinel-3 L1 RBT product name ending in .hdf.

    The start time spreads files over the days of the month (September for training, October for test),
    then over 60 three-minute slots of the day (09-12 UTC) or night (20-23 UTC) window; the seconds make
    names unique for up to 60 x 60 files per day of the month. Cycle, relative orbit and frame follow from
    the start time with Sentinel-3A's 27-day, 385-orbit repeat cycle.
    """
    _, _, month = SPLITS[split]
    days_in_month = 30 if month == 9 else 31
    day_of_month, slot = index % days_in_month, index // days_in_month
    seconds = (slot // SLOTS_PER_WINDOW + 7 * day_of_month + 13 * slot) % 60
    start = (dt.datetime(2019, month, 1 + day_of_month, WINDOW_START_HOUR[day])
             + (slot % SLOTS_PER_WINDOW) * FRAME + dt.timedelta(seconds=seconds))
    stop = start + FRAME
    created = stop + dt.timedelta(hours=1, seconds=(97 * index + 600) % 7200)
    elapsed = (start - CYCLE_EPOCH).total_seconds()
    cycle_seconds = CYCLE_DAYS * 86400
    cycle = int(elapsed // cycle_seconds) + 1
    relative_orbit = int((elapsed % cycle_seconds) / cycle_seconds * ORBITS_PER_CYCLE) + 1
    frame = int(elapsed % ORBIT_SECONDS) // 180 * 180
    fmt = "%Y%m%dT%H%M%S"
    return (f"S3A_SL_1_RBT____{start:{fmt}}_{stop:{fmt}}_{created:{fmt}}_0179_{cycle:03d}_{relative_orbit:03d}_"
            f"{frame:04d}_LN2_O_NT_003.hdf")


# ------------------------------------------------------------------------------------------------ dataset


def _draw(seed: int, split: str, index: int) -> tuple[bool, np.random.Generator]:
    """The file's own random stream: its first number draws day or night, the rest make the image."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split][0], index]))
    return bool(rng.random() < DAY_FRACTION), rng


def is_day(seed: int, split: str, index: int) -> bool:
    """Day with probability 0.55, except that index 1 is the opposite of index 0, so that every split of two
    or more files has both kinds whatever its size."""
    if index == 1:
        return not _draw(seed, split, 0)[0]
    return _draw(seed, split, index)[0]


def synthesize(out: str | os.PathLike, n_train: int, n_test: int, seed: int, progress=None,
               height: int = 1200, width: int = 1500) -> list[Path]:
    """Write ``out/training/{day,night}/*.hdf`` (n_train files) and ``out/inference/{day,night}/*.hdf``
    (n_test) and return their paths, training first, each split in index order.

    ``progress(i, total, path)`` is called after the i-th file (1-based). Files appear atomically: each is
    written under a hidden temporary name and renamed into place.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory", "choose a new --out directory")
    if out.is_dir() and next(out.rglob("*.hdf"), None) is not None:
        raise DataError(f"{out}: already holds a dataset", "choose a new --out directory")
    jobs = [(split, index) for split, count in (("train", n_train), ("test", n_test)) for index in range(count)]
    written = []
    for i, (split, index) in enumerate(jobs, 1):
        day = is_day(seed, split, index)
        refs, bts, bayes = synth_image(_draw(seed, split, index)[1], day, height, width)
        daynight = "day" if day else "night"
        path = out / SPLITS[split][1] / daynight / file_name(split, index, day)
        attrs = {"synthetic": True, "generator": GENERATOR, "seed": seed, "split": split, "index": index,
                 "daynight": daynight}
        _write(path, {"refs": refs, "bts": bts, "bayes": bayes}, attrs)
        written.append(path)
        if progress is not None:
            progress(i, len(jobs), path)
    return written


def _write(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    # Contiguous and uncompressed like the real files: reading speed matters more than disk space.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            for key, array in arrays.items():
                f.create_dataset(key, data=array, track_times=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ bench's cache


def synthetic_cache_dir(cfg) -> Path:
    if cfg.bench.cache_dir:
        return Path(cfg.bench.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cloudmask"


def synthetic_dataset(cfg) -> Path:
    """The ``bench`` dataset, synthesized once per (size, seed) and reused; built under a temporary name and
    renamed into place, so an interrupted build is never mistaken for a dataset."""
    b = cfg.bench
    h, w = cfg.image.height, cfg.image.width
    target = synthetic_cache_dir(cfg) / (f"synthetic-v{GENERATOR_VERSION}-{h}x{w}-train{b.train_files}-"
                                         f"test{b.test_files}-seed{b.synth_seed}")
    if target.is_dir():
        log.info("synthetic dataset: %s (cached)", target)
        return target
    log.info("synthesizing %d training + %d test files into %s ...", b.train_files, b.test_files, target)
    t0 = time.perf_counter()
    try:
        bar = Progress("synthesizing", b.train_files + b.test_files, cfg.output.progress, unit="files",
                       items_per_step=1, interval_s=cfg.output.progress_interval_s)
        with fileio.atomic_dir(target) as tmp:
            synthesize(tmp, b.train_files, b.test_files, b.synth_seed, height=h, width=w,
                       progress=lambda i, *_: bar.update(i))
    except FileExistsError:
        pass  # another process finished the same dataset first: every file depends only on the seed
    log.info("synthesized in %.1f s", time.perf_counter() - t0)
    return target
