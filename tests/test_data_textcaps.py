"""textcaps on the 200 real annotation records in ../shared/data, with small generated JPEGs.

The official layout is used: <root>/TextCaps_0.1_{train,val}.json and <root>/images/<image_path>.
"""
import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdro.config import Config
from tdro.data import DataError, DataFileError, build_dataset
from tdro.data.images import IMAGENET_MEAN, IMAGENET_STD
from tdro.data.textcaps import PAD_ID, UNK_ID, VOCAB_SIZE, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "textcaps"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")
SOLID = (200, 30, 90)
SOLID_ID = next(r["image_id"] for r in json.loads((SHARED / "TextCaps_0.1_train.json_samples.json").read_text())["data"]
                if r["image_classes"][0] == "Person") if SHARED.is_dir() else None


def image_path(root: Path, image_id: str) -> Path:
    for split in ("train", "val"):
        for record in json.loads((root / f"TextCaps_0.1_{split}.json").read_text())["data"]:
            if record["image_id"] == image_id:
                return root / "images" / record["image_path"]
    raise KeyError(image_id)


def locate(dataset, group: str, image_id: str) -> tuple[str, int]:
    """(split, position within the split) of an image in a group."""
    pool_position = dataset.info["image_ids"].index(image_id)
    g = dataset.groups[group]
    split = next(s for s in ("train", "val", "test") if pool_position in g.split(s).index.tolist())
    return split, g.split(split).index.tolist().index(pool_position)


def make_root(root: Path, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        target = root / f"TextCaps_0.1_{split}.json"
        shutil.copy(SHARED / f"TextCaps_0.1_{split}.json_samples.json", target)
        if not images:
            continue
        for i, record in enumerate(json.loads(target.read_text())["data"]):
            path = root / "images" / record["image_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if record["image_id"] == SOLID_ID:
                pixels = np.broadcast_to(np.array(SOLID, dtype=np.uint8), (20, 30, 3))
            else:
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=95)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("textcaps"))


def cfg(root, **changes):
    base = dict(dataset="textcaps", data_root=str(root), image_size=32, textcaps_num_classes=5)
    base.update(changes)
    return Config(**base)


@pytest.fixture(scope="module")
def textcaps(root):
    return build_dataset(cfg(root))


def test_groups_classes_and_splits(textcaps, root):
    assert textcaps.group_names == ["visual", "text"]
    assert textcaps.class_names == ["Person", "Boy", "Laptop", "Poster", "Clock"]  # train frequency, ties by name
    visual, text = textcaps.groups["visual"], textcaps.groups["text"]
    assert (visual.kind, visual.encoder, visual.input_info) == ("image", "resnet_visual",
                                                                {"in_channels": 3, "image_size": 32})
    assert (text.kind, text.encoder, text.input_info) == ("text", "mlp_text", {"vocab_size": VOCAB_SIZE, "max_len": 128})
    assert visual.train.x[torch.arange(4)].shape == (4, 3, 32, 32)
    assert text.train.x.shape[1:] == (128,) and text.train.x.dtype == torch.long
    # train+val come from the official train split (38 images of these classes), test from official val
    assert len(visual.train) + len(visual.val) == 38 and len(visual.test) == 31
    for g in (visual, text):
        ids = [set(g.split(s).index.tolist()) for s in ("train", "val", "test")]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert torch.equal(visual.train.index, text.train.index)  # one image, two modalities
    assert textcaps.info["train_outside_classes"] == 62 and textcaps.info["missing_images"] == []


def test_images_are_resized_and_imagenet_normalised(textcaps):
    split, where = locate(textcaps, "visual", SOLID_ID)
    image = textcaps.groups["visual"].split(split).x[torch.tensor([where])][0]
    expected = (torch.tensor(SOLID) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image.mean((1, 2)), expected, atol=0.03)
    assert float(image.std((1, 2)).max()) < 0.05


def test_tokenizer_unknown_is_not_padding():
    ids = tokenize(["Ab~ z", ""], max_len=4)
    assert ids.tolist() == [[1, 2, UNK_ID, 37], [PAD_ID] * 4]
    assert UNK_ID != PAD_ID and VOCAB_SIZE == UNK_ID + 1


def test_text_only_reads_annotations_without_images(tmp_path):
    root = make_root(tmp_path, images=False)
    ds = build_dataset(cfg(root, textcaps_groups=["text"], text_max_len=64, textcaps_num_classes=None))
    assert ds.group_names == ["text"] and ds.groups["text"].input_info["max_len"] == 64
    assert len(ds.class_names) == 43  # all train classes
    assert ds.info["train_outside_classes"] == 0


