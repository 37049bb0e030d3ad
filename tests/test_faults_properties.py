"""Property-based tests (hypothesis) of the parsers and combiners that meet damaged input:
the raw member-name parser, the header-number reader and the robust frame combiner."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
from astropy.io import fits
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from panacea.archive import RawFile
from panacea.combine import combine_frames
from panacea.io_utils import header_number

SETTINGS = settings(max_examples=150, deadline=None)

stamps = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31))


@SETTINGS
@given(obsid=st.integers(0, 9_999_999), exp=st.integers(0, 99), when=stamps,
       tenth=st.integers(0, 9), slot=st.sampled_from(["056", "066", "123"]),
       amp=st.sampled_from(["LL", "LU", "RU", "RL"]),
       ftype=st.sampled_from(["sci", "zro", "twi", "flt", "cmp", "drk", "eng"]),
       prefix=st.sampled_from(["", "./", "some/dir/"]))
def test_member_name_round_trip(obsid, exp, when, tenth, slot, amp, ftype, prefix):
    when = when.replace(microsecond=0)
    stamp = when.strftime("%Y%m%dT%H%M%S") + f".{tenth}"
    name = f"{prefix}lrs2{obsid:07d}/exp{exp:02d}/lrs2/{stamp}_{slot}{amp}_{ftype}.fits"
    raw = RawFile.from_name(name, "x.tar", "20181108", name)
    assert raw is not None
    assert (raw.obsid, raw.exp, raw.ifuslot, raw.amp, raw.ftype, raw.timestamp) == (
        obsid, exp, slot, amp, ftype, stamp)
    expected = when.replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=tenth / 10)
    assert abs((raw.time - expected).total_seconds()) < 1e-6


@SETTINGS
@given(st.text(max_size=120))
def test_member_name_parser_never_raises(text):
    raw = RawFile.from_name(text, "x.tar", "20181108", text)
    if raw is not None:  # whatever it accepts has the documented shape
        assert text.endswith(".fits") and f"lrs2{raw.obsid:07d}/" in text
        assert raw.amp in ("LL", "LU", "RU", "RL") and len(raw.ftype) == 3


@SETTINGS
@given(obsid=st.integers(0, 9_999_999), month=st.integers(13, 99), day=st.integers(32, 99))
def test_member_name_with_impossible_time_is_rejected(obsid, month, day):
    name = f"lrs2{obsid:07d}/exp01/lrs2/2018{month:02d}{day:02d}T021543.7_056LL_sci.fits"
    assert RawFile.from_name(name, "x.tar", "20181108", name) is None


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12),
                 st.booleans(), st.text(max_size=20), st.none()))
def test_header_number(value):
    header = fits.Header()
    if value is not None:
        try:
            header["VAL"] = value
        except (ValueError, TypeError):
            assume(False)  # astropy refuses to write this value at all
    out = header_number(header, "VAL")
    stored = header.get("VAL")
    if stored is None or isinstance(stored, bool):
        assert out is None
    elif isinstance(stored, (int, float)):
        assert out == (float(stored) if math.isfinite(float(stored)) else None)
    else:  # text: a number only when it spells a finite one
        try:
            number = float(stored)
        except ValueError:
            number = None
        assert out == (number if number is not None and math.isfinite(number) else None)
    assert out is None or math.isfinite(out)


@SETTINGS
@given(text=st.sampled_from(["NaN", "nan", "inf", "-INF", "1e400", "", "  ", "abc"]))
def test_header_number_unparsable_and_nonfinite_cards(text):
    card = fits.Card.fromstring(f"VAL     = {text:>20} / raw".ljust(80))
    header = fits.Header([card])
    assert header_number(header, "VAL") is None


@SETTINGS
@given(n=st.integers(3, 6), level=st.floats(50.0, 5e4), seed=st.integers(0, 2**16),
       hit_sigma=st.floats(20.0, 1e4))
def test_combine_rejects_one_cosmic_ray(n, level, seed, hit_sigma):
    rng = np.random.default_rng(seed)
    shape = (64, 64)
    scales = rng.uniform(0.5, 2.0, n)
    truth = level * (1 + 0.2 * rng.random(shape))
    images = [(s * truth).astype(np.float32) for s in scales]
    variances = [np.full(shape, 1.0 + s * level, np.float32) for s in scales]
    k, y, x = int(rng.integers(n)), int(rng.integers(shape[0])), int(rng.integers(shape[1]))
    images[k][y, x] += hit_sigma * np.sqrt(variances[k][y, x])  # far above the noise
    image, var, rejected = combine_frames(images, variances)
    expected = truth * scales.sum()
    # the hit pixel is the mean of the other frames; a hit on the level sample (every 4th
    # row and column) shifts its frame's level estimate by a rank of the median, < 1e-3
    assert abs(image[y, x] / expected[y, x] - 1) < 5e-3
    image[y, x] = expected[y, x]
    np.testing.assert_allclose(image, expected, rtol=1e-3)
    assert not rejected.any() and np.all(var > 0)


@SETTINGS
@given(n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_combine_is_order_free_and_sums_identical_frames(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.uniform(100, 1000, (8, 8)).astype(np.float32)
    images = [base.copy() for _ in range(n)]
    variances = [base + 9.0 for _ in range(n)]
    image, var, _ = combine_frames(images, variances)
    np.testing.assert_allclose(image, n * base, rtol=1e-5)
    np.testing.assert_allclose(var, n * (base + 9.0), rtol=1e-5)  # variance of the sum
    order = rng.permutation(n)
    again, _, _ = combine_frames([images[i] for i in order], [variances[i] for i in order])
    np.testing.assert_allclose(again, image, rtol=1e-6)
