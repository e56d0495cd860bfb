"""Image pipelines on grain: image folders or tfds array_record sources, the reference transform,
per-host sharding, global batches and a checkpointable iterator state.

Sources
  folder  `<root>/<class>/<file>`; class indices are the sorted sub-folder names (for ImageNet
          folders named by wnid this is the standard 0..999 order).
  tfds    any tfds image dataset with `image` and `label` features, read as an array_record data
          source (`tfds.data_source`), e.g. imagenet2012 with `manual_dir` pointing at the
          ILSVRC2012 tars. Reading needs no TensorFlow; preparing imagenet2012 from the tars does
          (tfds's builder uses `tf.io.gfile`), so prepare it once where TensorFlow is installed.

Transform (reference: LightningDiT `tokenizer/vavae.py:img_transform`, ADM `center_crop_arr`):
decode with PIL -> RGB -> center crop to `resolution` -> random horizontal flip (train only)
-> float32 in [-1, 1], NHWC. The flip of a record is drawn from the rng grain derives from the
sampler seed and the record's position in the sample stream, so a resumed run flips exactly as an
uninterrupted one.

Corrupt or unreadable images never stop a run: each one is logged with a warning that names the
file and is counted. Training drops them (a batch is filled from the following records); the
evaluation iterator keeps their slot with `mask=False`. `skipped_count()` and the iterator's
`skipped` attribute report the counts to the trainer.

Checkpointing (one Orbax CheckpointManager item, named "data"):
    items["data"] = grain.checkpoint.CheckpointSave(it)      # save
    items["data"] = grain.checkpoint.CheckpointRestore(it)   # restore into a fresh iterator
Each process writes its own `process_<i>-of-<n>.json`. A restore must use the same data config,
global batch size, seed and `worker_count` (grain validates the sampler, the source and the
worker count and raises if they differ).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from vavae_jax.runtime.batches import LoaderIterator, make_global_batch  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

SOURCES = ("folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

# What a corrupt, truncated or unsupported image raises inside PIL (open, load or convert).
# Anything else is a bug of ours and must surface.
DECODE_ERRORS = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # raised by some PIL plugins on malformed headers
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_TOTAL_SKIPPED = [0]  # over every iterator of this process; see skipped_count()


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config."""
    return ml_collections.ConfigDict(
        dict(
            source="tfds",  # "tfds" or "folder"
            root="",  # folder source: <root>/<class>/<file>
            tfds_name="imagenet2012",
            tfds_split="train",
            tfds_data_dir="",  # "" = tfds default (TFDS_DATA_DIR or ~/tensorflow_datasets)
            manual_dir="",  # imagenet2012: the folder holding ILSVRC2012_img_{train,val}.tar
            resolution=256,
            random_flip=True,
            worker_count=8,  # grain worker processes per host; 0 = in the main process
            worker_buffer_size=2,  # batches prefetched per worker
            max_records=-1,  # >0: only the first N records of the source (debugging)
        )
    )


def skipped_count() -> int:
    """Corrupt or unreadable images skipped so far by all iterators of this process.

    Counted when a batch that follows them reaches the main process (images decode in grain
    workers); images skipped after the last batch of a finite run are logged but not counted.
    """
    return _TOTAL_SKIPPED[0]


# ---------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------
def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `image_datasets.py`; LightningDiT `tokenizer/vavae.py`).

    Halve with a box filter while the short side is at least twice the target, resize with bicubic
    so that the short side equals the target, then cut the central square. Returns [S, S, C] uint8.
    """
    while min(image.size) >= 2 * image_size:
        half = (image.size[0] // 2, image.size[1] // 2)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    target = (round(image.size[0] * scale), round(image.size[1] * scale))
    image = image.resize(target, resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def decode_image(encoded: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> [resolution, resolution, 3] uint8 (raises one of DECODE_ERRORS)."""
    with Image.open(io.BytesIO(encoded)) as image:
        image.load()  # decode fully here so that truncated files fail inside the caller's guard
        rgb = image.convert("RGB")
    return center_crop_arr(rgb, resolution)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (reference: x / 127.5 - 1)."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ---------------------------------------------------------------------------------------------
