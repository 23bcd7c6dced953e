"""CIFAR-10 data: read once with torchvision, held as a uint8 tensor on the training device,
augmented there in batches (random crop 32 with padding 4, horizontal flip), normalised there.

Two on-disk layouts are read: torchvision's ``cifar-10-batches-py/`` (downloaded when
missing unless ``download=False``) and an image folder with ``train/<class>/`` and
``test/<class>/`` (``torchvision.datasets.ImageFolder``'s layout; hidden files and folders
are skipped). An image folder is decoded once and cached next to the data as
``.cifar10_<split>_uint8.pt``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from run.checkpoint import atomic_torch_save

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
CROP_PADDING = 4


def input_preprocessing() -> dict:
    """What every network of this tool takes as input, as ``DeviceLoader`` makes it: a float32
    tensor ``(N, 3, 32, 32)`` (NCHW, RGB), each pixel p (0..255) of channel c given as
    ``(p - 255·MEAN[c]) / (255·STD[c])``, with MEAN and STD CIFAR-10's training-set channel
    statistics. Recorded in exported models (``export.py``), which expect the same input."""
    return {"shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32", "layout": "NCHW, RGB",
            "formula": "(pixel - 255 * mean[c]) / (255 * std[c]), pixel in 0..255",
            "mean": list(MEAN), "std": list(STD)}


class DataError(ValueError):
    """The data directory cannot be used; the message says what to pass or fix."""


@dataclass
class Split:
    """One split held in memory. ``images``: uint8 ``(N, 3, 32, 32)``; ``labels``: int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def label_digest(self) -> str:
        """SHA-256 (hex) of the labels in this split's order, each as 8 little-endian bytes. An image folder
        is read class by class, so its digest says how many images each class has; torchvision's binary
        copy holds the classes interleaved, so the two copies of CIFAR-10 differ. Two image folders with
        the same counts per class share it, whatever their images. The pixels are left out on purpose: two
        machines may decode the same JPEG files to slightly different pixels (another libjpeg), and that
        should not stop a run."""
        return hashlib.sha256(self.labels.cpu().numpy().astype("<i8").tobytes()).hexdigest()


@dataclass
class DataSource:
    """Where the data comes from: ``kind`` is ``"torchvision"`` or ``"imagefolder"``; ``root`` a folder."""

    kind: str
    root: str

    def describe(self) -> str:
        """For the banner: ``torchvision CIFAR-10 at <root>`` or ``image folder at <root>``."""
        return f"{'torchvision CIFAR-10' if self.kind == 'torchvision' else 'image folder'} at {self.root}"


def _is_image_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train")) or os.path.isdir(os.path.join(path, "test"))


#: What a DataError for a folder without CIFAR-10 tells the user to do, unless the caller knows better.
NO_DATA_HINT = "pass --data-dir pointing at one, or drop --no-download to download it"


def find_source(data_dir: str, download: bool, hint: str = NO_DATA_HINT) -> DataSource:
    """Decide how to read ``data_dir`` (``--data-dir``) without reading any image.

    Accepts ``cifar-10-batches-py/`` inside ``data_dir``, an image folder ``data_dir``
    itself, or a single sub-folder of ``data_dir`` that is one (the archive unpacks
    to ``cifar10-jpeg/``). Otherwise torchvision's copy is downloaded if allowed.

    Raises:
        DataError: nothing usable is there and ``download`` is False; its message ends with ``hint``.
    """
    if os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        return DataSource("torchvision", data_dir)
    if _is_image_folder(data_dir):
        return DataSource("imagefolder", data_dir)
    if os.path.isdir(data_dir):
        subdirs = [os.path.join(data_dir, d) for d in sorted(os.listdir(data_dir))
                   if os.path.isdir(os.path.join(data_dir, d))]
        folders = [d for d in subdirs if _is_image_folder(d)]
        if len(folders) == 1:
            return DataSource("imagefolder", folders[0])
    if download:
        return DataSource("torchvision", data_dir)
    raise DataError(
        f"--data-dir {data_dir}: no CIFAR-10 found (expected cifar-10-batches-py/ or train/<class>/ and "
        f"test/<class>/ image folders); {hint}")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        raise DataError(f"--data-dir: cannot read the folder {path} ({exc.strerror})") from None


