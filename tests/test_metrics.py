"""MetricAccumulator against scikit-learn and numpy on random predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from tdro.training.metrics import MetricAccumulator

GROUPS = ["mnist", "usps", "svhn", "empty"]  # "empty" never receives a sample
CLASSES = ["zero", "one", "two", "three", "four"]


def random_predictions(seed: int, predict_unseen_class: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and group ids where class 3 is absent from usps and class 4 from every label."""
    rng = np.random.default_rng(seed)
    n = 600
    groups = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    labels = rng.integers(0, 4, size=n)
    labels[(groups == 1) & (labels == 3)] = 2
    logits = rng.normal(size=(n, len(CLASSES))).astype(np.float32)
    logits[np.arange(n), labels] += 0.8  # better than chance, still many errors
    if not predict_unseen_class:
        logits[:, 4] = -10.0
    return logits, labels, groups


def accumulate(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, **update) -> dict:
    """Feed the samples in uneven batches: mixed-group tensors and whole-group integer batches."""
    acc = MetricAccumulator(GROUPS, CLASSES, "cpu")
    x, y, g = torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(groups)
    half = len(y) // 2
    for start in range(0, half, 77):  # mixed groups, group index given per row
        rows = slice(start, min(start + 77, half))
        loss = update["loss"][rows] if "loss" in update else None
        acc.update(g[rows], x[rows], y[rows], loss)
    for group in range(3):  # the rest one group at a time, group index given as an int
        rows = torch.nonzero(g[half:] == group).squeeze(1) + half
        for chunk in rows.split(50):
            loss = update["loss"][chunk] if "loss" in update else None
            acc.update(group, x[chunk], y[chunk], loss)
    return acc.compute()


def per_sample_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy by hand with scipy's logsumexp."""
    logits = logits.astype(np.float64)
    return logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]


@pytest.mark.parametrize("predict_unseen_class", [False, True])
def test_metrics_match_sklearn(predict_unseen_class: bool) -> None:
    logits, labels, groups = random_predictions(0, predict_unseen_class)
    predictions = logits.argmax(1)
    m = accumulate(logits, labels, groups)
    json.dumps(m, allow_nan=False)  # plain Python values only

    assert m["acc"] == pytest.approx(accuracy_score(labels, predictions))
    group_acc = [accuracy_score(labels[groups == i], predictions[groups == i]) for i in range(3)]
    assert [m["group_acc"][g] for g in GROUPS[:3]] == pytest.approx(group_acc)
    assert m["group_acc"]["empty"] is None and m["group_loss"]["empty"] is None
    assert m["group_size"] == {g: int((groups == i).sum()) for i, g in enumerate(GROUPS)}
    assert m["balanced_acc"] == pytest.approx(np.mean(group_acc))
    assert m["worst_group_acc"] == pytest.approx(min(group_acc))
    assert m["worst_group"] == GROUPS[int(np.argmin(group_acc))]

    ce = per_sample_ce(logits, labels)
    assert m["loss"] == pytest.approx(ce.mean(), rel=1e-5)
    group_loss = [ce[groups == i].mean() for i in range(3)]
    assert [m["group_loss"][g] for g in GROUPS[:3]] == pytest.approx(group_loss, rel=1e-5)
    assert m["worst_group_loss"] == pytest.approx(max(group_loss), rel=1e-5)

    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((precision, recall, f1))

    labels_all = list(range(len(CLASSES)))
    pooled = confusion_matrix(labels, predictions, labels=labels_all)
    assert m["confusion"] == pooled.tolist()
    assert m["class_acc"] == {
        c: (None if pooled[i].sum() == 0 else pytest.approx(pooled[i, i] / pooled[i].sum()))
        for i, c in enumerate(CLASSES)
    }
    assert m["class_acc"]["four"] is None
    for i, g in enumerate(GROUPS):
        mask = groups == i
        reference = confusion_matrix(labels[mask], predictions[mask], labels=labels_all) if mask.any() \
            else np.zeros((5, 5), dtype=int)
        assert m["group_confusion"][g] == reference.tolist()
        for k, c in enumerate(CLASSES):
            in_class = mask & (labels == k)
            expected = (pytest.approx(accuracy_score(labels[in_class], predictions[in_class]))
                        if in_class.any() else None)
            assert m["group_class_acc"][g][c] == expected
    assert m["group_class_acc"]["usps"]["three"] is None
    assert all(v is None for v in m["group_class_acc"]["empty"].values())


def test_given_per_sample_loss_is_averaged_per_group() -> None:
    logits, labels, groups = random_predictions(1, True)
    loss = torch.from_numpy(np.random.default_rng(2).exponential(size=len(labels)).astype(np.float32))
    m = accumulate(logits, labels, groups, loss=loss)
    reference = loss.double().numpy()
    assert m["loss"] == pytest.approx(reference.mean(), rel=1e-6)
    for i, g in enumerate(GROUPS[:3]):
        assert m["group_loss"][g] == pytest.approx(reference[groups == i].mean(), rel=1e-6)


def test_no_samples_at_all_reports_none() -> None:
    m = MetricAccumulator(GROUPS, CLASSES, "cpu").compute()
    for key in ("loss", "acc", "balanced_acc", "worst_group_acc", "worst_group", "worst_group_loss",
                "macro_precision", "macro_recall", "macro_f1"):
        assert m[key] is None, key
    assert m["confusion"] == [[0] * 5 for _ in range(5)]
    json.dumps(m, allow_nan=False)