# Sources: each record is {"encoded": bytes | None, "error": str | None, "name": str,
#                          "label": int32, "index": int64}
# ---------------------------------------------------------------------------------------------
def _record(encoded, error, name, label, index) -> dict[str, Any]:
    return dict(
        encoded=encoded, error=error, name=name, label=np.int32(label), index=np.int64(index)
    )


class ImageFolderSource(grain.sources.RandomAccessDataSource):
    """`<root>/<class>/<file>`: labels are positions in the sorted list of class folders."""

    def __init__(self, root: str, max_records: int = -1):
        self.root = os.path.normpath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"data.root={os.fspath(root)!r} ({os.path.abspath(self.root)}) is not a directory: "
                "expected an image folder laid out as <root>/<class>/<image>, e.g. "
                "../shared/data/imagenet-sample-256. Set --config.data.root to such a folder."
            )
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            names = sorted(
                e.name
                for e in os.scandir(os.path.join(self.root, cls))
                if e.is_file()
                and not e.name.startswith(".")
                and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            files += [os.path.join(cls, n) for n in names]
            labels += [label] * len(names)
        if not files:
            raise FileNotFoundError(
                f"no images under data.root={os.fspath(root)!r} ({os.path.abspath(self.root)}): "
                f"found {len(self.classes)} class folder(s) but no files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}. Expected <root>/<class>/<image>."
            )
        if max_records > 0:
            files, labels = files[:max_records], labels[:max_records]
        self._files = files
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = os.path.join(self.root, self._files[index])
        try:
            with open(path, "rb") as f:
                encoded, error = f.read(), None
        except OSError as e:
            encoded, error = None, f"unreadable: {e}"
        return _record(encoded, error, path, self._labels[index], index)

    def __repr__(self) -> str:
        # grain compares this string when restoring an iterator state: keep it stable.
        return (
            f"ImageFolderSource(root={self.root!r}, num_classes={len(self.classes)}, "
            f"num_records={len(self)})"
        )


class TfdsImageSource(grain.sources.RandomAccessDataSource):
    """A tfds dataset with `image` and `label` features as an array_record data source.

    Images are read undecoded (`tfds.decode.SkipDecoding`) and decoded by `decode_image`, so both
    sources share one decoder (PIL, as the reference) and one corrupt-image guard.
    """

    def __init__(
        self, name: str, split: str, data_dir: str = "", manual_dir: str = "", max_records: int = -1
    ):
        import tensorflow_datasets as tfds

        prepare_kwargs = None
        if manual_dir:
            prepare_kwargs = {
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
            }
        # file_format: tfds only defaults to array_record when no data_dir is given.
        self._ds = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir or None,
            decoders={"image": tfds.decode.SkipDecoding()},
            builder_kwargs={"file_format": "array_record"},
            download_and_prepare_kwargs=prepare_kwargs,
        )
        features = self._ds.dataset_info.features
        missing = [k for k in ("image", "label") if k not in features]
        if missing:
            raise ValueError(
                f"tfds dataset {name!r} lacks the feature(s) {missing}; it has "
                f"{sorted(features.keys())}. Expected an image dataset with 'image' and 'label'."
            )
        self.name, self.split = name, split
        self._has_file_name = "file_name" in features
        n = len(self._ds)
        self._len = min(n, max_records) if max_records > 0 else n

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range [0, {self._len})")
        example = self._ds[index]
        name = f"{self.name}/{self.split}[{index}]"
        if self._has_file_name:
            file_name = example["file_name"]
            file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
            name = f"{name} ({file_name})"
        return _record(example["image"], None, name, example["label"], index)

    def __repr__(self) -> str:
        return f"TfdsImageSource(name={self.name!r}, split={self.split!r}, num_records={len(self)})"


def make_source(config: ml_collections.ConfigDict) -> grain.sources.RandomAccessDataSource:
    """The data source named by `config.source`."""
    if config.source == "folder":
        if not config.root:
            raise ValueError("data.source='folder' needs data.root=<root>/<class>/<image>")
        return ImageFolderSource(config.root, config.max_records)
    if config.source == "tfds":
        return TfdsImageSource(
            config.tfds_name,
            config.tfds_split,
            config.tfds_data_dir,
            config.manual_dir,
            config.max_records,
        )
    raise ValueError(f"data.source={config.source!r}; expected one of {SOURCES}")


