"""combine_frames with the frame levels given by the caller."""

from __future__ import annotations

import numpy as np
import pytest

from panacea.combine import combine_frames, frame_level


def test_given_levels_give_the_same_combination():
    rng = np.random.default_rng(5)
    truth = rng.uniform(100, 5000, (64, 48))
    scales = (1.0, 1.3, 0.8)
    images = [rng.poisson(truth * s).astype(np.float32) for s in scales]
    images[1][10, 7] += 1e5  # a cosmic ray
    variances = [np.maximum(im, 1).astype(np.float32) for im in images]
    measured = combine_frames(images, variances, band_rows=16)
    given = combine_frames(images, variances, band_rows=16,
                           levels=[frame_level(im) for im in images])
    for a, b in zip(measured, given):
        assert np.array_equal(a, b)
    assert measured[0][10, 7] < 2 * truth[10, 7] * sum(scales)  # the hit was rejected
    with pytest.raises(ValueError, match="2 levels given for 3 frames"):
        combine_frames(images, variances, levels=[1.0, 2.0])
