"""Per-group encoders into the shared latent space, built by name so configs can pick them.

Every encoder maps its group's inputs to (B, latent_dim) and has an attribute ``backbone``:
the parameters under it are a pretrained backbone (trained at ``lr_backbone``), all others are
new (``lr_new``). torchvision is imported only when a ResNet encoder is built.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tdro.registry import Registry, unknown_choice_message

ENCODERS: Registry[nn.Module] = Registry("encoder")

# Structural facts a dataset reports about a group's inputs (Group.input_info keys).
INPUT_KEYS = ("in_channels", "image_size", "vocab_size", "max_len", "input_dim", "feature_dim")

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 checkpoint name
RESNET18_URL = f"https://download.pytorch.org/models/{RESNET18_FILE}"


def _positive_int(argument: str, value: Any) -> int:
    """Reject sizes that cannot build a layer, naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")
    return value


def _dropout(argument: str, value: Any) -> float:
    """Reject dropout probabilities outside [0, 1), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{argument} must be a probability in [0, 1), got {value!r}")
    return float(value)


def _signature(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters of a registered encoder, without latent_dim."""
    parameters = dict(inspect.signature(ENCODERS.get(name)).parameters)
    parameters.pop("latent_dim")
    return parameters


def validate_encoder_options(name: str, options: Mapping[str, Any]) -> None:
    """Fail on an unknown encoder or option name, so no config key is silently ignored."""
    accepted = sorted(_signature(name))
    for option in options:
        if option not in accepted:
            raise ValueError(unknown_choice_message(f"{name} encoder option", option, accepted))


def create_encoder(
    name: str, latent_dim: int, input_info: Mapping[str, Any] | None = None, **options: Any
) -> nn.Module:
    """Build a registered encoder, taking from input_info only the structural facts it needs.

    A structural fact (e.g. ``input_dim``) may also be given as an option; it must then agree
    with input_info.
    """
    factory = ENCODERS.get(name)
    _positive_int("latent_dim", latent_dim)
    validate_encoder_options(name, options)
    input_info = dict(input_info or {})
    kwargs = dict(options)
    for key, parameter in _signature(name).items():
        if key not in INPUT_KEYS:
            continue
        if key in input_info:
            if key in options and options[key] != input_info[key]:
                raise ValueError(
                    f"encoder {name!r}: option {key}={options[key]!r} conflicts with the "
                    f"dataset's input_info {key}={input_info[key]!r}"
                )
            kwargs[key] = input_info[key]
        elif key not in options and parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"encoder {name!r} needs {key!r} in input_info (the dataset's structural facts); "
                f"input_info has: {sorted(input_info) or 'no keys'}"
            )
    return factory(latent_dim, **kwargs)


@ENCODERS.register("cnn")
class CNNEncoder(nn.Module):
    """Small CNN for low-resolution images of any size (the reference cnn28: pool 7; cnn32: pool 8).

    Runs channels-last (weights and inputs): on CPU its step takes 0.67× the contiguous layout's,
    whose max-pooling alone was a quarter of the step (``bench/encoder_layout.py``). The adaptive
    pool is skipped when the feature map already has the pool's size (28×28 → 7×7, 8×8 → 2×2):
    there it would only copy (8 % of the step). Both leave the numbers as they were up to rounding.
    """

    def __init__(
        self,
        latent_dim: int,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        pool_size: int = 7,
    ) -> None:
        super().__init__()
        _positive_int("latent_dim", latent_dim)
        _positive_int("in_channels", in_channels)
        _positive_int("pool_size", pool_size)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
            raise ValueError(f"channels must be a non-empty list of positive integers, got {channels!r}")
        layers: list[nn.Module] = []
        width = in_channels
        for i, out in enumerate(channels):
            _positive_int(f"channels[{i}]", out)
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(), nn.Linear(width * pool_size**2, latent_dim)]
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.pool_size = (pool_size, pool_size)
        self.backbone = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *features, pool, flatten, linear = self.net
        h = x.contiguous(memory_format=torch.channels_last)
        for layer in features:
            h = layer(h)
        if h.shape[-2:] != self.pool_size:
            h = pool(h)
        return linear(flatten(h))


