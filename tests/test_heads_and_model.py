"""Heads, MultiGroupModel (forward, parameter groups, shared encoders), build_model and spec resolution."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import CNNEncoder, MLPTabularEncoder, create_encoder
from tdro.models.heads import create_head
from tdro.models.multigroup import MultiGroupModel, build_model, resolve_encoder_specs

K = 8
CLASSES = [str(c) for c in range(10)]


def test_linear_head_when_hidden_is_zero():
    head = create_head(K, 10)
    assert isinstance(head, nn.Linear) and head(torch.randn(3, K)).shape == (3, 10)


def test_mlp_head_with_hidden_units_and_dropout():
    head = create_head(K, 4, hidden=32, dropout=0.5)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].out_features == 32 and head[2].p == 0.5
    assert head(torch.randn(3, K)).shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"latent_dim": 0, "num_classes": 3}, "latent_dim must be a positive integer, got 0"),
        ({"latent_dim": K, "num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"latent_dim": K, "num_classes": 3, "hidden": -1}, "hidden must be a non-negative integer.*got -1"),
        ({"latent_dim": K, "num_classes": 3, "hidden": 4, "dropout": 1.0}, r"dropout .* got 1.0"),
    ],
)
def test_head_rejects_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_head(**kwargs)


def _group(name, encoder, input_info, options=None):
    return SimpleNamespace(name=name, kind="stand-in", encoder=encoder, input_info=input_info,
                           encoder_options=options or {})


def _dataset(*groups):
    """A stand-in for GroupedDataset: only what build_model reads."""
    return SimpleNamespace(name="tiny", groups={g.name: g for g in groups}, class_names=CLASSES)


def _config(groups=None, common_encoder=False, **overrides):
    values = dict(latent_dim=K, head_hidden=0, head_dropout=0.3, anchor_eps=1e-4, anchor_covariance="full", anchor_targets="learned",
                  groups=groups, common_encoder=common_encoder)
    return SimpleNamespace(**{**values, **overrides})


DIGITS_LIKE = _dataset(
    _group("image", "cnn", {"in_channels": 1, "image_size": 8}, {"pool_size": 4}),
    _group("tabular", "mlp_tabular", {"input_dim": 16}, {"hidden_dim": 32}),
)


def test_build_model_builds_each_group_encoder_head_and_anchors():
    model = build_model(_config(head_hidden=16, anchor_covariance="diagonal"), DIGITS_LIKE)
    assert model.group_names == ["image", "tabular"]
    assert isinstance(model.encoders["image"], CNNEncoder) and isinstance(model.encoders["tabular"], MLPTabularEncoder)
    assert model.encoders["tabular"].net[0].out_features == 32
    assert isinstance(model.head, nn.Sequential) and model.head[0].out_features == 16
    assert isinstance(model.anchors, GaussianAnchors) and model.anchors.means.shape == (10, K)
    assert model.anchors.diagonal


def test_forward_returns_latents_and_logits_per_group_in_input_order():
    model = build_model(_config(), DIGITS_LIKE)
    inputs = {"tabular": torch.randn(1, 16), "image": torch.randn(3, 1, 8, 8)}
    latents, logits = model(inputs)
    assert list(latents) == list(logits) == ["tabular", "image"]
    assert latents["image"].shape == (3, K) and logits["tabular"].shape == (1, 10)
    assert list(model.encode({"image": torch.randn(2, 1, 8, 8)})) == ["image"]
    with pytest.raises(ValueError, match=r"unknown group 'imag'; allowed: image, tabular"):
        model.encode({"imag": torch.randn(2, 1, 8, 8)})


def _assert_partition(model, backbone_params):
    groups = model.parameter_groups()
    all_ids = [id(p) for p in model.parameters()]
    grouped = [id(p) for p in groups["backbone"] + groups["new"]]
    assert sorted(grouped) == sorted(all_ids) and len(set(grouped)) == len(grouped)
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in backbone_params}
    assert model.parameter_count() == sum(p.numel() for p in groups["backbone"] + groups["new"])


def test_parameter_groups_put_pretrained_trunks_in_backbone_and_the_rest_in_new():
    visual = create_encoder("resnet_visual", K)
    model = MultiGroupModel({"visual": visual, "text": create_encoder("mlp_text", K, {"vocab_size": 45})},
                            create_head(K, 10), GaussianAnchors(10, K))
    _assert_partition(model, list(visual.backbone.parameters()))
    new_ids = {id(p) for p in model.parameter_groups()["new"]}
    assert {id(p) for p in [*model.head.parameters(), *model.anchors.parameters()]} <= new_ids


def test_common_encoder_is_one_instance_counted_once():
    dataset = _dataset(*[_group(f"site{i}", "mlp_tabular", {"input_dim": 6}) for i in range(3)])
    model = build_model(_config(common_encoder=True), dataset)
    shared = model.encoders["site0"]
    assert model.encoders["site1"] is shared and model.encoders["site2"] is shared
    _assert_partition(model, [])
    expected = sum(p.numel() for m in (shared, model.head, model.anchors) for p in m.parameters())
    assert model.parameter_count() == expected
    separate = build_model(_config(), dataset)
    assert separate.parameter_count() == expected + 2 * sum(p.numel() for p in shared.parameters())


def test_common_encoder_requires_equal_input_info_and_specs():
    with pytest.raises(ValueError, match="common_encoder needs every group to have the same input_info"):
        build_model(_config(common_encoder=True), DIGITS_LIKE)
    sites = _dataset(*[_group(f"site{i}", "mlp_tabular", {"input_dim": 6}) for i in range(2)])
    with pytest.raises(ValueError, match="different encoder specs"):
        build_model(_config([{"name": "site1", "dropout": 0.3}], common_encoder=True), sites)


def test_specs_default_to_the_dataset():
    assert resolve_encoder_specs(_config(), DIGITS_LIKE) == {
        "image": ("cnn", {"pool_size": 4}), "tabular": ("mlp_tabular", {"hidden_dim": 32})}


def test_specs_override_by_name_keeps_other_groups_and_merges_options():
    specs = resolve_encoder_specs(_config([{"name": "tabular", "dropout": 0.2, "norm": "batch"}]), DIGITS_LIKE)
    assert specs == {"image": ("cnn", {"pool_size": 4}),
                     "tabular": ("mlp_tabular", {"hidden_dim": 32, "dropout": 0.2, "norm": "batch"})}


def test_specs_override_by_position_and_a_new_encoder_drops_the_default_options():
    groups = [{"encoder": "cnn", "channels": [8, 16]}, {"encoder": "features", "hidden_dim": 12}]
    specs = resolve_encoder_specs(_config(groups), DIGITS_LIKE)
    assert specs == {"image": ("cnn", {"pool_size": 4, "channels": [8, 16]}),
                     "tabular": ("features", {"hidden_dim": 12})}


@pytest.mark.parametrize(
    "groups,match",
    [
        ([{"encoder": "cnn"}], r"groups has 1 entries without names, but the dataset has 2 groups \(image, tabular\)"),
        ([{"name": "images", "encoder": "cnn"}], r"unknown group 'images'; allowed: image, tabular"),
        ([{"name": "image", "pool_sise": 2}], r"unknown cnn encoder option 'pool_sise'.*did you mean 'pool_size'"),
        ([{"encoder": "cnn"}, {"encoder": "features", "pool_size": 2}], r"unknown features encoder option 'pool_size'"),
        ([{"name": "image", "encoder": "cnm"}], r"unknown encoder 'cnm'.*did you mean 'cnn'"),
        ([{"name": "image"}, {"encoder": "cnn"}], "either every entry has a 'name' or none"),
        ([{"name": "image"}, {"name": "image"}], "group 'image' appears more than once"),
        (["cnn", "mlp_tabular"], r"groups\[0\] must be a mapping"),
    ],
)
def test_specs_reject_bad_group_entries(groups, match):
    with pytest.raises(ValueError, match=match):
        resolve_encoder_specs(_config(groups), DIGITS_LIKE)


def test_empty_model_is_rejected():
    with pytest.raises(ValueError, match="encoders must map at least one group"):
        MultiGroupModel({}, create_head(K, 2), GaussianAnchors(2, K))


def test_visual_and_text_encoder_keys_switch_every_group_of_their_kind():
    image = SimpleNamespace(name="visual", kind="image", encoder="cnn", input_info={"in_channels": 3},
                            encoder_options={"pool_size": 4})
    text = SimpleNamespace(name="text", kind="text", encoder="mlp_text", input_info={"vocab_size": 50, "max_len": 16},
                           encoder_options={"hidden_dim": 32})
    dataset = _dataset(image, text)
    specs = resolve_encoder_specs(_config(visual_encoder="resnet_visual", text_encoder="char_cnn_text"), dataset)
    assert specs == {"visual": ("resnet_visual", {}), "text": ("char_cnn_text", {})}
    same = resolve_encoder_specs(_config(visual_encoder=None, text_encoder="mlp_text"), dataset)
    assert same["text"] == ("mlp_text", {"hidden_dim": 32})
    with pytest.raises(ValueError, match=r"key 'text_encoder' is 'char_cnn_text' but dataset 'tiny' has no text group"):
        resolve_encoder_specs(_config(text_encoder="char_cnn_text"), DIGITS_LIKE)
    with pytest.raises(ValueError, match=r"unknown encoder 'char_cnn'"):
        resolve_encoder_specs(_config(text_encoder="char_cnn"), dataset)