# ---------------------------------------------------------------------------------------------
# Grain transforms
# ---------------------------------------------------------------------------------------------
class _SkipCounter:
    """Failures decoded since the last emitted element, in this worker process.

    One instance is shared by the decode and finish steps of a pipeline (grain pickles the whole
    pipeline into each worker at once, so they stay shared there). Decoding and finishing run
    lazily one element at a time, so the count read by `_Finish` covers exactly the records
    dropped between two emitted elements.
    """

    def __init__(self):
        self.pending = 0


class _Decode(grain.transforms.Map):
    def __init__(self, resolution: int, counter: _SkipCounter):
        self.resolution, self.counter = resolution, counter

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        image, error = None, record["error"]
        if record["index"] >= 0 and error is None:  # index -1: padding of the eval iterator
            try:
                image = decode_image(record["encoded"], self.resolution)
            except DECODE_ERRORS as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            self.counter.pending += 1
            log.warning("skipping corrupt or unreadable image %s (%s)", record["name"], error)
        ok = image is not None
        if not ok:
            image = np.zeros((self.resolution, self.resolution, 3), np.uint8)
        return dict(image=image, label=record["label"], index=record["index"], ok=np.bool_(ok))


class _KeepDecoded(grain.transforms.Filter):
    def filter(self, element: dict[str, Any]) -> bool:
        return bool(element["ok"])


class _Finish(grain.transforms.RandomMap):
    """Random horizontal flip, scale to [-1, 1], attach the skip count."""

    def __init__(self, random_flip: bool, with_mask: bool, counter: _SkipCounter):
        self.random_flip, self.with_mask, self.counter = random_flip, with_mask, counter

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        out = dict(image=to_model_range(image), label=element["label"], index=element["index"])
        if self.with_mask:
            out["mask"] = element["ok"]
            if not element["ok"]:
                out["image"] = np.zeros_like(out["image"])
        out["skipped"] = np.int32(self.counter.pending)
        self.counter.pending = 0
        return out


# ---------------------------------------------------------------------------------------------
# Iterators
# ---------------------------------------------------------------------------------------------
class DataIterator(LoaderIterator):
    """The training iterator (`batches.LoaderIterator`) that also counts skipped images.

    Batches are dicts of per-host numpy arrays: `image` [B, H, W, 3] float32 in [-1, 1],
    `label` [B] int32, `index` [B] int64 (record index in the source).
    """

    def __init__(self, loader: grain.DataLoader, num_records: int, per_host_batch: int):
        super().__init__(loader, num_records, per_host_batch)
        self.skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = super().__next__()
        skipped = int(np.sum(batch.pop("skipped")))
        self.skipped += skipped
        _TOTAL_SKIPPED[0] += skipped
        return batch


def _shard_options(shard_index: int | None, shard_count: int | None) -> grain.sharding.ShardOptions:
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    return grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)


def _per_host_batch(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global batch size {global_batch_size} cannot be split over {shard_count} host(s): "
            f"it must be a positive multiple of the process count {shard_count}."
        )
    return global_batch_size // shard_count


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.source not in SOURCES:
        raise ValueError(f"data.source={config.source!r}; expected one of {SOURCES}")
    if config.resolution <= 0:
        raise ValueError(f"data.resolution={config.resolution} must be positive")
    if config.worker_count < 0:
        raise ValueError(f"data.worker_count={config.worker_count} must be >= 0")


