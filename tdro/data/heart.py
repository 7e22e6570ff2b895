"""heart: UCI Heart Disease, one group per hospital (cleveland, hungarian, switzerland, va).

Files: the UCI ``processed.{cleveland,hungarian,switzerland,va}.data`` (14 comma-separated
fields, ``?`` = missing) in ``data_root`` or its ``uci_heart_disease/`` sub-folder; with
``download: true`` missing files are fetched from the UCI archive into
``<data_root>/uci_heart_disease``. Label: ``num > 0``. ``num`` must be one of 0..4: a row whose label is
``?`` (unknown; the official files have none) is an error naming the file and its lines, never a
guess. A site needs at least ``MIN_SITE_ROWS`` (20) usable rows to be split into train / val / test.

Preprocessing (reference-method.md §1.3), every statistic from the site's **training rows only**:

1. drop slope, ca, thal; ``?`` -> missing;
2. split each site: stratified K-fold (``n_folds``, test = fold ``fold_index``) or, with
   ``n_folds: null``, a stratified ``test_frac`` hold-out; then ``val_frac`` of the remaining rows
   for validation; then the optional training cap (``group_max_train_samples``), all from
   ``data_split_seed``;
3. missing values: ``impute_missing: true`` fills them with the site's training median (numeric
   columns) or most frequent value (sex, cp, fbs, restecg, exang), falling back to the pooled
   training rows of all sites when a site has no observed value; ``false`` drops incomplete rows
   (which leaves Switzerland 46 rows with a single negative);
4. one-hot cp (1..4) and restecg (0..2) with the first level dropped -> 13 features:
   0 age, 1 sex, 2 trestbps, 3 chol, 4 fbs, 5 thalach, 6 exang, 7 oldpeak, 8-10 cp=2..4,
   11-12 restecg=1..2 (``chol = 0``, which the source uses for "not measured" in Switzerland
   and some VA rows, is kept as a value, as in the reference);
5. per-site standardisation with the training mean and std (+1e-9).

Feature masks (``feature_mask``): ``hetagg`` (the reference paper's masks: each hospital's
encoder reads only its own columns), ``all`` (homogeneous: 13 columns each) or an explicit list
of four index lists (null = all 13). Each group's input is its own columns only; with the model
key ``common_encoder: true`` every group instead gets the 13-column vector with the columns
outside its mask set to zero (the zero-filled union), so one shared encoder can read them all.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tdro.data.base import DataError, Group, GroupedDataset, Split
from tdro.data.files import data_root, download_url, find_file, missing_files_error
from tdro.data.splits import check_caps, resolve_per_group, split_rng, stratified_cap, stratified_holdout

SITES = ("cleveland", "hungarian", "switzerland", "va")
HEART_DIRS = ("uci_heart_disease", "heart_disease", "heart")
UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/processed.{site}.data"
UCI_PAGE = "https://archive.ics.uci.edu/dataset/45/heart+disease"
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num")
KEPT = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak")
CATEGORICAL = ("sex", "cp", "fbs", "restecg", "exang")
FEATURES = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
            "cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2")
HETAGG_MASKS = {
    "cleveland": [0, 1, 2, 3, 5, 6, 7, 8, 9, 10],
    "hungarian": [0, 1, 2, 3, 5, 6, 11, 12],
    "switzerland": [0, 1, 2, 4, 5, 7, 11, 12],
    "va": [0, 1, 2, 4, 5, 6, 8, 9, 10],
}
ENCODER_OPTIONS = {"hidden_dim": 64, "dropout": 0.1}
NUM_VALUES = (0, 1, 2, 3, 4)
MIN_SITE_ROWS = 20  # fewer rows cannot make train / val / test splits worth a number


def read_heart_file(path: str | Path) -> np.ndarray:
    """(rows, 14) floats with NaN for ``?``; a row with another field count, or a ``num`` label that is ``?`` or
    not 0..4, is an error naming the line."""
    path = Path(path)
    rows, line_numbers = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise DataError(
                f"{path}, line {number}: {len(fields)} comma-separated fields, expected {len(COLUMNS)} "
                f"({', '.join(COLUMNS)}); use the original UCI processed.*.data files from {UCI_PAGE} "
                "(some copies add a header line or drop columns)")
        values = []
        for name, text in zip(COLUMNS, fields):
            if text == "?":
                values.append(math.nan)
                continue
            try:
                values.append(float(text))
            except ValueError:
                raise DataError(f"{path}, line {number}: field {name}={text!r} is not a number or '?'; use the "
                                f"original UCI file from {UCI_PAGE}") from None
        rows.append(values)
        line_numbers.append(number)
    if not rows:
        raise DataError(f"{path} holds no rows; use the original UCI file from {UCI_PAGE}")
    data = np.asarray(rows, dtype=np.float64)
    for name, allowed in (("cp", (1, 2, 3, 4)), ("restecg", (0, 1, 2))):
        column = data[:, COLUMNS.index(name)]
        bad = ~np.isnan(column) & ~np.isin(column, allowed)
        if bad.any():
            line = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(f"{path}, row {line}: {name}={column[bad][0]} is not one of {allowed}")
    num = data[:, COLUMNS.index("num")]
    for bad, what in ((np.isnan(num), "have no label (num is '?', unknown)"),
                      (~np.isnan(num) & ~np.isin(num, NUM_VALUES), f"have a label num outside {NUM_VALUES}")):
        if bad.any():
            lines = [line_numbers[i] for i in np.flatnonzero(bad)]
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            raise DataError(f"{path}: {len(lines)} row(s) {what}, at line(s) {shown}; a row without a valid label "
                            "cannot be trained or scored: remove those lines or use the original UCI file from "
                            f"{UCI_PAGE}")
    return data


def _site_file(root: Path, site: str, download: bool) -> Path:
    name = f"processed.{site}.data"
    path = find_file(root, [name], HEART_DIRS)
    if path is None and download:
        path = root / HEART_DIRS[0] / name
        download_url(UCI_URL.format(site=site), path, f"the UCI heart file {name}")
    if path is None:
        raise missing_files_error(f"UCI heart disease file {name}", [root / name, root / HEART_DIRS[0] / name],
                                  f"{UCI_PAGE} (direct: {UCI_URL.format(site=site)})")
    return path


def _masks(config) -> list[list[int]]:
    value = config.feature_mask
    if isinstance(value, str):
        if value == "hetagg":
            return [list(HETAGG_MASKS[s]) for s in SITES]
        if value == "all":
            return [list(range(len(FEATURES))) for _ in SITES]
        raise DataError(f"feature_mask {value!r} is not one of hetagg, all, or a list of four index lists")
    masks = resolve_per_group(value, SITES, "feature_mask")
    resolved = []
    for site, mask in zip(SITES, masks):
        if mask is None:
            resolved.append(list(range(len(FEATURES))))
            continue
        if not isinstance(mask, (list, tuple)) or not mask or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(FEATURES) for i in mask):
            raise DataError(f"feature_mask for {site!r} must be a non-empty list of feature indices 0..12 "
                            f"({', '.join(f'{i} {n}' for i, n in enumerate(FEATURES))}), got {mask!r}")
        if len(set(mask)) != len(mask):
            raise DataError(f"feature_mask for {site!r} repeats an index: {mask!r}")
        resolved.append(sorted(mask))
    return resolved


def _split_rows(labels: np.ndarray, config, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = split_rng(config.data_split_seed, "heart", site)
    if config.n_folds is None:
        rest, test = stratified_holdout(labels, config.test_frac, rng)
    else:
        if not 0 <= config.fold_index < config.n_folds:
            raise DataError(f"fold_index {config.fold_index} is outside 0..{config.n_folds - 1} (n_folds={config.n_folds})")
        fold = np.empty(len(labels), dtype=np.int64)
        for c in np.unique(labels):  # stratified: deal each class round-robin over the folds
            members = np.flatnonzero(labels == c)
            members = members[rng.permutation(len(members))]
            fold[members] = (np.arange(len(members)) + rng.integers(config.n_folds)) % config.n_folds
        test = np.flatnonzero(fold == config.fold_index)
        rest = np.flatnonzero(fold != config.fold_index)
    train, val = stratified_holdout(labels, config.val_frac, rng, rest)
    return train, val, test


def _fill_values(raw: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per-column fill value from training rows: median (numeric) or most frequent (categorical)."""
    fills = np.full(raw.shape[1], np.nan)
    for j, name in enumerate(KEPT):
        column = raw[train, j]
        column = column[~np.isnan(column)]
        if len(column) == 0:
            continue
        if name in CATEGORICAL:
            values, counts = np.unique(column, return_counts=True)
            fills[j] = values[np.argmax(counts)]
        else:
            fills[j] = np.median(column)
    return fills