def _resnet18_weights(weights_path: str | None) -> dict[str, torch.Tensor]:
    """Read ImageNet ResNet-18 weights from an explicit path or the torch hub cache, never downloading."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE)
    path = weights_path if weights_path is not None else cache
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained ResNet-18 weights not found at {path!r}. They are read from weights_path "
            f"(given: {weights_path!r}) or else from the torch hub cache {cache!r}; tdro never "
            f"downloads. Get {RESNET18_FILE} from {RESNET18_URL} (or run "
            f"torchvision.models.resnet18(weights='IMAGENET1K_V1') on a machine with internet, "
            f"which stores it in its hub cache), then copy it to {cache!r} or pass weights_path."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@ENCODERS.register("resnet_visual")
class ResNetVisualEncoder(nn.Module):
    """torchvision ResNet-18 trunk (the backbone) plus a new MLP projection, for natural images."""

    def __init__(
        self,
        latent_dim: int,
        in_channels: int = 3,
        pretrained: bool = False,
        weights_path: str | None = None,
        hidden_dim: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        _positive_int("latent_dim", latent_dim)
        _positive_int("hidden_dim", hidden_dim)
        dropout = _dropout("dropout", dropout)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (repeated to RGB) or 3, got {in_channels!r}")
        if not isinstance(pretrained, bool):
            raise ValueError(f"pretrained must be true or false, got {pretrained!r}")
        if weights_path is not None and not pretrained:
            raise ValueError(f"weights_path={weights_path!r} is given but pretrained is false; set pretrained: true")
        from torchvision.models import resnet18  # lazy: torchvision costs seconds to import

        trunk = resnet18(weights=None)
        if pretrained:
            state = _resnet18_weights(weights_path)
            try:
                trunk.load_state_dict(state)
            except RuntimeError as error:
                source = weights_path or "the torch hub cache"
                raise ValueError(f"{source} does not hold a torchvision ResNet-18 state_dict: {error}") from error
        trunk.fc = nn.Identity()
        self.in_channels = in_channels
        self.backbone = trunk
        self.projection = nn.Sequential(
            nn.Linear(512, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, latent_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.projection(self.backbone(x))


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) values over kept positions; a row with none kept gives zeros, not NaN."""
    keep = keep.unsqueeze(-1).to(values.dtype)
    return (values * keep).sum(1) / keep.sum(1).clamp_min(1.0)


@ENCODERS.register("mlp_text")
class MLPTextEncoder(nn.Module):
    """Bag of characters: mean token embedding over non-padding ids (0 = pad), then an MLP."""

    def __init__(
        self, latent_dim: int, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        for argument, value in [("latent_dim", latent_dim), ("vocab_size", vocab_size),
                                ("embed_dim", embed_dim), ("hidden_dim", hidden_dim)]:
            _positive_int(argument, value)
        dropout = _dropout("dropout", dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, latent_dim),
        )
        self.backbone = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(_masked_mean(self.embedding(tokens), tokens != 0))