def _ensure_grain_flags(worker_count: int) -> None:
    # grain 0.2.18 reads its absl flags when it starts worker processes and fails if the program
    # never parsed flags (pytest, notebooks). Under absl.app they are parsed already; elsewhere
    # grain's defaults are what a program without flags means.
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> tuple[DataIterator, int]:
    """The training pipeline of this host and the number of records in the source.

    Shuffled (globally, per epoch) with `seed`; `num_epochs=None` repeats forever. Each host reads
    a disjoint 1/process_count of the records (`shard_index`/`shard_count` default to the JAX
    process index and count) and yields batches of `global_batch_size // process_count`; the
    last partial batch of a finite run is dropped.
    """
    _check_config(config)
    shard = _shard_options(shard_index, shard_count)
    per_host = _per_host_batch(global_batch_size, shard.shard_count)
    source = make_source(config)
    if len(source) < shard.shard_count:
        raise ValueError(
            f"{len(source)} record(s) cannot be sharded over {shard.shard_count} hosts"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    counter = _SkipCounter()
    operations = [
        _Decode(config.resolution, counter),
        _KeepDecoded(),
        _Finish(config.random_flip, with_mask=False, counter=counter),
        grain.transforms.Batch(per_host, drop_remainder=True),
    ]
    _ensure_grain_flags(config.worker_count)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        shard_options=shard,
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
    )
    return DataIterator(loader, len(source), per_host), len(source)


class DataCountError(RuntimeError):
    """A pass over the data did not deliver every record exactly once."""


class _FinishEval(grain.transforms.Map):
    """The evaluation element: uint8 image (scaled in the main process), label, index, mask."""

    def __init__(self, counter: _SkipCounter):
        self.counter = counter

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        out = dict(
            image=element["image"],
            label=element["label"],
            index=element["index"],
            mask=element["ok"],
            skipped=np.int32(self.counter.pending),
        )
        self.counter.pending = 0
        return out