def test_update_does_not_track_gradients() -> None:
    acc = MetricAccumulator(GROUPS, CLASSES, "cpu")
    logits = torch.randn(8, 5, requires_grad=True)
    acc.update(0, logits, torch.arange(8) % 5)
    assert not acc.loss_sums.requires_grad and acc.compute()["group_size"]["mnist"] == 8


# --- evaluate / collect_latents / forward_only on the real digits data and model ---

@pytest.fixture(scope="module")
def digits_and_model():
    """The embedded digits dataset (four views) and an untrained MultiGroupModel built for it."""
    from types import SimpleNamespace

    from tdro.data.digits import build_digits
    from tdro.models.multigroup import build_model

    data_config = SimpleNamespace(
        digits_groups=["image", "coarse", "masked", "flat"], digits_sizes=[200, 120, 80, 40],
        digits_majority=[[0, 1], [2, 3], [4, 5], [6, 7]], majority_frac=0.8,
        data_split_seed=0, test_frac=0.2, val_frac=0.15,
    )
    dataset = build_digits(data_config)
    torch.manual_seed(0)
    model_config = SimpleNamespace(groups=None, common_encoder=False, latent_dim=8, head_hidden=16,
                                   head_dropout=0.3, anchor_eps=1e-4, anchor_covariance="full",
                                   anchor_targets="learned")
    return dataset, build_model(model_config, dataset)


def reference_outputs(model, dataset, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Latents, logits, labels and group ids from one whole-split forward per group, outside evaluate."""
    model.eval()
    latents, logits, labels, groups = [], [], [], []
    with torch.no_grad():
        for i, (name, group) in enumerate(dataset.groups.items()):
            part = getattr(group, split)
            z = model.encoders[name](part.x)
            latents.append(z.numpy())
            logits.append(model.head(z).numpy())
            labels.append(part.y.numpy())
            groups.append(np.full(len(part.y), i))
    model.train()
    return tuple(np.concatenate(a) for a in (latents, logits, labels, groups))


def test_evaluate_matches_a_whole_split_reference(digits_and_model) -> None:
    from tdro.training.evaluation import evaluate, forward_only

    dataset, model = digits_and_model
    model.train()
    m = evaluate(model, dataset, "test", "cpu", batch_size=37)
    assert model.training  # the caller's mode is restored
    _, logits, labels, groups = reference_outputs(model, dataset, "test")
    predictions = logits.argmax(1)
    names = list(dataset.groups)
    assert m["acc"] == pytest.approx(accuracy_score(labels, predictions))
    assert [m["group_acc"][g] for g in names] == pytest.approx(
        [accuracy_score(labels[groups == i], predictions[groups == i]) for i in range(len(names))])
    ce = per_sample_ce(logits, labels)
    assert [m["group_loss"][g] for g in names] == pytest.approx([ce[groups == i].mean() for i in range(len(names))],
                                                                rel=1e-4)
    assert m["confusion"] == confusion_matrix(labels, predictions, labels=list(range(10))).tolist()
    assert m["group_size"] == {g: len(dataset.groups[g].test.y) for g in names}
    assert evaluate(model, dataset, "test", "cpu", batch_size=1000)["group_confusion"] == m["group_confusion"]
    assert forward_only(model, dataset, "test", "cpu", batch_size=37) == len(labels)
    with pytest.raises(ValueError, match="unknown split"):
        evaluate(model, dataset, "valid", "cpu", batch_size=8)


def test_collect_latents(digits_and_model) -> None:
    from tdro.training.evaluation import collect_latents

    dataset, model = digits_and_model
    latents, _, labels, groups = reference_outputs(model, dataset, "val")
    out = collect_latents(model, dataset, "val", "cpu", batch_size=16)
    np.testing.assert_allclose(out["latents"], latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["group"], groups)
    assert out["group_names"] == list(dataset.groups) and out["latents"].dtype == np.float32

    capped = collect_latents(model, dataset, "val", "cpu", batch_size=16, max_per_group=5)
    sizes = np.bincount(capped["group"], minlength=len(dataset.groups))
    assert sizes.tolist() == [min(5, len(g.val.y)) for g in dataset.groups.values()]
    first = dataset.groups["image"].val
    positions = np.arange(5) * len(first.y) // 5
    np.testing.assert_array_equal(capped["labels"][:5], first.y.numpy()[positions])
    np.testing.assert_allclose(capped["latents"][:5], latents[:len(first.y)][positions], rtol=1e-5, atol=1e-6)


def test_evaluate_empty_group_and_bf16_autocast(digits_and_model) -> None:
    from dataclasses import replace

    from tdro.data.base import Split
    from tdro.training.evaluation import evaluate

    dataset, model = digits_and_model
    masked = dataset.groups["masked"]
    empty = Split(masked.test.x[:0], masked.test.y[:0])
    thinned = replace(dataset, groups={**dataset.groups, "masked": replace(masked, test=empty)})
    m = evaluate(model, thinned, "test", "cpu", batch_size=64)
    full = evaluate(model, dataset, "test", "cpu", batch_size=64)
    assert m["group_size"]["masked"] == 0 and m["group_acc"]["masked"] is None
    assert all(v is None for v in m["group_class_acc"]["masked"].values())
    for g in ("image", "coarse", "flat"):
        assert m["group_acc"][g] == full["group_acc"][g]
    assert m["balanced_acc"] == pytest.approx(np.mean([full["group_acc"][g] for g in ("image", "coarse", "flat")]))

    bf16 = evaluate(model, dataset, "test", "cpu", batch_size=64, autocast_dtype=torch.bfloat16)
    assert bf16["group_size"] == full["group_size"]
    assert bf16["loss"] == pytest.approx(full["loss"], rel=0.05)