def _is_image_file(path: str) -> bool:
    """Whether the image folder reads ``path``: a visible file name (hidden files such as
    ``.DS_Store`` or macOS's ``._*`` copies are skipped) with one of torchvision's image extensions."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _image_samples(split_dir: str) -> list[tuple[str, int]]:
    """``(path, label)`` of every image of one split of an image folder, checked before any is decoded.

    Hidden entries (class folders or files whose name starts with a dot) are skipped.

    Raises:
        DataError: missing split, wrong class folders, an unreadable folder, a class folder
            without images (empty, or only hidden files and files of other kinds).
    """
    if not os.path.isdir(split_dir):
        raise DataError(f"--data-dir: missing split folder {split_dir} (expected train/ and test/ with one "
                        f"folder per class: {', '.join(CLASSES)})")
    found = sorted(d for d in _listdir(split_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
    if tuple(found) != CLASSES:
        missing, extra = sorted(set(CLASSES) - set(found)), sorted(set(found) - set(CLASSES))
        raise DataError(f"--data-dir: {split_dir} has the wrong class folders (missing: {missing or 'none'}; "
                        f"unexpected: {extra or 'none'}); CIFAR-10 needs exactly {', '.join(CLASSES)}")
    from torchvision.datasets.folder import make_dataset
    samples = make_dataset(split_dir, {name: i for i, name in enumerate(CLASSES)}, is_valid_file=_is_image_file,
                           allow_empty=True)
    with_images = {label for _, label in samples}
    for label, name in enumerate(CLASSES):
        if label not in with_images:
            folder = os.path.join(split_dir, name)
            entries = sorted(_listdir(folder))
            if not entries:
                raise DataError(f"--data-dir: class folder {folder} is empty")
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DataError(f"--data-dir: class folder {folder} holds no images, only hidden files or files "
                            f"without an image extension ({shown})")
    return samples


def _fingerprint(samples: list[tuple[str, int]]) -> list:
    """Cheap identity of an image folder: each file's relative path, size and mtime.

    Raises:
        DataError: an entry that cannot be read (a dangling symlink, a file removed meanwhile).
    """
    out = []
    for path, label in samples:
        try:
            st = os.stat(path)
        except OSError as exc:
            kind = "a dangling symlink" if os.path.islink(path) else exc.strerror
            raise DataError(f"--data-dir: cannot read image {path}: {kind}") from None
        out.append((os.path.basename(path), label, st.st_size, int(st.st_mtime)))
    return out


class _DecodeOrFlag(torch.utils.data.Dataset):
    """Decode one image to uint8 ``(3, 32, 32)``; an unreadable one becomes a flag, not a crash in a worker."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        from torchvision.transforms.functional import pil_to_tensor
        path, _ = self.samples[i]
        try:
            image = pil_to_tensor(default_loader(path))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported by file name
            return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), i, str(exc)
        if tuple(image.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
            return (torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), i,
                    f"size {tuple(image.shape)}, expected (3, 32, 32)")
        return image, i, ""


def _decode_image_folder(samples: list[tuple[str, int]], workers: int) -> Split:
    loader = torch.utils.data.DataLoader(_DecodeOrFlag(samples), batch_size=500, num_workers=workers)
    images = torch.empty(len(samples), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for batch, index, errors in loader:
        for i, err in zip(index.tolist(), errors):
            if err:
                raise DataError(f"--data-dir: cannot read image {samples[i][0]}: {err}")
        images[index] = batch
    return Split(images, torch.tensor([label for _, label in samples], dtype=torch.int64))


def _load_image_folder(root: str, train: bool, workers: int, log, write_cache: bool) -> Split:
    split = "train" if train else "test"
    split_dir = os.path.join(root, split)
    samples = _image_samples(split_dir)
    fingerprint = _fingerprint(samples)
    cache = os.path.join(root, f".cifar10_{split}_uint8.pt")
    if os.path.exists(cache):
        try:
            saved = torch.load(cache, weights_only=True)
            if saved["fingerprint"] == fingerprint:
                return Split(saved["images"], saved["labels"])
        except Exception:  # noqa: BLE001 - a bad cache is rebuilt, never trusted
            pass
    log(f"Decoding {len(fingerprint)} images of {split_dir} once (cached next to the data)...")
    data = _decode_image_folder(samples, workers)
    if not write_cache:
        return data
    try:
        atomic_torch_save({"images": data.images, "labels": data.labels, "fingerprint": fingerprint}, cache)
    except OSError as exc:
        log(f"warning: could not write the decoded-data cache {cache} ({exc}); it will be decoded again next run")
    return data


def _load_torchvision(root: str, train: bool, download: bool) -> Split:
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(root, train=train, download=download)
    except Exception as exc:  # noqa: BLE001 - download or archive errors become one line
        raise DataError(f"--data-dir {root}: cannot read or download torchvision CIFAR-10 ({exc}); "
                        f"pass --data-dir pointing at a copy, and --no-download when offline") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64))