def _encode(raw: np.ndarray) -> np.ndarray:
    """The 13 features of rows of the 10 kept raw columns (no missing values left)."""
    col = {name: raw[:, j] for j, name in enumerate(KEPT)}
    numeric = [col[n] for n in ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")]
    one_hot = [(col["cp"] == v).astype(np.float64) for v in (2, 3, 4)]
    one_hot += [(col["restecg"] == v).astype(np.float64) for v in (1, 2)]
    return np.stack(numeric + one_hot, axis=1)


def build_heart(config) -> GroupedDataset:
    root = data_root(config)
    masks = _masks(config)
    caps = check_caps(resolve_per_group(config.group_max_train_samples, SITES, "group_max_train_samples"), SITES)
    sites = {}
    for site, cap in zip(SITES, caps):
        path = _site_file(root, site, config.download)
        data = read_heart_file(path)
        raw = data[:, [COLUMNS.index(n) for n in KEPT]]
        labels = (data[:, COLUMNS.index("num")] > 0).astype(np.int64)
        rows = np.arange(len(data))
        if not config.impute_missing:
            complete = ~np.isnan(raw).any(axis=1)
            raw, labels, rows = raw[complete], labels[complete], rows[complete]
        if len(labels) < MIN_SITE_ROWS:
            dropped = "" if config.impute_missing else f" left after dropping {len(data) - len(labels)} incomplete ones " \
                                                       "(impute_missing: false)"
            raise DataError(f"heart site {site!r} has {len(labels)} rows{dropped} in {path}, but a site needs at least "
                            f"{MIN_SITE_ROWS} to be split into train / val / test; use the full UCI file from {UCI_PAGE}"
                            + ("" if config.impute_missing else " or impute_missing: true"))
        train, val, test = _split_rows(labels, config, site)
        if cap is not None:
            train = stratified_cap(train, labels, cap, split_rng(config.data_split_seed, "heart-cap", site))
        sites[site] = dict(path=path, raw=raw, labels=labels, rows=rows, parts=(train, val, test))

    if config.impute_missing:
        pooled = np.concatenate([s["raw"][s["parts"][0]] for s in sites.values()])
        pooled_fill = _fill_values(pooled, np.arange(len(pooled)))
        for s in sites.values():
            fills = _fill_values(s["raw"], s["parts"][0])
            fills = np.where(np.isnan(fills), pooled_fill, fills)
            fills = np.where(np.isnan(fills), 0.0, fills)
            s["raw"] = np.where(np.isnan(s["raw"]), fills[None, :], s["raw"])

    common = bool(getattr(config, "common_encoder", False))
    groups = {}
    for (site, s), mask in zip(sites.items(), masks):
        features = _encode(s["raw"])
        train = s["parts"][0]
        mean = features[train].mean(axis=0)
        std = features[train].std(axis=0)
        features = (features - mean) / (std + 1e-9)
        if common:
            keep = np.zeros(len(FEATURES), dtype=bool)
            keep[mask] = True
            features = np.where(keep[None, :], features, 0.0)
        else:
            features = features[:, mask]
        features = torch.from_numpy(features.astype(np.float32))
        splits = [Split(features[p], torch.from_numpy(s["labels"][p]), torch.from_numpy(s["rows"][p]))
                  for p in s["parts"]]
        info = {"input_dim": int(features.shape[1])}
        groups[site] = Group(site, "tabular", "mlp_tabular", info, dict(ENCODER_OPTIONS), *splits)
    info = {
        "files": {site: str(s["path"]) for site, s in sites.items()},
        "features": list(FEATURES),
        "feature_mask": {site: [FEATURES[i] for i in mask] for site, mask in zip(SITES, masks)},
        "zero_filled_union": common,
    }
    return GroupedDataset("heart", groups, ["no disease", "disease"], info)
