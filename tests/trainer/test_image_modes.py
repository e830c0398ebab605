"""Every PIL mode an image file decodes to reaches the model as the pixels it holds.

Each image is written to a file, read as training reads it (``ImageDataset.load``) and put through
the evaluation transform with mean 0 and std 1, so ``255 * x`` is the 8-bit image the model sees.
The expected pixels are computed here with numpy from the source arrays, never with PIL's own
conversions: 16-bit grey is ``round(v / 257)``; transparency is composited over white,
``round(c * a + 255 * (1 - a))`` with ``a`` in [0, 1]; grey from colour is ITU-R 601 luma.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from surgery.trainer.data import ImageDataset, build_transforms, to_mode

N = 16  # images are N x N: the transform's resize and centre crop leave them as they are
rng = np.random.default_rng(0)
GRADIENT16 = np.linspace(0, 65535, N * N).round().astype(np.uint16).reshape(N, N)  # odd values too


def seen(path, channels: int) -> np.ndarray:
    """The 8-bit image (H, W, C) the model gets from ``path`` with ``channels`` input channels."""
    x = build_transforms(N, [0.0], [1.0], channels, train=False, resize=N)(ImageDataset.load(str(path)))
    return np.rint(x.numpy().transpose(1, 2, 0) * 255).astype(np.int64)


def over_white(rgba: np.ndarray) -> np.ndarray:
    c, a = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255
    return np.round(c * a + 255 * (1 - a)).astype(np.int64)


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.int64)


def grey_rgba(g: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    a = np.full_like(g, 255) if alpha is None else alpha
    return np.stack([g, g, g, a], axis=-1).astype(np.int64)


def check(path, rgba: np.ndarray) -> None:
    """``path`` as 1, 3 and 4 channels against the straight RGBA reference ``rgba``."""
    rgb = over_white(rgba)
    assert np.array_equal(seen(path, 4), rgba)
    assert np.array_equal(seen(path, 3), rgb)
    # PIL computes luma in 16-bit fixed point: a value a hair from .5 may round the other way
    assert np.abs(seen(path, 1) - luma(rgb)).max() <= 1
    if np.ptp(rgb, axis=-1).max() == 0:  # grey sources: exactly their grey value
        assert np.array_equal(seen(path, 1), rgb[..., :1])


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GRADIENT16).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.round(GRADIENT16 / 257).astype(np.int64)
    assert np.array_equal(seen(path, 1)[..., 0], expected)
    assert np.abs(seen(path, 1)[..., 0] - (GRADIENT16 >> 8)).max() <= 1  # the other usual rule, within one step
    assert len(np.unique(seen(path, 3))) > 200  # a gradient, not white
    check(path, grey_rgba(expected))


def test_16_bit_big_endian_tiff(tmp_path):
    path = tmp_path / "grey16b.tiff"
    Image.frombytes("I;16B", (N, N), GRADIENT16.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    check(path, grey_rgba(np.round(GRADIENT16 / 257)))


def test_32_bit_integer_grey_is_on_the_16_bit_scale(tmp_path):
    v = GRADIENT16.astype(np.int32)
    v[0, :3] = [-5, 70000, 1 << 30]  # out of the 16-bit range: clipped
    path = tmp_path / "grey32.tiff"
    Image.fromarray(v).save(path)
    assert Image.open(path).mode == "I"
    check(path, grey_rgba(np.round(np.clip(v, 0, 65535) / 257)))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_grey_on_0_1_or_on_0_255(tmp_path, scale):
    """Float images in [0, 1] (the float convention) and on PIL's 0..255 scale; NaN is black."""
    v = np.linspace(0, 1, N * N).reshape(N, N).astype(np.float32) * np.float32(scale)
    v[0, 0] = np.nan
    path = tmp_path / "float.tiff"
    Image.fromarray(v).save(path)
    assert Image.open(path).mode == "F"
    expected = np.round(np.nan_to_num(v.astype(np.float64)) * (255 / scale))
    check(path, grey_rgba(expected))


def test_bilevel(tmp_path):
    bits = rng.random((N, N)) > 0.5
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    check(path, grey_rgba(bits * 255))