def load_split(source: DataSource, train: bool, download: bool = False, workers: int = 2, log=print,
               write_cache: bool = True) -> Split:
    """Load one split of CIFAR-10 as uint8 tensors on the CPU.

    ``write_cache``: whether an image folder decoded now is cached next to the data (in a
    torchrun run only rank 0 writes it).

    Raises:
        DataError: missing split, wrong class folders, a class folder without images (empty,
            or only hidden files: those are skipped), an unreadable folder or image (named; a
            dangling symlink too), or a torchvision copy that cannot be read or downloaded.
    """
    if source.kind == "torchvision":
        return _load_torchvision(source.root, train, download)
    return _load_image_folder(source.root, train, workers, log, write_cache)


def balanced_indices(labels: torch.Tensor, n: int, seed: int, flag: str, keep_one: bool = False) -> torch.Tensor:
    """Indices of ``n`` images, as evenly spread over the classes of ``labels`` as ``n`` allows, drawn
    with ``seed``: the one class-balanced draw of ``--train-subset`` and ``--val-split``.

    Each of the C classes present gets ``n // C`` images, the first ``n % C`` classes (in
    label order) one more; within a class the images are the first of a permutation of its
    members drawn from ``torch.Generator().manual_seed(seed)`` (classes in label order).

    Args:
        labels: int64 ``(N,)``.
        keep_one: leave at least one image of every class out of the draw (a held-out set
            must leave each class something to train on).

    Returns:
        int64 ``(n,)``, sorted (the images keep their order in the split).

    Raises:
        DataError: a class has fewer images than its share (``keep_one``: than its share + 1),
            naming ``flag``.
    """
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    chosen = []
    for i, c in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        share = n // len(classes) + (1 if i < n % len(classes) else 0)
        if share + keep_one > len(members):
            name = CLASSES[c] if 0 <= c < len(CLASSES) else c
            need = f"{share}, and one left to train on" if keep_one else f"{share}"
            raise DataError(f"{flag} {n}: class {name} has {len(members)} training images, "
                            f"a balanced draw of {n} needs {need}")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:share]])
    return torch.cat(chosen).sort().values


def balanced_subset(split: Split, n: int, seed: int) -> Split:
    """``n`` images of ``split`` (``balanced_indices``, drawn with ``seed``), for quick trials
    (``--train-subset``).

    Raises:
        DataError: a class has fewer images than its share.
    """
    index = balanced_indices(split.labels, n, seed, "--train-subset")
    return Split(split.images[index], split.labels[index])


def hold_out(split: Split, n: int, seed: int) -> tuple[Split, Split, torch.Tensor]:
    """Split ``n`` class-balanced images (``balanced_indices`` with ``seed``) off ``split`` as a
    validation set (``--val-split``).

    Returns:
        ``(training part, validation part, validation indices)``: the two parts are disjoint
        and together are ``split``; the indices (int64 ``(n,)``, sorted) are positions in ``split``.

    Raises:
        DataError: a class has no more images than its share of ``n``.
    """
    val = balanced_indices(split.labels, n, seed, "--val-split", keep_one=True)
    keep = torch.ones(len(split.labels), dtype=torch.bool)
    keep[val] = False
    return Split(split.images[keep], split.labels[keep]), Split(split.images[val], split.labels[val]), val


class TrainingImages(NamedTuple):
    """What a run trains on (``training_images``): ``train``, the held-out ``val`` set and its
    indices ``val_index`` in the training split (None without ``--val-split``), and
    ``available``: the images there were to train on (those not held out), before ``--train-subset``."""

    train: Split
    val: Split | None
    val_index: torch.Tensor | None
    available: int


def training_images(source: DataSource, cfg, workers: int, write_cache: bool = True, log=print) -> TrainingImages:
    """The images a run trains (or calibrates) on, and its validation set.

    ``--val-split N`` holds out N class-balanced images first (``hold_out``); ``--train-subset``
    is then drawn from the rest.

    Raises:
        DataError: see ``load_split``, ``hold_out`` and ``balanced_subset``; fewer than 2
            training images.
    """
    train = load_split(source, train=True, download=not cfg.no_download, workers=workers, log=log,
                       write_cache=write_cache)
    val = val_index = None
    if cfg.val_split:
        train, val, val_index = hold_out(train, cfg.val_split, cfg.seed)
    available = len(train.labels)
    if available < 2:
        raise DataError(f"--data-dir: the training split has {available} image(s) to train on; at least 2 needed")
    if cfg.train_subset is not None:
        train = balanced_subset(train, cfg.train_subset, cfg.seed)
    return TrainingImages(train, val, val_index, available)
