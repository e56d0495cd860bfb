"""The grain image pipelines of vavae_jax.data on the bundled sample images (read in place)."""

import logging
import os
import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec
from PIL import Image

from vavae_jax import data
from vavae_jax.runtime import sharding


def folder_config(root, resolution=32, max_records=-1, worker_count=0, **kw):
    c = data.default_data_config()
    c.update(
        dict(
            source="folder",
            root=str(root),
            resolution=resolution,
            worker_count=worker_count,
            max_records=max_records,
        )
    )
    c.update(kw)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def adm_center_crop(pil_image, image_size):
    """The test's own transcription of ADM `center_crop_arr` (guided-diffusion image_datasets.py)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def link_classes(sample_images_dir, root, n):
    """A folder of `n` symlinked sample classes (the images stay in ../shared/data)."""
    root.mkdir(parents=True, exist_ok=True)
    wnids = sorted(p.name for p in sample_images_dir.iterdir() if p.is_dir())[:n]
    for w in wnids:
        (root / w).symlink_to(sample_images_dir / w, target_is_directory=True)
    return wnids


def test_center_crop_matches_adm_reference(sample_images_dir, tmp_path):
    jpg = sorted(sample_images_dir.glob("*/*.jpg"))[3]
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    # A non-square, larger image: exercises box halving, bicubic resize and an off-centre crop.
    Image.open(jpg).convert("RGB").resize((517, 301), Image.BICUBIC).save(root / "a" / "wide.png")
    (root / "b").mkdir()
    (root / "b" / "photo.jpg").symlink_to(jpg)
    for res in (64, 100):
        it, n = data.make_eval_iterator(folder_config(root, res), 2)
        (batch,) = list(it)
        assert n == 2 and batch["mask"].all()
        for i, path in enumerate([root / "a" / "wide.png", jpg]):
            ref = adm_center_crop(Image.open(path).convert("RGB"), res)
            assert ref.shape == (res, res, 3)
            np.testing.assert_array_equal(batch["image"][i], ref.astype(np.float32) / 127.5 - 1)


def test_batches_labels_and_range(sample_images_dir):
    c = folder_config(sample_images_dir, resolution=32, max_records=24)
    it, n = data.make_train_iterator(c, 8, seed=0)
    assert n == 24
    seen = set()
    for batch in take(it, 3):
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
        # One image per class, classes sorted: record i is class i.
        np.testing.assert_array_equal(batch["label"], batch["index"])
        seen |= set(batch["index"].tolist())
    assert seen == set(range(24))  # one shuffled epoch
    # Sorted wnids are the standard ImageNet indices listed in classes.tsv.
    source = data.ImageFolderSource(str(sample_images_dir))
    rows = [
        line.split("\t") for line in (sample_images_dir / "classes.tsv").read_text().splitlines()
    ]
    standard = {r[1]: int(r[0]) for r in rows if r[0].isdigit()}
    assert len(source) == 1000 and all(standard[w] == i for i, w in enumerate(source.classes))


def test_flip_is_deterministic_per_record(sample_images_dir):
    c = folder_config(sample_images_dir, resolution=32, max_records=24)
    (plain,) = list(data.make_eval_iterator(c, 24)[0])

    def epoch(seed):
        it, _ = data.make_train_iterator(c, 24, seed, shuffle=False, num_epochs=1)
        return take(it, 1)[0]

    a, b, other = epoch(5), epoch(5), epoch(6)
    np.testing.assert_array_equal(a["image"], b["image"])
    flipped = []
    for img, ref in zip(a["image"], plain["image"]):
        if np.array_equal(img, ref[:, ::-1]) and not np.array_equal(img, ref):
            flipped.append(True)
        else:
            np.testing.assert_array_equal(img, ref)
            flipped.append(False)
    assert 0 < sum(flipped) < 24
    assert not np.array_equal(a["image"], other["image"])


def make_corrupt_root(sample_images_dir, tmp_path):
    root = tmp_path / "corrupt"
    link_classes(sample_images_dir, root, 3)
    bad = root / "aaa_bad"  # sorts first: records 0 and 1
    bad.mkdir()
    (bad / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    good = next((sample_images_dir / sorted(os.listdir(root))[1]).glob("*.jpg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_corrupt_images_are_skipped_and_counted(sample_images_dir, tmp_path, caplog):
    root = make_corrupt_root(sample_images_dir, tmp_path)
    before = data.skipped_count()
    with caplog.at_level(logging.WARNING, logger="vavae_jax.data"):
        it, n = data.make_train_iterator(folder_config(root), 3, 0, shuffle=False, num_epochs=1)
        batches = list(it)
    assert n == 5 and len(batches) == 1
    assert sorted(batches[0]["index"].tolist()) == [2, 3, 4]
    assert it.skipped == 2 and data.skipped_count() == before + 2
    assert "skipping corrupt or unreadable image" in caplog.text
    assert str(root / "aaa_bad" / "garbage.jpg") in caplog.text
    assert str(root / "aaa_bad" / "truncated.jpg") in caplog.text

    # Evaluation keeps the slot, masked out.
    it, _ = data.make_eval_iterator(folder_config(root), 4)
    batches = list(it)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(mask, [False, False, True, True, True, False, False, False])
    assert it.skipped == 2


def test_corrupt_images_counted_across_worker_processes(sample_images_dir, tmp_path):
    root = make_corrupt_root(sample_images_dir, tmp_path)
    c = folder_config(root, worker_count=1)
    it, _ = data.make_train_iterator(c, 3, 0, shuffle=False, num_epochs=1)
    batches = list(it)
    assert sorted(batches[0]["index"].tolist()) == [2, 3, 4] and it.skipped == 2


def test_missing_or_empty_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*<root>/<class>/<image>"):
        data.make_train_iterator(folder_config(missing), 2, 0)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images under .*empty"):
        data.make_train_iterator(folder_config(tmp_path / "empty"), 2, 0)
    with pytest.raises(ValueError, match="source"):
        data.make_train_iterator(folder_config(tmp_path, source="lmdb"), 2, 0)


class VavaeTinyImages(tfds.core.GeneratorBasedBuilder):
    """Six sample photos as a real tfds array_record dataset (prepared without TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")
    FILES: list[pathlib.Path] = []

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=3),
                    "file_name": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, f in enumerate(self.FILES):
            yield i, {"image": str(f), "label": i % 3, "file_name": f.name}