def test_explicit_class_names_keep_their_order(root):
    ds = build_dataset(cfg(root, textcaps_class_names=["Laptop", "Person"]))
    assert ds.class_names == ["Laptop", "Person"]
    counts = torch.bincount(torch.cat([ds.groups["text"].train.y, ds.groups["text"].val.y]), minlength=2)
    assert counts.tolist() == [6, 14]


def test_class_list_that_leaves_a_split_empty(root):
    with pytest.raises(DataError, match=r"textcaps_class_names: \['Bat'\] have no images in the train split"):
        build_dataset(cfg(root, textcaps_class_names=["Person", "Bat"]))
    with pytest.raises(DataError, match=r"group 'visual' has no (val|test) samples"):
        build_dataset(cfg(root, textcaps_class_names=["Television"]))


def test_missing_image_is_reported_not_silently_dropped(tmp_path):
    root = make_root(tmp_path)
    record = json.loads((root / "TextCaps_0.1_val.json").read_text())["data"][0]  # a Person image
    (root / "images" / record["image_path"]).unlink()
    with pytest.warns(UserWarning, match=r"1 TextCaps images are missing .* left out"):
        ds = build_dataset(cfg(root))
    assert ds.info["missing_images"] == [str(root / "images" / record["image_path"])]
    assert record["image_id"] not in [ds.info["image_ids"][i] for i in ds.groups["visual"].test.index.tolist()]


