"""Encoders: output shapes, backbone/new split, padding masks, options and errors, pretrained weights."""
import pytest
import torch
from torch import nn

from tdro.models.encoders import ENCODERS, RESNET18_FILE, create_encoder

K = 8
TEXT_INFO = {"vocab_size": 45, "max_len": 128}

# name, input_info, options, input shapes (dtype long = token ids)
CASES = [
    ("cnn", {"in_channels": 1, "image_size": 8}, {}, [(2, 1, 8, 8), (3, 1, 16, 16), (2, 1, 28, 28), (2, 1, 32, 32)]),
    ("cnn", {"in_channels": 3}, {"pool_size": 2, "channels": [8, 16, 16]}, [(2, 3, 8, 8), (2, 3, 20, 24)]),
    ("resnet_visual", {"in_channels": 3, "image_size": 32}, {}, [(2, 3, 32, 32), (2, 3, 40, 48)]),
    ("resnet_visual", {"in_channels": 1}, {"hidden_dim": 32}, [(2, 1, 32, 32)]),
    ("mlp_text", TEXT_INFO, {}, [(2, 128), (3, 20)]),
    ("char_cnn_text", TEXT_INFO, {}, [(2, 128), (3, 32)]),
    ("transformer_text", TEXT_INFO, {}, [(2, 128), (3, 20)]),
    ("mlp_tabular", {"input_dim": 13}, {}, [(4, 13), (1, 13)]),
    ("mlp_tabular", {"input_dim": 5}, {"norm": "batch", "hidden_dim": 16, "dropout": 0.0}, [(4, 5)]),
    ("features", {"feature_dim": 512}, {}, [(2, 512), (5, 512)]),
    ("features", {"feature_dim": 12}, {"hidden_dim": 7}, [(3, 12)]),
]


