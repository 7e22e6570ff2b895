"""textcaps: TextCaps images and their captions, classified by the image's semantic class.

Label: the first entry of ``image_classes``, restricted to the ``textcaps_num_classes`` most
frequent of the train split (ties broken by name; ``null`` keeps all) or to an explicit
``textcaps_class_names`` list (in its order); other images are left out (counted in ``info``).

Sources (``textcaps_source``):

* ``local`` - the official files: ``TextCaps_0.1_train.json`` and ``TextCaps_0.1_val.json`` in
  ``data_root`` (or its ``annotations/``, ``textcaps/`` or ``textcaps/annotations/`` sub-folders),
  images at ``<image dir>/<image_path>`` where the image dir is ``textcaps_image_dir``, else
  ``<root>/images`` when it exists, else the folder of the JSON files (``image_path`` looks like
  ``train/011e7e629fb9ae7b.jpg``; the TextVQA zip's ``train_images/<image_name>.jpg`` is also
  accepted). Items whose image file is missing are left out and reported (a warning with the
  count and first paths, and ``info["missing_images"]``), never dropped silently; every used image's
  header is opened when the dataset is built, so an unreadable file is an error naming it then.
* ``huggingface`` - ``lmms-lab/TextCaps`` through the optional ``datasets`` package (needs it
  installed and network access or its local cache; fails clearly otherwise).

Splits: the official train split gives train and (``val_frac``, stratified) val; the official val
split is the test split (TextCaps test captions are withheld upstream). Records are per caption
in the official JSON; tdro keeps one sample per image (its first caption in file order), so an
image never lands in two splits.

Groups (``textcaps_groups``, plus ``combined`` with ``include_combined_group``):

* ``visual`` - the image, resized to ``image_size`` and ImageNet-normalised, through
  ``resnet_visual``; with ``feature_cache: true`` it is the 512-d frozen ResNet-18 feature of the
  image instead (kind ``features``, encoder ``features``), computed once into
  ``feature_cache_dir`` (see ``tdro.data.cache``) from ``feature_backbone_weights``; with
  ``image_cache: true`` (fine-tuning) the images are decoded once into a uint8 memory map of side
  ``image_cache_size`` in ``feature_cache_dir`` (see ``tdro.data.image_cache``) and read from there;
  ``augment: true`` crops and flips training images at random (``tdro.data.augment``);
* ``text`` - the caption as character ids through ``mlp_text``: lower-cased, the reference
  alphabet ``abcdefghijklmnopqrstuvwxyz0123456789 .,!?'"-:;()`` as ids 1..48, **0 = padding and
  49 = unknown character** (the reference mapped unknown characters to the padding id),
  truncated or padded to ``text_max_len`` (128); ``vocab_size`` 50;
* ``combined`` - image and caption together (kind ``multimodal``; ``x[idx]`` is the pair
  ``(images, token ids)``; encoder ``fusion``).

Spurious-correlation mode (``spurious_correlation``, training split only): each training image
goes to one group, its class's majority group with probability ``spurious_majority_frac``,
otherwise a uniformly chosen other group. ``spurious_group_classes`` maps groups (by name or
position) to their classes (ids or names); by default classes are cut into contiguous blocks
per group. Validation and test keep every image in every group.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tdro.data.base import DataError, DataFileError, Group, GroupedDataset, PairStore, Split
from tdro.data.files import data_root, find_file
from tdro.data.images import CallableImageStore, ImageFileStore, ImageTransform
from tdro.data.splits import split_rng, stratified_holdout

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\"-:;()"
PAD_ID = 0
UNK_ID = len(ALPHABET) + 1
VOCAB_SIZE = len(ALPHABET) + 2
_CHAR_IDS = {ch: i + 1 for i, ch in enumerate(ALPHABET)}
TEXTCAPS_DIRS = ("annotations", "textcaps", "textcaps/annotations", "TextCaps")
TEXTCAPS_ORIGIN = ("https://textvqa.org/textcaps/dataset/ (TextCaps_0.1_train.json, TextCaps_0.1_val.json; images: "
                   "TextVQA's train_val_images.zip from https://textvqa.org/dataset/)")
GROUP_NAMES = ("visual", "text", "combined")
HF_DATASET = "lmms-lab/TextCaps"


def tokenize(captions, max_len: int = 128) -> torch.Tensor:
    """(N, max_len) int64 character ids: 1..48 for the alphabet, 49 unknown, 0 padding."""
    out = torch.zeros(len(captions), max_len, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [_CHAR_IDS.get(ch, UNK_ID) for ch in str(caption).lower()[:max_len]]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids)
    return out


# ----------------------------------------------------------------------------- records
def _caption(record: dict) -> str | None:
    caption = record.get("caption_str")
    if isinstance(caption, list):
        caption = caption[0] if caption else None
    if not caption:
        refs = record.get("reference_strs") or []
        caption = refs[0] if refs else None
    return caption


def parse_records(records, source: str) -> list[dict]:
    """One item per image (first caption in order): image_id, class (first image_classes entry),
    caption and the record's image reference."""
    items, seen = [], set()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{source}: data[{i}] is not an object; expected TextCaps records")
        image_id = record.get("image_id", f"#{i}")
        classes = record.get("image_classes")
        if not isinstance(classes, list) or not classes:
            raise DataError(f"{source}: record data[{i}] (image_id {image_id!r}) has no 'image_classes' list; the "
                            f"label is its first entry. Use the official TextCaps_0.1 annotations from {TEXTCAPS_ORIGIN}")
        if image_id in seen:
            continue
        caption = _caption(record)
        if caption is None:
            raise DataError(f"{source}: record data[{i}] (image_id {image_id!r}) has neither 'caption_str' nor "
                            "'reference_strs'")
        seen.add(image_id)
        items.append({"image_id": image_id, "label": str(classes[0]), "caption": caption,
                      "image_path": record.get("image_path"), "image_name": record.get("image_name"), "ref": i})
    return items