@ENCODERS.register("char_cnn_text")
class CharCNNTextEncoder(nn.Module):
    """The reference character CNN: three Conv1d blocks, adaptive pool to 8 steps, MLP."""

    def __init__(
        self, latent_dim: int, vocab_size: int, embed_dim: int = 32, hidden_dim: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        for argument, value in [("latent_dim", latent_dim), ("vocab_size", vocab_size),
                                ("embed_dim", embed_dim), ("hidden_dim", hidden_dim)]:
            _positive_int(argument, value)
        dropout = _dropout("dropout", dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.convs = nn.Sequential(
            nn.Conv1d(embed_dim, 64, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(128, 256, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool1d(8), nn.Flatten(),
        )
        self.mlp = nn.Sequential(
            nn.Linear(256 * 8, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, latent_dim)
        )
        self.backbone = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.convs(self.embedding(tokens).transpose(1, 2)))


@ENCODERS.register("transformer_text")
class TransformerTextEncoder(nn.Module):
    """Small Transformer over character ids whose padding mask comes from the ids (0 = pad).

    The reference derived the mask from embeddings after adding positions, so it never masked.
    """

    def __init__(
        self,
        latent_dim: int,
        vocab_size: int,
        max_len: int,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for argument, value in [("latent_dim", latent_dim), ("vocab_size", vocab_size), ("max_len", max_len),
                                ("embed_dim", embed_dim), ("num_heads", num_heads),
                                ("num_layers", num_layers), ("ff_dim", ff_dim)]:
            _positive_int(argument, value)
        dropout = _dropout("dropout", dropout)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.position = nn.Embedding(max_len, embed_dim)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, ff_dim, dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(embed_dim, latent_dim)
        self.backbone = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.size(1)
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        pad = tokens == 0
        positions = torch.arange(length, device=tokens.device)
        h = self.embedding(tokens) + self.position(positions)
        # An all-padding row would mask every key (softmax of all -inf = NaN): let it attend freely;
        # the pooled mean below still ignores its positions and yields zeros.
        attention_pad = pad & ~pad.all(1, keepdim=True)
        h = self.transformer(h, src_key_padding_mask=attention_pad)
        return self.out(_masked_mean(h, ~pad))


@ENCODERS.register("mlp_tabular")
class MLPTabularEncoder(nn.Module):
    """Two-hidden-layer MLP for tabular rows; LayerNorm by default so one-sample groups train."""

    NORMS = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}

    def __init__(
        self, latent_dim: int, input_dim: int, hidden_dim: int = 64, dropout: float = 0.1, norm: str = "layer"
    ) -> None:
        super().__init__()
        for argument, value in [("latent_dim", latent_dim), ("input_dim", input_dim), ("hidden_dim", hidden_dim)]:
            _positive_int(argument, value)
        dropout = _dropout("dropout", dropout)
        if norm not in self.NORMS:
            raise ValueError(unknown_choice_message("norm", norm, sorted(self.NORMS)))
        norm_layer = self.NORMS[norm]
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), norm_layer(hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), norm_layer(hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, latent_dim),
        )
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.backbone = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@ENCODERS.register("features")
class FeaturesEncoder(nn.Module):
    """MLP on precomputed vectors (e.g. cached frozen ResNet-18 features); hidden 256 as resnet_visual."""

    def __init__(self, latent_dim: int, feature_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        for argument, value in [("latent_dim", latent_dim), ("feature_dim", feature_dim), ("hidden_dim", hidden_dim)]:
            _positive_int(argument, value)
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
        self.backbone = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@ENCODERS.register("fusion")
class FusionEncoder(nn.Module):
    """Image and caption of one sample through their own encoders, fused: [z_v; z_t] → Linear → ReLU → Dropout.

    The reference's FusionLayer reused the visual and text groups' encoders; here the combined
    group owns its sub-encoders, so every group keeps one encoder of its own.
    """

    def __init__(
        self,
        latent_dim: int,
        vocab_size: int,
        max_len: int = 128,
        in_channels: int = 3,
        feature_dim: int | None = None,
        visual_encoder: str | None = None,
        text_encoder: str = "mlp_text",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        visual_name = visual_encoder or ("features" if feature_dim is not None else "resnet_visual")
        visual_info = {"in_channels": in_channels} if feature_dim is None else {"feature_dim": feature_dim}
        self.visual = create_encoder(visual_name, latent_dim, visual_info)
        self.text = create_encoder(text_encoder, latent_dim, {"vocab_size": vocab_size, "max_len": max_len})
        self.fuse = nn.Sequential(nn.Linear(2 * latent_dim, latent_dim), nn.ReLU(),
                                  nn.Dropout(_dropout("dropout", dropout)))
        self.backbone = self.visual.backbone

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, tokens = pair
        return self.fuse(torch.cat([self.visual(images), self.text(tokens)], dim=1))