def _inputs(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("_text"):  # token ids; 0 is padding
        return torch.randint(0, TEXT_INFO["vocab_size"], shape)
    return torch.randn(shape)


@pytest.mark.parametrize("name,input_info,options,shapes", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_every_encoder_returns_batch_by_latent_dim(name, input_info, options, shapes):
    encoder = create_encoder(name, K, input_info, **options).train()
    for shape in shapes:
        z = encoder(_inputs(name, shape))
        assert z.shape == (shape[0], K)
        assert torch.isfinite(z).all()


def test_registry_holds_the_documented_encoders():
    assert ENCODERS.names() == sorted(
        ["cnn", "resnet_visual", "mlp_text", "char_cnn_text", "transformer_text", "mlp_tabular", "features",
         "fusion"]
    )


@pytest.mark.parametrize("name,input_info", [(c[0], c[1]) for c in CASES if c[0] != "resnet_visual"])
def test_encoders_without_pretrained_trunk_have_only_new_parameters(name, input_info):
    assert create_encoder(name, K, input_info).backbone is None


def test_resnet_trunk_is_the_backbone_and_the_projection_is_new():
    encoder = create_encoder("resnet_visual", K)
    backbone = {id(p) for p in encoder.backbone.parameters()}
    assert id(encoder.backbone.conv1.weight) in backbone
    assert isinstance(encoder.backbone.fc, nn.Identity)
    new = [n for n, p in encoder.named_parameters() if id(p) not in backbone]
    assert new and all(n.startswith("projection.") for n in new)
    assert sum(p.numel() for p in encoder.backbone.parameters()) == 11_176_512  # ResNet-18 without fc


def test_unknown_encoder_lists_names_and_suggests_closest():
    with pytest.raises(ValueError) as error:
        create_encoder("trasformer_text", K)
    message = str(error.value)
    assert "'trasformer_text'" in message and "did you mean 'transformer_text'" in message
    assert all(name in message for name in ENCODERS.names())


def test_unknown_option_errors_with_allowed_options():
    with pytest.raises(ValueError, match=r"pool_sise.*channels, in_channels, pool_size.*did you mean 'pool_size'"):
        create_encoder("cnn", K, pool_sise=3)


def test_missing_input_info_key_names_encoder_and_key():
    with pytest.raises(ValueError, match=r"'transformer_text' needs 'max_len'"):
        create_encoder("transformer_text", K, {"vocab_size": 45})


def test_input_info_keys_an_encoder_does_not_take_are_ignored_and_options_may_supply_them():
    create_encoder("cnn", K, {"in_channels": 1, "vocab_size": 45, "feature_dim": 3})
    assert create_encoder("mlp_tabular", K, input_dim=6)(torch.randn(2, 6)).shape == (2, K)
    with pytest.raises(ValueError, match=r"input_dim=6 conflicts.*input_dim=13"):
        create_encoder("mlp_tabular", K, {"input_dim": 13}, input_dim=6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_encoder("cnn", 0), r"latent_dim must be a positive integer, got 0"),
        (lambda: create_encoder("cnn", K, pool_size=0), r"pool_size .* got 0"),
        (lambda: create_encoder("cnn", K, channels=[]), r"channels .* got \[\]"),
        (lambda: create_encoder("mlp_tabular", K, {"input_dim": 3}, norm="group"),
         r"unknown norm 'group'; allowed: batch, layer"),
        (lambda: create_encoder("mlp_tabular", K, {"input_dim": 3}, dropout=1.5), r"dropout .* got 1.5"),
        (lambda: create_encoder("transformer_text", K, TEXT_INFO, num_heads=3), r"embed_dim \(64\).*num_heads \(3\)"),
        (lambda: create_encoder("resnet_visual", K, in_channels=2), r"in_channels .* got 2"),
        (lambda: create_encoder("resnet_visual", K, weights_path="w.pth"), r"weights_path='w.pth'.*pretrained"),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _padded(tokens: list[int], length: int) -> torch.Tensor:
    return torch.tensor(tokens + [0] * (length - len(tokens)))


@pytest.mark.parametrize("name", ["transformer_text", "mlp_text"])
def test_text_encoding_ignores_padding_amount_and_batch_companions(name):
    torch.manual_seed(0)
    encoder = create_encoder(name, K, TEXT_INFO).eval()
    sentence = [5, 9, 3, 17, 2]
    with torch.no_grad():
        alone = encoder(_padded(sentence, 6)[None])
        long_pad = encoder(_padded(sentence, 40)[None])
        other = torch.tensor([[7] * 40, [0] * 40])  # a full row and an all-padding row
        in_batch = encoder(torch.cat([other, _padded(sentence, 40)[None]]))
    torch.testing.assert_close(long_pad, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(in_batch[2:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(in_batch).all()


def test_transformer_all_padding_row_has_finite_output_and_gradients():
    encoder = create_encoder("transformer_text", K, TEXT_INFO).train()
    tokens = torch.tensor([[0] * 16, [4, 5, 6] + [0] * 13])
    z = encoder(tokens)
    z.sum().backward()
    assert torch.isfinite(z).all()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="sequence length 129 exceeds max_len 128"):
        encoder(torch.ones(1, 129, dtype=torch.long))


def test_mlp_tabular_layer_norm_trains_on_one_sample_with_xavier_init():
    encoder = create_encoder("mlp_tabular", K, {"input_dim": 13}).train()
    assert any(isinstance(m, nn.LayerNorm) for m in encoder.modules())
    encoder(torch.randn(1, 13)).sum().backward()
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all((m.bias == 0).all() for m in linears)
    batch_norm = create_encoder("mlp_tabular", K, {"input_dim": 13}, norm="batch")
    assert any(isinstance(m, nn.BatchNorm1d) for m in batch_norm.modules())


def _save_random_resnet18(path) -> dict[str, torch.Tensor]:
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def _assert_trunk_has(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = encoder.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_pretrained_resnet_missing_weights_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE
    for weights_path in [None, str(tmp_path / "absent.pth")]:
        with pytest.raises(FileNotFoundError) as error:
            create_encoder("resnet_visual", K, pretrained=True, weights_path=weights_path)
        message = str(error.value)
        assert str(cache) in message and repr(weights_path) in message and RESNET18_FILE in message
        assert "download.pytorch.org" in message and "never downloads" in message


def test_pretrained_resnet_loads_from_weights_path(tmp_path):
    state = _save_random_resnet18(tmp_path / "r18.pth")
    encoder = create_encoder("resnet_visual", K, pretrained=True, weights_path=str(tmp_path / "r18.pth"))
    _assert_trunk_has(encoder, state)
    assert encoder.eval()(torch.randn(1, 3, 32, 32)).shape == (1, K)


def test_pretrained_resnet_loads_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = _save_random_resnet18(tmp_path / "hub" / "checkpoints" / RESNET18_FILE)
    _assert_trunk_has(create_encoder("resnet_visual", K, pretrained=True), state)


def test_pretrained_resnet_rejects_a_file_that_is_not_resnet18(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not hold a torchvision ResNet-18 state_dict"):
        create_encoder("resnet_visual", K, pretrained=True, weights_path=str(tmp_path / "bad.pth"))


def test_fusion_encodes_an_image_caption_pair_with_the_visual_trunk_as_backbone():
    fusion = create_encoder("fusion", K, {"in_channels": 3, "image_size": 32, "vocab_size": 50, "max_len": 16})
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 16))
    assert fusion((images, tokens)).shape == (3, K)
    assert fusion.backbone is fusion.visual.backbone and fusion.backbone is not None
    cached = create_encoder("fusion", K, {"feature_dim": 512, "vocab_size": 50, "max_len": 16}, text_encoder="char_cnn_text")
    assert cached((torch.randn(2, 512), torch.randint(0, 50, (2, 16)))).shape == (2, K)
    assert cached.backbone is None


@pytest.mark.parametrize("shape, pool_size, pooled", [((4, 1, 28, 28), 7, False), ((4, 1, 8, 8), 2, False),
                                                      ((4, 1, 32, 32), 7, True), ((4, 3, 20, 24), 2, True)])
def test_cnn_channels_last_and_skipped_pool_match_the_contiguous_network(shape, pool_size, pooled):
    """The fast layout (channels-last, no-op adaptive pool skipped) gives the contiguous network's values and gradients."""
    torch.manual_seed(0)
    encoder = create_encoder("cnn", K, {"in_channels": shape[1]}, pool_size=pool_size)
    reference = create_encoder("cnn", K, {"in_channels": shape[1]}, pool_size=pool_size)
    reference.load_state_dict(encoder.state_dict())
    reference.to(memory_format=torch.contiguous_format)
    conv = encoder.net[3].weight  # the second conv (the first one's 1-channel weight is both layouts at once)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    calls = []
    encoder.net[-3].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(shape)
    got, want = encoder(x), reference.net(x)  # the Sequential as it was: every layer, NCHW
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bool(calls) is pooled
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), b in zip(encoder.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