def _read_json(path: Path) -> list:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); download it again from {TEXTCAPS_ORIGIN}") from error
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"{path} has no 'data' list (found {keys}); expected the official TextCaps_0.1 format "
                        f"{{'data': [records with image_classes, caption_str, image_path]}} from {TEXTCAPS_ORIGIN}")
    return content["data"]


def _local_items(config) -> tuple[dict[str, list[dict]], Path, dict]:
    root = data_root(config)
    items, json_dir = {}, None
    for split in ("train", "val"):
        name = f"TextCaps_0.1_{split}.json"
        path = find_file(root, [name], TEXTCAPS_DIRS)
        if path is None:
            extra = "" if not config.download else " (TextCaps has no automatic download in tdro)"
            raise DataFileError(
                f"TextCaps annotations not found: expected {root / name} (or {root / 'annotations' / name}). Get "
                f"{name} from {TEXTCAPS_ORIGIN} and place it in {root} (data_root){extra}, or use "
                "textcaps_source: huggingface with the optional datasets package")
        items[split] = parse_records(_read_json(path), str(path))
        json_dir = json_dir or path.parent
    if config.textcaps_image_dir is not None:
        image_dir = Path(config.textcaps_image_dir).expanduser()
    else:
        image_dir = root / "images" if (root / "images").is_dir() else json_dir
    return items, image_dir, {"annotations": str(json_dir), "image_dir": str(image_dir)}


def _resolve_image(item: dict, image_dir: Path) -> Path | None:
    candidates = []
    if item["image_path"]:
        candidates.append(image_dir / item["image_path"])
    stem = item["image_name"] or (Path(item["image_path"]).stem if item["image_path"] else item["image_id"])
    candidates.append(image_dir / "train_images" / f"{stem}.jpg")
    return next((c for c in candidates if c.is_file()), None)


def _hf_items(config):
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            "textcaps_source: huggingface needs the optional package 'datasets' (pip install datasets) and network "
            f"access (or its local cache) for {HF_DATASET}; or use textcaps_source: local with the official files "
            f"from {TEXTCAPS_ORIGIN}") from error
    try:
        hub = datasets.load_dataset(HF_DATASET)
    except Exception as error:  # offline: ConnectionError / OSError / HF-specific errors
        raise DataFileError(
            f"could not load {HF_DATASET} through datasets ({type(error).__name__}: {error}); if this machine is "
            f"offline, download the official files from {TEXTCAPS_ORIGIN}, place them under data_root and use "
            "textcaps_source: local") from error
    items, sources = {}, {}
    for split in ("train", "val"):
        if split not in hub:
            raise DataError(f"{HF_DATASET} has no {split!r} split (found {list(hub)})")
        table = hub[split]
        columns = [c for c in ("image_id", "image_classes", "caption_str", "reference_strs") if c in table.column_names]
        meta = table.select_columns(columns).to_list()  # metadata only: no image is decoded here
        parsed = parse_records(meta, f"{HF_DATASET}[{split}]")
        for item in parsed:
            item["hf"] = (split, item["ref"])
        items[split] = parsed
        sources[split] = table
    return items, sources