def test_grey_with_alpha(tmp_path):
    g, a = rng.integers(0, 256, (2, N, N), dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([g, a], axis=-1), "LA").save(path)
    assert Image.open(path).mode == "LA"
    check(path, grey_rgba(g, a))


def test_rgba(tmp_path):
    rgba = rng.integers(0, 256, (N, N, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    check(path, rgba.astype(np.int64))


def _palette_image(alpha: np.ndarray | None = None, key: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """A P image of 256 random colours, and its straight RGBA pixels; ``alpha``: one alpha per
    entry, ``key``: the one entry that is fully transparent."""
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.permutation(N * N).reshape(N, N).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.tobytes())
    entry_alpha = np.full(256, 255, dtype=np.int64)
    if alpha is not None:
        img.info["transparency"] = alpha.astype(np.uint8).tobytes()
        entry_alpha = alpha.astype(np.int64)
    if key is not None:
        img.info["transparency"] = key
        entry_alpha[key] = 0
    return img, np.concatenate([palette[index], entry_alpha[index][..., None]], axis=-1).astype(np.int64)


@pytest.mark.parametrize("kind", ["opaque", "one transparent entry", "alpha per entry"])
def test_palette(tmp_path, kind):
    img, rgba = _palette_image(alpha=rng.integers(0, 256, 256) if kind == "alpha per entry" else None,
                               key=7 if kind == "one transparent entry" else None)
    path = tmp_path / "p.png"
    img.save(path)
    read = Image.open(path)
    assert read.mode == "P" and ("transparency" in read.info) == (kind != "opaque")
    check(path, rgba)


def test_cmyk(tmp_path):
    cmyk = rng.integers(0, 256, (N, N, 4), dtype=np.uint8)
    path = tmp_path / "cmyk.tiff"
    Image.fromarray(cmyk, "CMYK").save(path)
    c = cmyk.astype(np.float64)
    rgb = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)  # the naive, profile-free conversion
    check(path, np.concatenate([rgb, np.full((N, N, 1), 255.0)], axis=-1).astype(np.int64))


def test_an_opaque_image_is_left_as_it_is():
    img = Image.new("RGB", (N, N), (10, 20, 30))
    assert to_mode(img, "RGB") is img


def _sample_images() -> list[np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    return [im[100:100 + N, 200:200 + N] for im in datasets.load_sample_images().images]  # china, flower


def test_scikit_learn_sample_photos_in_every_mode(tmp_path):
    """Real photos (the JPEGs inside scikit-learn), stored in each mode, read back as their pixels."""
    for k, rgb in enumerate(_sample_images()):
        grey = luma(rgb.astype(np.int64))[..., 0]
        alpha = np.linspace(0, 255, N * N).round().astype(np.uint8).reshape(N, N)
        cases = {
            "grey16.png": (Image.fromarray((grey * 257).astype(np.uint16)), grey_rgba(grey)),
            "float.tiff": (Image.fromarray((grey / 255).astype(np.float32)), grey_rgba(grey)),
            "cmyk.tiff": (Image.fromarray(np.concatenate([255 - rgb, np.zeros((N, N, 1), np.uint8)], -1), "CMYK"),
                          np.concatenate([rgb, np.full((N, N, 1), 255)], -1)),
            "rgba.png": (Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"),
                         np.concatenate([rgb, alpha[..., None]], -1)),
            "la.png": (Image.fromarray(np.stack([grey.astype(np.uint8), alpha], -1), "LA"), grey_rgba(grey, alpha)),
            "bits.png": (Image.fromarray(grey > 127), grey_rgba((grey > 127) * 255)),
            "grey32.tiff": (Image.fromarray((grey * 257).astype(np.int32)), grey_rgba(grey)),
            "grey16b.tiff": (Image.frombytes("I;16B", (N, N), (grey * 257).astype(">u2").tobytes()), grey_rgba(grey)),
        }
        quantized = Image.fromarray(rgb).quantize(32)
        palette = np.array(quantized.getpalette(), dtype=np.int64).reshape(-1, 3)
        cases["p.png"] = (quantized, np.concatenate([palette[np.asarray(quantized)], np.full((N, N, 1), 255)], -1))
        for name, (img, rgba) in cases.items():
            path = tmp_path / f"{k}-{name}"
            img.save(path)
            check(path, rgba.astype(np.int64))