def shard(split: Split, rank: int, world_size: int) -> Split:
    """The ``rank``-th of ``world_size`` contiguous, nearly equal parts of ``split`` (sizes differ by at
    most one image; together, in rank order, they are ``split``). For evaluation under torchrun."""
    n = len(split.labels)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    return Split(split.images[lo:hi], split.labels[lo:hi])


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for one epoch's order and augmentation, derived from (seed, epoch).

    Deriving it (instead of carrying one generator through the run) makes every epoch's
    batches a function of the seed and the epoch alone, so a resumed run sees exactly
    the batches of an uninterrupted one.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-sample random crop (padding 4) and horizontal flip of a batch, on its device.

    torchvision's transforms draw one crop per call, so a batched per-sample crop is
    done here with one gather.

    Args:
        images: ``(B, C, 32, 32)``, any dtype.
        offsets: int64 ``(B, 2)`` in ``[0, 8]``: top and left of each crop in the padded image.
        flips: bool ``(B,)``: which samples to mirror.

    Returns:
        ``(B, C, 32, 32)`` of the dtype of ``images``.
    """
    padded = F.pad(images, (CROP_PADDING,) * 4)
    span = torch.arange(IMAGE_SIZE, device=images.device)
    rows = (offsets[:, 0:1] + span)[:, :, None]           # (B, 32, 1)
    cols = (offsets[:, 1:2] + span)[:, None, :]           # (B, 1, 32)
    cols = torch.where(flips[:, None, None], offsets[:, 1:2, None] + IMAGE_SIZE - 1 - span, cols)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: (B, 32, 32, C)


class DeviceLoader:
    """Mini-batches of a ``Split`` held on ``device``, normalised there.

    Training batches are shuffled and augmented (``random_crop_flip``) with
    ``epoch_generator(seed, epoch)``; a final batch of one sample is dropped (BatchNorm
    cannot train on it; with a ``shard``, one of fewer than 2 samples per process), and with
    ``drop_last`` any final batch smaller than ``batch_size``
    (every step then has one static shape, as a compiled step with CUDA graphs needs; the
    images it leaves out differ from epoch to epoch). Evaluation batches are in order and not
    augmented.

    ``shard=(rank, world_size)`` (distributed training): ``batch_size`` is the global batch; this
    process gets the ``rank``-th of ``world_size`` contiguous parts of each training batch (sizes
    differ by at most one sample: equal when ``world_size`` divides the batch), drawn and augmented
    exactly as in one process, so that the parts of all processes make up the one-process epoch.
    ``len`` is the number of global batches, the same in every process.

    Yields ``(x, y)``: float32 ``(B, 3, 32, 32)`` normalised images (``channels_last``
    if asked) and int64 ``(B,)`` labels.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, train: bool, seed: int = 0,
                 channels_last: bool = False, drop_last: bool = False, shard: tuple[int, int] = (0, 1)):
        self.rank, self.world_size = shard
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.device, self.train, self.seed = batch_size, device, train, seed
        self.drop_last = drop_last and train
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255  # input_preprocessing()
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        if self.train and 0 < n % self.batch_size < 2 * self.world_size:  # too few for BatchNorm on every process
            n -= n % self.batch_size
        return -(-n // self.batch_size)

    def images_per_epoch(self) -> int:
        """The images an epoch goes through, all processes together: every one, less a final batch
        that is dropped."""
        return min(len(self) * self.batch_size, len(self.labels))

    def first_images(self, batches: int, epoch: int = 0) -> list[torch.Tensor]:
        """The images ``x`` of this epoch's first ``batches`` batches (fewer when the epoch has fewer): the
        inputs BatchNorm re-estimation and PTQ calibration take, drawn and augmented as training draws them."""
        return [x for x, _ in itertools.islice(self.batches(epoch), batches)]

    def batches(self, epoch: int = 0):
        """This epoch's ``len(self)`` batches ``(x, y)`` as the class says; ``epoch`` seeds a training
        epoch's order and augmentation, so that a resumed run draws the batches it would have drawn."""
        n = len(self.labels)
        if self.train:
            gen = epoch_generator(self.seed, epoch)
            order = torch.randperm(n, generator=gen).to(self.device)
            offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=gen).to(self.device)
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        for b in range(len(self)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, n)
            sl = slice(start, stop)
            if self.train:
                size = stop - start  # this process's part of the global batch
                sl = slice(*(start + size * r // self.world_size for r in (self.rank, self.rank + 1)))
                idx = order[sl]
                x = random_crop_flip(self.images[idx], offsets[sl], flips[sl])
                y = self.labels[idx]
            else:
                x, y = self.images[sl], self.labels[sl]
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield x, y
