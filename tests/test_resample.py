"""Band-by-band resizing gives exactly the rows of a whole-image resize, in RAM or on disk."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.resample import resize


@pytest.mark.parametrize(
    ("src", "dst", "interpolation"),
    [
        ((1200, 90), (600, 45), cv2.INTER_AREA),  # native 4x to 2x
        ((1200, 90), (900, 68), cv2.INTER_AREA),  # 4x to 3x
        ((1200, 90), (2400, 180), cv2.INTER_LANCZOS4),  # 4x to 8x
        ((1000, 64), (625, 40), cv2.INTER_AREA),  # 4x to 2.5x
        ((1203, 77), (601, 38), cv2.INTER_AREA),  # coprime heights: one piece
        ((900, 50), (1800, 100), cv2.INTER_LINEAR),  # alpha
    ],
)
@pytest.mark.parametrize("channels", [None, 1, 3])
def test_banded_resize_equals_a_whole_image_resize(tmp_path, src, dst, interpolation, channels):
    rng = np.random.default_rng(1)
    shape = src if channels is None else (*src, channels)
    image = rng.random(shape, dtype=np.float32)
    size = (dst[1], dst[0])
    expected = np.clip(cv2.resize(image, size, interpolation=interpolation), 0, 1)
    banded = resize(image, size, interpolation, max_bytes_in_ram=1 << 30, scratch_dir=None)
    assert banded.shape == (dst if channels is None else (*dst, channels))
    np.testing.assert_array_equal(banded, expected.reshape(banded.shape))


def test_large_outputs_are_resized_into_a_disk_backed_buffer(tmp_path):
    image = np.random.default_rng(2).random((1600, 40, 3), dtype=np.float32)
    out = resize(image, (20, 800), cv2.INTER_AREA, max_bytes_in_ram=1024, scratch_dir=tmp_path)
    assert isinstance(out, np.memmap)
    np.testing.assert_array_equal(
        np.asarray(out), cv2.resize(image, (20, 800), interpolation=cv2.INTER_AREA)
    )
