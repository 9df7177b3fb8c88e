"""bench.real_data: the offline real-data loaders are deterministic, shaped and split right."""

import hashlib

import pytest
import torch

from bench.real_data import digits_32x32, stdlib_corpus

SMALL = 512 * 1024  # a small cap keeps the test fast


def test_stdlib_corpus_deterministic_and_disjoint():
    a = stdlib_corpus(max_bytes=SMALL)
    stdlib_corpus.cache_clear()
    b = stdlib_corpus(max_bytes=SMALL)
    assert a is not b and a.sha256 == b.sha256
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.dtype == torch.uint8 and a.train.dim() == 1 and a.vocab_size == 256
    assert set(a.train_files).isdisjoint(a.val_files)
    assert a.train_files and a.val_files
    # the split is by the hash of each relative path, about 10% of the files
    for f in a.val_files:
        assert int(hashlib.sha1(f.encode()).hexdigest(), 16) % 10 == 0
    for f in a.train_files:
        assert int(hashlib.sha1(f.encode()).hexdigest(), 16) % 10 != 0
    files = sorted(a.train_files + a.val_files)
    assert a.train_files == tuple(f for f in files if f in set(a.train_files))  # sorted order
    assert a.train.numel() + a.val.numel() >= SMALL
    assert all(p.endswith(".py") and "site-packages" not in p for p in files)


def test_stdlib_corpus_sampler():
    c = stdlib_corpus(max_bytes=SMALL)
    x, y = c.sample("train", 3, 16, generator=torch.Generator().manual_seed(5))
    x2, y2 = c.sample("train", 3, 16, seed=5)
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next byte
    assert int(x.max()) < 256 and int(x.min()) >= 0
    v1 = c.fixed_batches("val", n=2, batch=2, seq=8, seed=3)
    v2 = c.fixed_batches("val", n=2, batch=2, seq=8, seed=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(v1, v2))
    with pytest.raises(ValueError):
        c.split("test")


def test_digits_32x32_shapes_split_and_batches():
    d = digits_32x32(seed=0)
    assert d.x_train.shape == (1437, 3, 32, 32) and d.x_test.shape == (360, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])  # grey repeated to 3 channels
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    # stratified: every class in both splits, in about the same proportion
    assert d.y_test.bincount(minlength=10).min() >= 35
    # disjoint, and together the whole data set; the same split for the same seed
    assert set(d.train_index.tolist()).isdisjoint(d.test_index.tolist())
    from sklearn.datasets import load_digits
    n = load_digits().target.shape[0]
    assert sorted(d.train_index.tolist() + d.test_index.tolist()) == list(range(n))
    e = digits_32x32(seed=0)
    assert torch.equal(d.x_test, e.x_test) and torch.equal(d.y_train, e.y_train)
    assert torch.equal(d.test_index, e.test_index)
    assert not torch.equal(digits_32x32(seed=1).test_index, d.test_index)
    b1 = list(d.train_batches(128, seed=7))
    b2 = list(d.train_batches(128, generator=torch.Generator().manual_seed(7)))
    assert len(b1) == 1437 // 128 and all(x.shape == (128, 3, 32, 32) for x, _ in b1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(b1, b2))
    assert sum(y.numel() for _, y in d.test_batches(256)) == 360