class EvalIterator(Iterator[dict[str, np.ndarray]]):
    """Exactly `num_batches` per-host batches of exactly `per_host_batch` records, in the order of
    the source, whatever grain's `worker_count`; the pass is verified when it ends.

    Records travel one at a time from grain's workers and are batched here. (Batching inside
    the loader batches inside each worker: with 8 workers every batch held 1/8 of the records it
    should, and a consumer that read `num_batches` batches silently lost half of the data.)
    When the loader is exhausted, the record indices seen must be exactly this host's block of
    the (padded) source, each once, or `DataCountError` names what is missing or repeated.

    Batches: `image` [B, H, W, 3] float32 in [-1, 1], `label` [B] int32, `index` [B] int64 (-1 for
    padding), `mask` [B] bool (False for padding and corrupt images).
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        num_records: int,
        per_host_batch: int,
        num_batches: int,
        expected_indices: range,
    ):
        self._it = iter(loader)
        self.num_records = num_records
        self.per_host_batch = per_host_batch
        self.num_batches = num_batches
        self.expected_indices = expected_indices
        self.skipped = 0
        self._batches = 0
        self._seen = np.zeros(len(expected_indices), np.int32)
        self._done = False

    def __iter__(self) -> EvalIterator:
        return self

    def __len__(self) -> int:
        return self.num_batches

    def _next_element(self) -> dict[str, Any] | None:
        try:
            return next(self._it)
        except StopIteration:
            return None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches == self.num_batches:
            if self._next_element() is not None:
                raise DataCountError(
                    f"the data loader yields more than {self.num_batches} batches of "
                    f"{self.per_host_batch} records; expected {len(self.expected_indices)} records"
                )
            self._release()
            self._verify()
            raise StopIteration
        elements = []
        while len(elements) < self.per_host_batch:
            e = self._next_element()
            if e is None:
                raise DataCountError(
                    f"the data loader ended after {self._batches * self.per_host_batch + len(elements)} "
                    f"of {self.num_batches * self.per_host_batch} records (batch {self._batches + 1} "
                    f"of {self.num_batches} incomplete)"
                )
            elements.append(e)
        batch = {k: np.stack([e[k] for e in elements]) for k in ("image", "label", "index", "mask")}
        skipped = int(sum(int(e["skipped"]) for e in elements))
        self.skipped += skipped
        _TOTAL_SKIPPED[0] += skipped
        batch["image"] = to_model_range(batch["image"])
        batch["image"][~batch["mask"]] = 0.0
        real = batch["index"] >= 0
        pos = batch["index"][real] - self.expected_indices.start
        if pos.size and (pos.min() < 0 or pos.max() >= len(self.expected_indices)):
            raise DataCountError(
                f"record index {int(batch['index'][real][0])} is outside this host's block "
                f"{self.expected_indices}"
            )
        np.add.at(self._seen, pos, 1)
        self._batches += 1
        return batch

    def _release(self) -> None:
        """Drops grain's iterator once it is exhausted: its worker processes shut down and the
        shared memory of their last records is unlinked now, not by Python's resource tracker
        at exit (which warned of 8 leaked shared_memory objects after every extraction)."""
        import gc

        self._it = iter(())
        gc.collect()

    def _verify(self) -> None:
        if self._done:
            return
        self._done = True
        missing = np.flatnonzero(self._seen == 0)
        repeated = np.flatnonzero(self._seen > 1)
        if missing.size or repeated.size:
            start = self.expected_indices.start
            raise DataCountError(
                f"the pass over records {self.expected_indices.start}..{self.expected_indices.stop - 1} "
                f"lost {missing.size} record(s) (e.g. {(missing[:5] + start).tolist()}) and "
                f"repeated {repeated.size} (e.g. {(repeated[:5] + start).tolist()})"
            )

    def finish(self) -> None:
        """Checks that the pass is over and complete (every record of this host's block once)."""
        try:
            next(self)
        except StopIteration:
            return
        raise DataCountError(f"the data loader has batches beyond the expected {self.num_batches}")


class _RecordRange(grain.sources.RandomAccessDataSource):
    """Records [lo, hi) of `source`, padded (index -1, masked out) past its end."""

    def __init__(self, source: grain.sources.RandomAccessDataSource, lo: int, hi: int):
        self._source, self._lo, self._hi = source, lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._lo + index
        if i < len(self._source):
            return self._source[i]
        return _record(None, None, "", -1, -1)

    def __repr__(self) -> str:
        return f"RecordRange({self._source!r}, {self._lo}, {self._hi})"


def eval_num_batches(num_records: int, global_batch_size: int) -> int:
    """Batches of one evaluation pass: the source padded to a multiple of the global batch."""
    return -(-num_records // global_batch_size)


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    start_batch: int = 0,
    source: grain.sources.RandomAccessDataSource | None = None,
) -> tuple[EvalIterator, int]:
    """One pass over every record in order, no flip, for evaluation and latent extraction.

    Keeps every record: the source is padded to a multiple of `global_batch_size`, so all hosts
    get the same number of full batches (`eval_num_batches`); padding and corrupt images have
    `mask=False` (and `index=-1` for padding). Host h reads the contiguous block
    [h * B_h * n, (h + 1) * B_h * n) of the padded source (B_h: the per-host batch, n: the
    batches), from its batch `start_batch` on (a resumed extraction). The batches and their
    order are the same for any `worker_count` (see `EvalIterator`). `source` defaults to
    `make_source(config)`.
    """
    _check_config(config)
    shard = _shard_options(shard_index, shard_count)
    per_host = _per_host_batch(global_batch_size, shard.shard_count)
    source = make_source(config) if source is None else source
    num_batches = eval_num_batches(len(source), global_batch_size)
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch={start_batch} is outside [0, {num_batches}]")
    block = num_batches * per_host
    lo = shard.shard_index * block + start_batch * per_host
    hi = (shard.shard_index + 1) * block
    view = _RecordRange(source, lo, hi)
    # This host's block is cut here, so grain sees one shard.
    whole = grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=False)
    sampler = grain.samplers.IndexSampler(
        num_records=len(view), shard_options=whole, shuffle=False, num_epochs=1
    )
    counter = _SkipCounter()
    operations = [_Decode(config.resolution, counter), _FinishEval(counter)]
    _ensure_grain_flags(config.worker_count)
    loader = grain.DataLoader(
        data_source=view,
        sampler=sampler,
        operations=operations,
        shard_options=whole,
        worker_count=config.worker_count,
        # Elements, not batches, travel: each worker keeps its share of `worker_buffer_size`
        # batches in flight.
        worker_buffer_size=max(config.worker_buffer_size, 1)
        * max(1, -(-per_host // max(config.worker_count, 1))),
    )
    expected = range(min(lo, len(source)), min(hi, len(source)))
    it = EvalIterator(loader, len(source), per_host, num_batches - start_batch, expected)
    return it, len(source)