def test_tfds_array_record_source(sample_images_dir, tmp_path):
    files = sorted(sample_images_dir.glob("*/*.jpg"))[:6]
    VavaeTinyImages.FILES = files
    c = data.default_data_config()
    c.update(
        dict(
            source="tfds",
            tfds_name="vavae_tiny_images",
            tfds_split="train",
            tfds_data_dir=str(tmp_path / "tfds"),
            resolution=48,
            worker_count=0,
        )
    )
    source = data.make_source(c)  # prepares the dataset (array_record) on first use
    assert list((tmp_path / "tfds" / "vavae_tiny_images" / "1.0.0").glob("*.array_record*"))
    # tfds shuffles records when it prepares them: map record index -> file by the file_name.
    by_name = {f.name: (i, f) for i, f in enumerate(files)}
    order = [by_name[source[k]["name"].split("(")[1].rstrip(")")] for k in range(6)]
    assert source[4]["name"].startswith("vavae_tiny_images/train[4] (")

    it, n = data.make_eval_iterator(c, 6)
    assert n == 6
    (batch,) = list(it)
    np.testing.assert_array_equal(batch["label"], [i % 3 for i, _ in order])
    for img, (_, f) in zip(batch["image"], order):
        ref = adm_center_crop(Image.open(f).convert("RGB"), 48)
        np.testing.assert_array_equal(img, ref.astype(np.float32) / 127.5 - 1)
    train, _ = data.make_train_iterator(c, 3, seed=1)
    assert take(train, 3)[2]["image"].shape == (3, 48, 48, 3)


def test_iterator_state_resumes_exactly(sample_images_dir, tmp_path):
    c = folder_config(sample_images_dir, resolution=16, max_records=20)

    def fresh():
        return data.make_train_iterator(c, 4, seed=7)[0]

    it = fresh()
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)  # crosses the epoch boundary (5 batches per epoch)

    resumed = fresh()
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 4)):
        for k in ("image", "label", "index"):
            np.testing.assert_array_equal(a[k], b[k])

    # The same through Orbax, as the trainer stores it (item "data").
    it = fresh()
    take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = take(it, 4)  # before the (async) save finishes: the state is taken at save()
    mngr.wait_until_finished()
    restored = fresh()
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for a, b in zip(expected, take(restored, 4)):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])
    mngr.close()


def test_per_host_sharding_is_disjoint(sample_images_dir):
    c = folder_config(sample_images_dir, resolution=8, max_records=21)
    hosts = []
    for host in range(2):
        it, _ = data.make_train_iterator(c, 4, 0, num_epochs=1, shard_index=host, shard_count=2)
        assert it.per_host_batch == 2
        hosts.append({i for b in it for i in b["index"].tolist()})
    assert not hosts[0] & hosts[1]
    assert len(hosts[0]) == len(hosts[1]) == 10 and hosts[0] | hosts[1] <= set(range(21))
    ev = [
        np.concatenate(
            [b["index"] for b in data.make_eval_iterator(c, 4, shard_index=h, shard_count=2)[0]]
        )
        for h in range(2)
    ]
    assert len(ev[0]) == len(ev[1]) == 12  # 21 records padded to 24
    assert sorted(i for e in ev for i in e.tolist() if i >= 0) == list(range(21))
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        data.make_train_iterator(c, 5, 0, shard_index=0, shard_count=2)


def test_global_batch_on_fake_devices(sample_images_dir):
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=4, fsdp=2)
    c = folder_config(sample_images_dir, resolution=8, max_records=16)
    local = next(data.make_train_iterator(c, 8, 0)[0])
    batch = data.make_global_batch(local, mesh)
    for k, v in batch.items():
        assert v.shape == local[k].shape
        assert v.sharding.spec == PartitionSpec(("data", "fsdp"), *[None] * (v.ndim - 1))
        assert len(v.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(v), local[k])
    assert batch["image"].addressable_shards[0].data.shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        data.make_global_batch({"image": local["image"][:6]}, mesh)
