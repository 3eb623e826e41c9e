"""Counter-based randomness: Philox known answers, Feistel bijections, purity."""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader.augment import rng


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123 known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = rng.philox4x32(np.array(counter, dtype=np.uint32), key)
    assert tuple(int(x) for x in out) == expected


def test_words_are_pure_functions_of_coordinates():
    a = rng.random_words(7, 3, np.arange(10), rng.Purpose.SYMMETRY, 0)
    b = rng.random_words(7, 3, np.arange(10), rng.Purpose.SYMMETRY, 0)
    assert np.array_equal(a, b)
    for other in (
        rng.random_words(8, 3, np.arange(10), rng.Purpose.SYMMETRY, 0),
        rng.random_words(7, 4, np.arange(10), rng.Purpose.SYMMETRY, 0),
        rng.random_words(7, 3, np.arange(10), rng.Purpose.JITTER, 0),
        rng.random_words(7, 3, np.arange(10), rng.Purpose.SYMMETRY, 1),
    ):
        assert not np.array_equal(a, other)
    # one element computed alone equals the same element of a batch
    assert np.array_equal(rng.random_words(7, 3, 4, rng.Purpose.SYMMETRY, 0), a[4])


def test_uniform_and_normal_statistics():
    w = rng.random_words(1, 0, 0, rng.Purpose.ORIGIN_NOISE, np.arange(20000))
    u = rng.uniform24(w)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    z = rng.normal_pairs(w).ravel()
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    thr = rng.bernoulli_threshold(0.25)
    assert abs(np.mean((w[:, 0] >> 8) < thr) - 0.25) < 0.015
    assert rng.bernoulli_threshold(1.0) == 1 << 24 and rng.bernoulli_threshold(0) == 0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 48000, 65537])
def test_feistel_is_a_bijection(n):
    keys = rng.feistel_keys(3, 1, 9)
    img = rng.feistel_permute(np.arange(n), n, keys)
    assert img.dtype == np.int64
    assert np.array_equal(np.sort(img), np.arange(n))


def test_select_rows():
    assert np.array_equal(rng.select_rows(10, None, 0, 0, 0), np.arange(10))
    assert np.array_equal(rng.select_rows(10, 10, 0, 0, 0), np.arange(10))
    assert np.array_equal(rng.select_rows(10, 50, 0, 0, 0), np.arange(10))
    r = rng.select_rows(48000, 512, 42, 0, 5)
    assert r.shape == (512,) and len(set(r.tolist())) == 512 and r.max() < 48000
    assert np.array_equal(r, rng.select_rows(48000, 512, 42, 0, 5))
    assert not np.array_equal(r, rng.select_rows(48000, 512, 42, 1, 5))
    # a shorter selection is a prefix of a longer one (one stream per sample)
    assert np.array_equal(rng.select_rows(48000, 100, 42, 0, 5), r[:100])


def test_selection_is_uniform():
    counts = np.zeros(20)
    for index in range(2000):
        counts[rng.select_rows(20, 5, 1, 0, index)] += 1
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_permutation():
    p = rng.permutation(100, 1, 0)
    assert sorted(p.tolist()) == list(range(100))
    assert not np.array_equal(p, rng.permutation(100, 1, 1))


@pytest.mark.parametrize("n", [3, 17, 4400, 80000])
def test_scalar_tail_of_the_walk_equals_the_vector_walk(n, monkeypatch):
    keys = rng.feistel_keys(5, 0, n)
    fast = rng.feistel_permute(np.arange(min(n, 700)), n, keys)
    monkeypatch.setattr(rng, "_SCALAR_TAIL", -1)  # every round vectorized
    assert np.array_equal(fast, rng.feistel_permute(np.arange(min(n, 700)), n, keys))


def test_one_block_in_python_ints_equals_the_array_rounds():
    """A few counters take the plain-int Philox; many take the array one: same words."""
    gen = np.random.default_rng(4)
    counters = gen.integers(0, 2**32, size=(40, 4), dtype=np.uint64).astype(np.uint32)
    key = (int(gen.integers(0, 2**32)), int(gen.integers(0, 2**32)))
    many = rng.philox4x32(counters, key)  # 40 blocks: the array rounds
    assert counters.size > 4 * rng._SCALAR_BLOCKS
    for i in range(0, 40, 7):
        assert np.array_equal(rng.philox4x32(counters[i], key), many[i])
        assert np.array_equal(rng.philox4x32(counters[i : i + 2], key), many[i : i + 2])
    idx = np.arange(20)
    batch = rng.random_words(2**40 + 3, 6, idx, rng.Purpose.JITTER, idx * 3)
    for i in (0, 7, 19):
        one = rng.random_words(2**40 + 3, 6, i, rng.Purpose.JITTER, i * 3)
        assert np.array_equal(one, batch[i])
    keys = rng.feistel_keys(2**40 + 3, 6, 11, rng.Purpose.SUBSAMPLE)
    want = rng.random_words(2**40 + 3, 6, np.full(40, 11), rng.Purpose.SUBSAMPLE, np.arange(40))
    assert np.array_equal(keys, want[: rng.FEISTEL_ROUNDS, 0])


@pytest.mark.parametrize("n", [5, 17, 100, 4400, 80000, 3_000_000])
def test_round_tables_give_the_same_bijection(n, monkeypatch):
    """The table-lookup walk and the hashed rounds are one function, whatever n and k."""
    for k in (1, 15, 16, 512):
        keys = rng.feistel_keys(9, 2, n + k)
        i = np.arange(min(k, n))
        tables = rng.feistel_permute(i, n, keys)
        with monkeypatch.context() as m:
            m.setattr(rng, "_TABLE_BITS", 0)
            assert np.array_equal(tables, rng.feistel_permute(i, n, keys)), (n, k)
