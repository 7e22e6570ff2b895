"""Image fine-tuning input pipeline on the TextCaps-shaped fixture: decoded-image cache, prefetching
workers, augmentation, and a seed_baseline fine-tuning run that resumes exactly after a SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from processes import wait_gone  # tests/processes.py
from textcaps_fixture import SHARED_TEXTCAPS, make_textcaps, real_records  # tests/textcaps_fixture.py
from tdro.config import Config, ConfigError
from tdro.data import DataError, GroupStratifiedBatches, build_dataset
from tdro.data.augment import ImageBatchTransform, TrainInputs, crop_boxes, crop_grid
from tdro.data.batching import PrefetchBatches, prefetched
from tdro.data.image_cache import DecodedImageStore, to_model_input
from tdro.data.images import IMAGENET_MEAN, IMAGENET_STD
from tdro.runs import read_jsonl
from tdro.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not SHARED_TEXTCAPS.is_dir(), reason=f"real data folder {SHARED_TEXTCAPS} is absent")
SCALE = 1 / 16  # 1024 x 768 -> 64 x 48
TIMING_KEYS = {"epoch_seconds", "samples_per_second", "peak_memory_mb", "run_memory_mb"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_textcaps(tmp_path_factory.mktemp("textcaps"), train_records=150, val_records=100, image_scale=SCALE)


def cfg(root: Path, cache: Path, **keys) -> Config:
    return Config(**{"dataset": "textcaps", "data_root": str(root), "image_size": 32, "textcaps_num_classes": 5,
                     "feature_cache_dir": str(cache), **keys})


def test_fixture_repeats_the_real_records_at_their_real_sizes_in_the_official_layout(root):
    for split, count in (("train", 150), ("val", 100)):
        real = real_records(split)["data"]
        records = json.loads((root / f"TextCaps_0.1_{split}.json").read_text())["data"]
        assert len(records) == count
        for i, record in enumerate(records):
            source = real[i % len(real)]
            assert record["caption_str"] == source["caption_str"]
            assert record["image_classes"] == source["image_classes"]
            assert record["image_id"] == (source["image_id"] if i < len(real) else f"{source['image_id']}-r1")
            with Image.open(root / "images" / record["image_path"]) as image:
                assert image.format == "JPEG"
                assert image.size == (round(source["image_width"] * SCALE), round(source["image_height"] * SCALE))
    dataset = build_dataset(cfg(root, root / "unused"))
    assert dataset.info["missing_images"] == []
    assert any(i.endswith("-r1") for i in dataset.info["image_ids"])


def store_of(dataset, split: str):
    return dataset.groups["visual"].split(split).x


def test_the_image_cache_is_built_once_keyed_by_files_and_size_and_matches_decoding(root, tmp_path):
    cache = tmp_path / "cache"
    decoding = build_dataset(cfg(root, cache))
    built = build_dataset(cfg(root, cache, image_cache=True))
    again = build_dataset(cfg(root, cache, image_cache=True))
    assert not built.info["image_cache"]["hit"] and again.info["image_cache"]["hit"]
    path = Path(built.info["image_cache"]["file"])
    assert path.parent == cache and path.suffix == ".npy" and path.with_suffix(".json").is_file()
    store = again.groups["visual"].val.x
    assert isinstance(store, DecodedImageStore) and isinstance(store.array, np.memmap)

    splits = ("train", "val", "test")
    cached = torch.cat([store_of(again, s)[torch.arange(len(store_of(again, s)))] for s in splits])
    decoded = torch.cat([store_of(decoding, s)[torch.arange(len(store_of(decoding, s)))] for s in splits])
    assert cached.dtype == torch.float32 and cached.shape == decoded.shape == (len(cached), 3, 32, 32)
    # draft mode decodes at 1/2 scale only where both sides are >= 2 x 32 (square images); the others are equal
    pool = torch.cat([again.groups["visual"].split(s).index for s in splits]).tolist()
    ids = again.info["image_ids"]
    sizes = {r["image_id"]: (r["image_width"], r["image_height"]) for s in ("train", "val")
             for r in json.loads((root / f"TextCaps_0.1_{s}.json").read_text())["data"]}
    drafted = torch.tensor([min(round(w * SCALE), round(h * SCALE)) >= 64 for w, h in (sizes[ids[p]] for p in pool)])
    assert torch.equal(cached[~drafted], decoded[~drafted])
    assert drafted.any() and (cached[drafted] - decoded[drafted]).abs().mean() < 0.05

    bigger = build_dataset(cfg(root, cache, image_cache=True, image_cache_size=40))
    assert bigger.info["image_cache"]["file"] != str(path) and not bigger.info["image_cache"]["hit"]
    assert bigger.groups["visual"].train.x.train_batch(torch.arange(2)).shape == (2, 3, 40, 40)
    first = root / "images" / "train" / f"{ids[0]}.jpg"  # an image the dataset uses
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        touched = build_dataset(cfg(root, cache, image_cache=True))
        assert not touched.info["image_cache"]["hit"] and touched.info["image_cache"]["file"] != str(path)
    finally:
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="image_cache_size 16 is smaller than image_size 32"):
        build_dataset(cfg(root, cache, image_cache=True, image_cache_size=16))


def batches_equal(a: dict, b: dict) -> bool:
    def same(x, y):
        if isinstance(x, tuple):
            return isinstance(y, tuple) and len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        return x.dtype == y.dtype and torch.equal(x, y)
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@pytest.mark.parametrize("image_cache", [False, True])
def test_prefetching_workers_give_the_plain_batches_and_resume_state(root, tmp_path, image_cache):
    dataset = build_dataset(cfg(root, tmp_path, image_cache=image_cache, include_combined_group=True))

    def plain():
        return GroupStratifiedBatches(dataset, "train", 24, generator=torch.Generator().manual_seed(3), with_index=True)

    reference = plain()
    expected = [list(reference) for _ in range(2)]
    workers = PrefetchBatches(plain(), num_workers=2)
    first = list(workers)
    assert len(first) == len(expected[0]) and all(batches_equal(a, b) for a, b in zip(first, expected[0]))
    state, generator_state = workers.state_dict(), workers.batches.generator.get_state()
    assert list(workers) and workers.state_dict().keys() == reference.state_dict().keys()

    resumed = PrefetchBatches(plain(), num_workers=2)
    resumed.load_state_dict(state)
    resumed.batches.generator.set_state(generator_state)
    assert all(batches_equal(a, b) for a, b in zip(list(resumed), expected[1]))
    assert all(torch.equal(resumed.state_dict()[k], reference.state_dict()[k]) for k in reference.state_dict())


def test_num_workers_and_pin_memory_are_validated_and_plain_batches_need_no_loader(root, tmp_path):
    with pytest.raises(ConfigError, match="num_workers"):
        Config(num_workers=-1)
    with pytest.raises(ConfigError, match="pin_memory"):
        Config(pin_memory="yes")
    batches = GroupStratifiedBatches(build_dataset(Config()), "train", 32)
    assert prefetched(batches, 0, None, torch.device("cpu")) is batches
    with pytest.raises(ConfigError, match="key 'pin_memory' is true but the device is cpu"):
        prefetched(batches, 2, True, torch.device("cpu"))
    assert "key 'augment' is set to True but has no effect" in " ".join(Config(augment=True).inactive_key_warnings())
    assert Config(num_workers=2).result_hash() == Config().result_hash()  # batches do not depend on it


def test_augmentation_crops_and_flips_each_image_by_seed_and_step_and_leaves_evaluation_alone(root, tmp_path):
    boxes = crop_boxes(4000, 0.25, torch.Generator().manual_seed(0))
    half_w, half_h, cx, cy = boxes[:, 0, 0].abs(), boxes[:, 1, 1], boxes[:, 0, 2], boxes[:, 1, 2]
    assert (cx.abs() <= 1 - half_w + 1e-6).all() and (cy.abs() <= 1 - half_h + 1e-6).all()
    assert (half_w * half_h).min() >= 0.25 * 0.75 - 1e-6 and (boxes[:, 0, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    # the affine sampling is exact: identity and mirror maps reproduce the image and its flip
    pixels = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[-1.0, 0, 0], [0, 1.0, 0]]])
    grid = crop_grid(identity, 8)
    assert torch.allclose(grid, torch.nn.functional.affine_grid(identity, [2, 3, 8, 8], align_corners=False))
    assert torch.allclose(crop_grid(boxes[:3], 8), torch.nn.functional.affine_grid(boxes[:3], [3, 3, 8, 8], align_corners=False),
                          atol=1e-6)
    out = torch.nn.functional.grid_sample(pixels.float().expand(2, -1, -1, -1), grid, align_corners=False)
    assert torch.allclose(out[0], pixels[0].float(), atol=1e-4)
    assert torch.allclose(out[1], pixels[0].float().flip(-1), atol=1e-4)

    dataset = build_dataset(cfg(root, tmp_path, image_cache=True, augment=True))
    assert dataset.info["image_cache"]["size"] == 37  # 32 x 8/7
    store = dataset.groups["visual"].train.x
    raw = store.train_batch(torch.arange(6))
    transform = ImageBatchTransform(32, IMAGENET_MEAN, IMAGENET_STD, True, 0.25, seed=0, group="visual")
    once, twice, later = transform(raw, 5), transform(raw, 5), transform(raw, 6)
    assert once.shape == (6, 3, 32, 32) and once.dtype == torch.float32
    assert torch.equal(once, twice) and not torch.equal(once, later)
    rows = torch.tensor([1, 4])
    assert torch.equal(transform(raw[rows], 5, rows, 6), once[rows])  # a distributed rank's share
    assert not torch.equal(once, ImageBatchTransform(32, IMAGENET_MEAN, IMAGENET_STD, True, 0.25, 1, "visual")(raw, 5))
    plain = ImageBatchTransform(32, IMAGENET_MEAN, IMAGENET_STD, False, 0.25, 0, "visual")(raw, 5)
    assert torch.equal(plain, store[torch.arange(6)])  # augment off: exactly the evaluation view
    assert torch.equal(store[torch.arange(6)], to_model_input(raw, 32, IMAGENET_MEAN, IMAGENET_STD))

    inputs = TrainInputs.from_config(dataset, cfg(root, tmp_path, image_cache=True, augment=True))
    assert set(inputs.transforms) == {"visual"} and inputs.transforms["visual"].min_scale == 0.25
    narrow = TrainInputs.from_config(dataset, cfg(root, tmp_path, image_cache=True, augment=True, augment_min_scale=0.9))
    assert narrow.transforms["visual"].min_scale == 0.9 and not torch.equal(narrow({"visual": raw}, 5)["visual"], once)
    tokens = torch.zeros(6, 4, dtype=torch.long)
    assert inputs({"visual": raw, "text": tokens}, 5)["text"] is tokens
    assert TrainInputs.from_config(build_dataset(cfg(root, tmp_path)), cfg(root, tmp_path)).transforms == {}
    paired = build_dataset(cfg(root, tmp_path, image_cache=True, augment=True, include_combined_group=True))
    paired_inputs = TrainInputs.from_config(paired, cfg(root, tmp_path, image_cache=True, augment=True))
    assert set(paired_inputs.transforms) == {"visual", "combined"}
    images, words = paired_inputs({"combined": paired.groups["combined"].train.x.train_batch(torch.arange(6))}, 5)["combined"]
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32 and words.dtype == torch.long


FINE_TUNING = {"image_size": 32, "textcaps_num_classes": 5, "epochs": 2, "batch_size": 16, "latent_dim": 16,
               "head_hidden": 32, "lr_start": 1.0e-3, "lr_end": 1.0e-4, "progress": False, "log_interval": 1,
               "latent_samples_per_group": 0, "image_cache": True, "augment": True}

KILL_AFTER_FIRST_CHECKPOINT = r'''
import multiprocessing, os, signal, sys
from pathlib import Path
from tdro.training import trainer

save = trainer.Trainer._save_checkpoints
def save_then_die(self, improved):
    save(self, improved)
    if self.epoch == 0:
        pids = [p.pid for p in multiprocessing.active_children()]
        Path(sys.argv[1]).write_text(" ".join(map(str, pids)))
        os.kill(os.getpid(), signal.SIGKILL)
trainer.Trainer._save_checkpoints = save_then_die

from tdro.__main__ import main
sys.exit(main(sys.argv[2:]))
'''


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_seed_baseline_fine_tuning_on_the_fixture_with_workers_resumes_exactly_after_a_sigkill(root, tmp_path):
    keys = {**FINE_TUNING, "data_root": str(root), "feature_cache_dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "runs")}
    config = Config.load([ROOT / "params" / "seed_baseline.yaml"], {**keys, "run_name": "straight"})
    assert [g["encoder"] for g in config.groups] == ["resnet_visual", "char_cnn_text"]
    assert config.lr_backbone != config.lr_new
    straight = train(config)
    trainer = Trainer(config.replace(run_name="probe"))
    assert {name for name, p in trainer.model.named_parameters() if ".backbone." in name} and \
        {g["name"] for g in trainer.optimizer.param_groups} == {"backbone", "new"}
    del trainer

    pids_file = tmp_path / "workers.txt"
    command = [sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, str(pids_file), "train", "-f",
               str(ROOT / "params" / "seed_baseline.yaml"), "-p", "run_name", "killed", "-p", "num_workers", "2"]
    for name, value in keys.items():
        command += ["-p", name, json.dumps(value)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    workers = [int(p) for p in pids_file.read_text().split()]
    assert len(workers) == 2, "the run did not prepare its batches in two worker processes"
    assert wait_gone(workers, timeout=15) == [], "data-loader workers outlived their killed parent"
    run = tmp_path / "runs" / "killed"
    assert yaml.safe_load((run / "config.yaml").read_text())["augment"] is True

    resumed = subprocess.run([sys.executable, "-m", "tdro", "train", "--resume", str(run)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_jsonl(run / "history.jsonl")) == without_timing(read_jsonl(straight.run_dir / "history.jsonl"))
    assert read_jsonl(run / "steps.jsonl") == read_jsonl(straight.run_dir / "steps.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val", "test", "selected_epoch"):
        assert summary[key] == straight.summary[key], key