# ----------------------------------------------------------------------------- classes and groups
def _classes(config, train_items: list[dict]) -> list[str]:
    counts = Counter(item["label"] for item in train_items)
    available = ", ".join(f"{c} ({n})" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:30])
    if config.textcaps_class_names is not None:
        names = [str(c) for c in config.textcaps_class_names]
        if not names:
            raise DataError("textcaps_class_names is empty; list at least two classes or use null")
        if len(set(names)) != len(names):
            raise DataError(f"textcaps_class_names repeats a class: {names}")
        absent = [c for c in names if counts[c] == 0]
        if absent:
            raise DataError(f"textcaps_class_names: {absent} have no images in the train split, which would leave "
                            f"their classes empty; the most frequent train classes are: {available}")
        return names
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    return ranked if config.textcaps_num_classes is None else ranked[: config.textcaps_num_classes]


def _group_list(config) -> list[str]:
    names = [str(g) for g in config.textcaps_groups]
    if config.include_combined_group and "combined" not in names:
        names.append("combined")
    unknown = [g for g in names if g not in GROUP_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise DataError(f"textcaps_groups {names} must list distinct groups among {', '.join(GROUP_NAMES)}")
    return names


def _spurious_majority(config, group_names: list[str], class_names: list[str]) -> np.ndarray:
    """Majority group index of every class."""
    num_groups, num_classes = len(group_names), len(class_names)
    mapping = config.spurious_group_classes
    if mapping is None:
        return np.array([c * num_groups // num_classes for c in range(num_classes)])
    if isinstance(mapping, list):
        if len(mapping) != num_groups:
            raise DataError(f"spurious_group_classes has {len(mapping)} entries but there are {num_groups} groups "
                            f"({', '.join(group_names)})")
        mapping = dict(zip(group_names, mapping))
    majority = np.full(num_classes, -1)
    for group, classes in mapping.items():
        g = group if isinstance(group, int) else (group_names.index(str(group)) if str(group) in group_names else None)
        if g is None or not 0 <= g < num_groups:
            raise DataError(f"spurious_group_classes: unknown group {group!r}; groups are {group_names}")
        for c in classes:
            ci = c if isinstance(c, int) else (class_names.index(str(c)) if str(c) in class_names else None)
            if ci is None or not 0 <= ci < num_classes:
                raise DataError(f"spurious_group_classes: unknown class {c!r}; classes are {class_names}")
            if majority[ci] != -1:
                raise DataError(f"spurious_group_classes: class {class_names[ci]!r} is listed for two groups")
            majority[ci] = g
    if (majority == -1).any():
        missing = [class_names[c] for c in np.flatnonzero(majority == -1)]
        raise DataError(f"spurious_group_classes leaves classes {missing} without a majority group")
    return majority


def build_textcaps(config) -> GroupedDataset:
    group_names = _group_list(config)
    needs_images = "visual" in group_names or "combined" in group_names
    transform = ImageTransform(config.image_size)
    info: dict = {"source": config.textcaps_source}
    if config.textcaps_source == "local":
        items, image_dir, where = _local_items(config)
        info.update(where)
    else:
        items, hf_tables = _hf_items(config)

    class_names = _classes(config, items["train"])
    class_index = {c: i for i, c in enumerate(class_names)}
    kept = {}
    for split, split_items in items.items():
        inside = [it for it in split_items if it["label"] in class_index]
        info[f"{split}_outside_classes"] = len(split_items) - len(inside)
        kept[split] = inside

    if needs_images and config.textcaps_source == "local":
        missing = []
        for split in kept:
            present = []
            for it in kept[split]:
                path = _resolve_image(it, image_dir)
                if path is None:
                    missing.append(str(image_dir / (it["image_path"] or it["image_id"])))
                else:
                    it["path"] = path
                    present.append(it)
            kept[split] = present
        info["missing_images"] = missing
        if missing:
            warnings.warn(f"{len(missing)} TextCaps images are missing under {image_dir} and their items are left "
                          f"out (first: {', '.join(missing[:3])}); see dataset.info['missing_images']", stacklevel=2)
        if not any(kept.values()):
            raise DataFileError(f"none of the TextCaps images were found under {image_dir} (e.g. {missing[0]}); "
                                f"place the images there (from {TEXTCAPS_ORIGIN}) or set textcaps_image_dir")

    # pool: official train images, then official val images; index = position in this pool
    pool = kept["train"] + kept["val"]
    labels = np.array([class_index[it["label"]] for it in pool], dtype=np.int64)
    n_train = len(kept["train"])
    rng = split_rng(config.data_split_seed, "textcaps")
    train, val = stratified_holdout(labels, config.val_frac, rng, np.arange(n_train))
    test = np.arange(n_train, len(pool))

    text_x = tokenize([it["caption"] for it in pool], config.text_max_len)
    text_info = {"vocab_size": VOCAB_SIZE, "max_len": config.text_max_len}
    visual_x = visual_info = None
    if needs_images:
        if config.textcaps_source == "local":
            store = ImageFileStore([it["path"] for it in pool], transform)
            if config.feature_cache or not config.image_cache:  # building the image cache checks them itself
                store.check_headers()  # before any run directory exists, not in epoch 1
        else:
            store = CallableImageStore(
                [it["hf"] for it in pool], lambda key: hf_tables[key[0]][int(key[1])]["image"], transform,
                describe=lambda key: f"{HF_DATASET}[{key[0]}] row {key[1]}",
                identity_prefix=f"hf:{HF_DATASET}:" + ",".join(
                    getattr(hf_tables[s], "_fingerprint", "?") for s in ("train", "val")))
        if config.feature_cache:
            from tdro.data.cache import FEATURE_DIM, cached_features

            visual_x, path, hit = cached_features(store, config.feature_backbone_weights, config.feature_cache_dir,
                                                  prefix="textcaps")
            info["feature_cache"] = {"file": str(path), "hit": hit}
            visual_info = {"feature_dim": FEATURE_DIM}
        elif config.image_cache:
            from tdro.data.image_cache import cached_images, training_size

            if not isinstance(store, ImageFileStore):
                raise DataError("image_cache: true needs textcaps_source: local (image files to key the cache by); "
                                f"textcaps_source is {config.textcaps_source!r}: use image_cache: false")
            size = config.image_cache_size or training_size(config.image_size, config.augment)
            visual_x, path, hit = cached_images(store, size, config.feature_cache_dir, prefix="textcaps")
            info["image_cache"] = {"file": str(path), "hit": hit, "size": size}
            visual_info = {"in_channels": 3, "image_size": config.image_size}
        else:
            visual_x = store
            visual_info = {"in_channels": 3, "image_size": config.image_size}

    specs = {
        "visual": ("features", "features", visual_x, visual_info) if config.feature_cache else
                  ("image", "resnet_visual", visual_x, visual_info),
        "text": ("text", "mlp_text", text_x, text_info),
    }
    if "combined" in group_names:
        specs["combined"] = ("multimodal", "fusion", PairStore(visual_x, text_x), {**visual_info, **text_info})

    per_group_train = {g: train for g in group_names}
    if config.spurious_correlation:
        if len(group_names) < 2:
            raise DataError("spurious_correlation needs at least two groups; add one to textcaps_groups")
        majority = _spurious_majority(config, group_names, class_names)
        assign_rng = split_rng(config.data_split_seed, "textcaps-spurious")
        home = majority[labels[train]]
        other = (home + 1 + assign_rng.integers(0, len(group_names) - 1, size=len(train))) % len(group_names)
        stay = assign_rng.random(len(train)) < config.spurious_majority_frac
        assigned = np.where(stay, home, other)
        per_group_train = {g: train[assigned == i] for i, g in enumerate(group_names)}

    groups = {}
    for g in group_names:
        kind, encoder, x, input_info = specs[g]
        splits = []
        for split_name, positions in (("train", per_group_train[g]), ("val", val), ("test", test)):
            if len(positions) == 0:
                raise DataError(f"textcaps group {g!r} has no {split_name} samples with classes {class_names} "
                                "(textcaps_num_classes / textcaps_class_names, val_frac, spurious settings); choose "
                                "classes with more images or add data")
            pos = torch.from_numpy(positions)
            x_split = x[pos] if isinstance(x, torch.Tensor) else x.subset(pos)
            splits.append(Split(x_split, torch.from_numpy(labels[positions]), pos))
        groups[g] = Group(g, kind, encoder, dict(input_info), {}, *splits)
    info["image_ids"] = [it["image_id"] for it in pool]
    info["tokenizer"] = {"alphabet": ALPHABET, "pad": PAD_ID, "unknown": UNK_ID, "vocab_size": VOCAB_SIZE}
    return GroupedDataset("textcaps", groups, class_names, info)
