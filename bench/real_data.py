"""Real data that exists offline on every machine, for the accuracy bench.

- :func:`stdlib_corpus`: the Python standard library's own ``.py`` sources as one byte string,
  byte-level tokens (vocabulary 256), split into train and validation **by file**: a file is in
  validation when the SHA-1 of its path relative to the stdlib root, read as an integer, is
  ``0 mod 10`` (about 10% of files, whatever the cap and the order). Files are read in sorted
  order (of their relative paths) until ``max_bytes`` are read, so the corpus is the same on
  every run of the same Python. Directories named ``site-packages``, ``dist-packages``,
  ``test``, ``tests`` and ``idlelib`` are left out (installed packages; test data with
  deliberately odd bytes). The corpus differs between Python versions: ``ByteCorpus.sha256``
  identifies it in results.
- :func:`digits_32x32`: scikit-learn's ``load_digits`` (1797 grey 8x8 images, 10 classes) as
  float tensors ``(N, 3, 32, 32)``: scaled to [0, 1], upsampled bilinearly with
  ``F.interpolate``, repeated to 3 channels and normalised by the training set's mean and standard
  deviation; a stratified train/test split with a seed (``train_test_split(stratify=y)``).

Both are deterministic; samplers take a ``torch.Generator`` (or a seed) and draw the same batches
each time.

    corpus = stdlib_corpus()                       # 4 MiB, loads in well under a second
    g = torch.Generator().manual_seed(0)
    x, y = corpus.sample("train", batch=16, seq=128, generator=g)   # int64, y is x shifted by 1
    val = corpus.fixed_batches("val", n=8, batch=16, seq=128, seed=1234)

    d = digits_32x32(seed=0)                       # d.x_train (1437, 3, 32, 32) float32
    for xb, yb in d.train_batches(128, generator=g): ...   # one epoch, full batches only
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ByteCorpus", "Digits", "stdlib_corpus", "digits_32x32", "STDLIB_EXCLUDED_DIRS"]

MiB = 2**20
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else seed)


# ----------------------------------------------------------------------- the stdlib corpus


@dataclasses.dataclass(frozen=True)
class ByteCorpus:
    """A byte-level corpus: ``train`` and ``val`` are 1-D uint8 tensors (the files' bytes
    concatenated in sorted path order); ``train_files``/``val_files`` the relative paths."""

    root: str
    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    sha256: str  # of train + val bytes, to name the corpus in results
    vocab_size: int = 256

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def sample(self, split: str, batch: int, seq: int, *,
               generator: torch.Generator | None = None,
               seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` windows of ``seq + 1`` bytes at uniform offsets drawn from ``generator``
        (or a new one seeded with ``seed``): ``(x, y)``, int64 ``(batch, seq)``, ``y`` the next
        byte of each position."""
        data = self.split(split)
        if data.numel() <= seq + 1:
            raise ValueError(f"the {split} split has {data.numel()} bytes, fewer than seq + 1")
        g = _generator(generator, seed)
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        offsets = starts[:, None] + torch.arange(seq + 1)
        windows = data[offsets].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def fixed_batches(self, split: str, n: int, batch: int, seq: int,
                      seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` batches drawn with a generator of their own seeded with ``seed``: the same
        list on every call (an evaluation set)."""
        g = torch.Generator().manual_seed(seed)
        return [self.sample(split, batch, seq, generator=g) for _ in range(n)]


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in STDLIB_EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file():
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def _is_validation(rel: str, modulus: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % modulus == 0


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 4 * MiB, val_modulus: int = 10,
                  root: str | None = None) -> ByteCorpus:
    """The standard library's ``.py`` files (under ``sysconfig.get_paths()["stdlib"]`` unless
    ``root`` is given), read in sorted order of their relative paths until ``max_bytes`` bytes
    are read (the file that crosses the cap is kept whole). A file goes to validation when the
    SHA-1 of its relative path is ``0 mod val_modulus`` (10: about 10% of the files), otherwise
    to train. Cached: the same arguments return the same object."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"no standard library directory at {base}")
    train, val, train_files, val_files = [], [], [], []
    total = 0
    for rel in _stdlib_files(base):
        if total >= max_bytes:
            break
        data = (base / rel).read_bytes()
        total += len(data)
        name = rel.as_posix()
        if _is_validation(name, val_modulus):
            val.append(data)
            val_files.append(name)
        else:
            train.append(data)
            train_files.append(name)
    if not train or not val:
        raise ValueError(f"the corpus under {base} has an empty split "
                         f"({len(train_files)} train, {len(val_files)} validation files)")
    train_bytes, val_bytes = b"".join(train), b"".join(val)
    digest = hashlib.sha256(train_bytes + val_bytes).hexdigest()

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)

    return ByteCorpus(root=str(base), train=as_tensor(train_bytes), val=as_tensor(val_bytes),
                      train_files=tuple(train_files), val_files=tuple(val_files), sha256=digest)


# ----------------------------------------------------------------------- digits at 32x32


@dataclasses.dataclass(frozen=True)
class Digits:
    """scikit-learn's digits as ``(N, 3, size, size)`` float32 images and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float
    train_index: torch.Tensor  # positions in load_digits() of the training images
    test_index: torch.Tensor
    num_classes: int = 10

    def train_batches(self, batch: int, *, generator: torch.Generator | None = None,
                      seed: int | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of the training set in an order drawn from ``generator`` (or a new one
        seeded with ``seed``), full batches only: the remainder of the permutation is dropped, so
        every batch has the same shape."""
        g = _generator(generator, seed)
        order = torch.randperm(self.x_train.shape[0], generator=g)
        for i in range(order.numel() // batch):
            idx = order[i * batch:(i + 1) * batch]
            yield self.x_train[idx], self.y_train[idx]

    def test_batches(self, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test set in order, the last batch possibly smaller."""
        for i in range(0, self.x_test.shape[0], batch):
            yield self.x_test[i:i + batch], self.y_test[i:i + batch]


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``load_digits`` as (images scaled to [0, 1], (N, 8, 8) float32; labels, int64), read once."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # pixels are 0..16
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits_32x32(seed: int = 0, test_fraction: float = 0.2, size: int = 32) -> Digits:
    """``load_digits`` scaled to [0, 1] (its pixels are 0..16), upsampled to ``size`` x
    ``size`` (bilinear, ``align_corners=False``), repeated to 3 channels, normalised with the
    training images' mean and standard deviation (one scalar each: the channels are equal);
    stratified split, ``test_fraction`` of each class in test, shuffled with ``seed``."""
    from sklearn.model_selection import train_test_split

    images, labels = _load_digits()
    idx = torch.arange(labels.numel()).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                           stratify=labels.numpy())
    x = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean = float(x[train_idx].mean())
    std = float(x[train_idx].std())
    x = ((x - mean) / std).contiguous()
    return Digits(x_train=x[train_idx].contiguous(), y_train=labels[train_idx].contiguous(),
                  x_test=x[test_idx].contiguous(), y_test=labels[test_idx].contiguous(),
                  mean=mean, std=std, train_index=train_idx, test_index=test_idx)