def test_unreadable_image_raises_naming_the_file(tmp_path):
    root = make_root(tmp_path)
    bad = image_path(root, SOLID_ID)
    whole = bad.read_bytes()
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=rf"1 of \d+ images cannot be read: {bad}"):
        build_dataset(cfg(root))  # its header is checked when the dataset is built
    scan = whole.index(b"\xff\xda")  # start of the pixel data
    bad.write_bytes(whole[: scan + (len(whole) - scan) // 2])  # header intact, pixel data cut: found when decoded
    ds = build_dataset(cfg(root))
    split, where = locate(ds, "visual", SOLID_ID)
    with pytest.raises(DataError, match=rf"cannot read image {bad}"):
        ds.groups["visual"].split(split).x[torch.tensor([0, where])]
    with pytest.raises(DataError, match=rf"cannot read image {bad}"):
        build_dataset(cfg(root, feature_cache=True, feature_backbone_weights="random",
                          feature_cache_dir=str(tmp_path / "cache")))


def test_feature_cache_computed_once_and_keyed(tmp_path, root):
    cache = tmp_path / "cache"
    config = cfg(root, feature_cache=True, feature_backbone_weights="random", feature_cache_dir=str(cache))
    first = build_dataset(config)
    visual = first.groups["visual"]
    assert (visual.kind, visual.encoder, visual.input_info) == ("features", "features", {"feature_dim": 512})
    assert visual.train.x.shape == (len(visual.train), 512) and visual.train.x.dtype == torch.float32
    assert first.info["feature_cache"]["hit"] is False
    files = list(cache.glob("textcaps-resnet18-*.pt"))
    assert len(files) == 1
    second = build_dataset(config)
    assert second.info["feature_cache"] == {"file": str(files[0]), "hit": True}
    assert torch.equal(second.groups["visual"].test.x, visual.test.x)
    resized = build_dataset(config.replace(image_size=40))  # a different transform is a different cache
    assert resized.info["feature_cache"]["hit"] is False and len(list(cache.glob("*.pt"))) == 2
    other_classes = build_dataset(config.replace(textcaps_num_classes=3))  # another image list
    assert other_classes.info["feature_cache"]["hit"] is False


def test_feature_cache_key_follows_the_image_files(tmp_path):
    root = make_root(tmp_path / "data")
    config = cfg(root, feature_cache=True, feature_backbone_weights="random",
                 feature_cache_dir=str(tmp_path / "cache"), textcaps_num_classes=2)
    before = build_dataset(config)
    Image.new("RGB", (31, 17), (0, 255, 0)).save(image_path(root, SOLID_ID))
    after = build_dataset(config)
    assert after.info["feature_cache"]["hit"] is False
    assert after.info["feature_cache"]["file"] != before.info["feature_cache"]["file"]


def test_pretrained_backbone_absent_is_a_clear_error(tmp_path, root, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"pretrained ResNet-18 weights not found .*never downloads"):
        build_dataset(cfg(root, feature_cache=True, feature_cache_dir=str(tmp_path / "cache")))


def test_combined_group_and_spurious_mode(root):
    ds = build_dataset(cfg(root, include_combined_group=True))
    combined = ds.groups["combined"]
    assert (combined.kind, combined.encoder) == ("multimodal", "fusion")
    images, tokens = combined.val.x[torch.arange(2)]
    assert images.shape == (2, 3, 32, 32) and tokens.shape == (2, 128)

    spurious = build_dataset(cfg(root, spurious_correlation=True, spurious_majority_frac=1.0))
    visual, text = spurious.groups["visual"], spurious.groups["text"]
    train_all = set(ds.groups["visual"].train.index.tolist())
    v, t = set(visual.train.index.tolist()), set(text.train.index.tolist())
    assert not v & t and v | t == train_all  # each training image in exactly one group
    assert set(visual.train.y.tolist()) <= {0, 1, 2} and set(text.train.y.tolist()) <= {3, 4}  # class blocks
    assert torch.equal(visual.test.index, text.test.index) and torch.equal(visual.val.index, text.val.index)
    mapped = build_dataset(cfg(root, spurious_correlation=True, spurious_majority_frac=1.0,
                               spurious_group_classes={"text": ["Person"], "visual": [1, 2, 3, 4]}))
    assert set(mapped.groups["text"].train.y.tolist()) == {0}
    with pytest.raises(DataError, match=r"leaves classes \['Clock'\] without a majority group"):
        build_dataset(cfg(root, spurious_correlation=True, spurious_group_classes={"text": [0], "visual": [1, 2, 3]}))


def test_annotations_folder_and_image_dir_key(tmp_path):
    root = make_root(tmp_path / "data")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / f"TextCaps_0.1_{split}.json").rename(root / "annotations" / f"TextCaps_0.1_{split}.json")
    elsewhere = tmp_path / "pictures"
    (root / "images").rename(elsewhere)
    with pytest.raises(DataFileError, match="none of the TextCaps images were found"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(cfg(root))
    ds = build_dataset(cfg(root, textcaps_image_dir=str(elsewhere)))
    assert ds.info["image_dir"] == str(elsewhere) and len(ds.groups["visual"].test) == 31


@pytest.mark.parametrize("content,message", [
    ({"dataset_name": "textcaps"}, r"has no 'data' list"),
    ({"data": [{"image_id": "x", "caption_str": "a sign", "image_path": "train/x.jpg"}]}, r"has no 'image_classes'"),
])
def test_bad_annotation_json(tmp_path, content, message):
    root = make_root(tmp_path, images=False)
    (root / "TextCaps_0.1_train.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=rf"TextCaps_0.1_train.json.*{message}"):
        build_dataset(cfg(root, textcaps_groups=["text"]))


def test_missing_annotations(tmp_path):
    with pytest.raises(DataFileError, match=r"TextCaps_0.1_train.json.*textvqa.org/textcaps"):
        build_dataset(cfg(tmp_path))


def test_huggingface_source_without_package_or_network(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"optional package 'datasets' \(pip install datasets\)"):
        build_dataset(cfg(root, textcaps_source="huggingface"))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'lmms-lab/TextCaps' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataFileError, match=r"could not load lmms-lab/TextCaps.*offline.*textcaps_source: local"):
        build_dataset(cfg(root, textcaps_source="huggingface"))


class FakeTable:
    """The part of a datasets.Dataset that the loader uses: metadata columns and lazy image rows."""

    def __init__(self, records, images):
        self.records, self.images, self._fingerprint = records, images, "fake"
        self.column_names = ["image", "image_id", "image_classes", "caption_str", "reference_strs"]
        self.decoded = 0

    def select_columns(self, columns):
        table = self

        class Selected:
            def to_list(self):
                return [{c: r.get(c) for c in columns} for r in table.records]

        return Selected()

    def __getitem__(self, row):
        self.decoded += 1
        return {**self.records[row], "image": self.images[row]}


def test_huggingface_source_with_a_stand_in_package(monkeypatch):
    data = {split: json.loads((SHARED / f"TextCaps_0.1_{split}.json_samples.json").read_text())["data"]
            for split in ("train", "val")}
    tables = {split: FakeTable(records, [Image.new("RGB", (20, 10), SOLID)] * len(records))
              for split, records in data.items()}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name: tables))
    ds = build_dataset(Config(dataset="textcaps", textcaps_source="huggingface", image_size=16,
                              textcaps_num_classes=3))
    assert tables["train"].decoded == 0  # class derivation reads metadata only
    assert ds.class_names == ["Person", "Boy", "Laptop"]
    expected_test = len({r["image_id"] for r in data["val"] if r["image_classes"][0] in ds.class_names})
    assert len(ds.groups["visual"].test) == len(ds.groups["text"].test) == expected_test
    images = ds.groups["visual"].test.x[torch.arange(3)]
    expected = (torch.tensor(SOLID) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert images.shape == (3, 3, 16, 16) and torch.allclose(images.mean((0, 2, 3)), expected, atol=0.03)
