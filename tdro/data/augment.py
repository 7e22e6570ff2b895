"""The last stage of the training input pipeline, run on the training device: images to model inputs.

Image groups whose training batches arrive as uint8 (the decoded-image cache) are turned into
normalised float here, on the GPU when there is one (a quarter of the bytes cross the bus). With
``augment`` every training image gets its own random resized crop (area fraction
U(augment_min_scale, 1), aspect ratio log-uniform in [3/4, 4/3]) and a horizontal flip with
probability 1/2, resampled bilinearly to ``image_size`` in one batched ``grid_sample``. The random
draws come from a generator seeded by (seed, group, step) alone, so a run is reproducible and a
resumed run augments exactly as an uninterrupted one. Evaluation never passes through here: it reads
the stores' plain (un-augmented) view.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tdro.data.base import GroupedDataset, PairStore
from tdro.data.image_cache import DecodedImageStore, normalise_, to_model_input
from tdro.data.images import CallableImageStore, ImageFileStore

ASPECT_RATIOS = (3 / 4, 4 / 3)


def _stream_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts' text (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def crop_boxes(count: int, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """(count, 2, 3) affine maps from output to input coordinates ([-1, 1]): a random resized crop and flip each."""
    area = torch.empty(count).uniform_(min_scale, 1.0, generator=generator)
    log_ratio = torch.empty(count).uniform_(math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1]), generator=generator)
    ratio = log_ratio.exp()
    half_w = (area * ratio).sqrt().clamp(max=1.0)  # half-extent in [-1, 1] coordinates = fraction of the side
    half_h = (area / ratio).sqrt().clamp(max=1.0)
    center_x = (torch.rand(count, generator=generator) * 2 - 1) * (1 - half_w)
    center_y = (torch.rand(count, generator=generator) * 2 - 1) * (1 - half_h)
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = half_w * flip, center_x
    theta[:, 1, 1], theta[:, 1, 2] = half_h, center_y
    return theta


def crop_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size, 2) sampling grid of axis-aligned maps ``theta``: ``F.affine_grid`` (align_corners=False)
    without its general matrix product, over twice as fast on a CPU."""
    base = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1  # pixel centres
    gx = base.view(1, 1, size) * theta[:, 0, 0].view(-1, 1, 1) + theta[:, 0, 2].view(-1, 1, 1)
    gy = base.view(1, size, 1) * theta[:, 1, 1].view(-1, 1, 1) + theta[:, 1, 2].view(-1, 1, 1)
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)


class ImageBatchTransform:
    """One group's training images -> normalised float (B, 3, image_size, image_size) on their device."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                 min_scale: float, seed: int, group: str) -> None:
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.augment, self.min_scale, self.seed, self.group = augment, float(min_scale), int(seed), group

    def __call__(self, x: torch.Tensor, step: int, rows: torch.Tensor | None = None, total: int | None = None
                 ) -> torch.Tensor:
        """uint8 pixels (cache) or normalised float (decoded files); augmented when on, seeded by the step.

        ``x`` may be the ``rows`` of a group batch of ``total`` images (a distributed rank's share): each
        image then gets the crop it gets in the whole batch.
        """
        if not self.augment:
            return to_model_input(x, self.image_size, self.mean, self.std) if x.dtype == torch.uint8 else x
        generator = torch.Generator().manual_seed(_stream_seed("augment", self.seed, self.group, int(step)))
        theta = crop_boxes(len(x) if rows is None else int(total), self.min_scale, generator)
        theta = (theta if rows is None else theta[rows.cpu()]).to(x.device)
        out = F.grid_sample(x.float(), crop_grid(theta, self.image_size), mode="bilinear", padding_mode="border",
                            align_corners=False)
        # sampling is linear in the pixels: /255 and normalising after it touches the (smaller) output only
        return normalise_(out.div_(255.0), self.mean, self.std) if x.dtype == torch.uint8 else out


def _image_store(x: Any) -> Any:
    """The image store behind a split's inputs (a paired group's image part), or None."""
    if isinstance(x, PairStore):
        x = x.first
    return x if isinstance(x, (ImageFileStore, CallableImageStore, DecodedImageStore)) else None


class TrainInputs:
    """Per group, what turns a training batch's inputs into model inputs on the device (identity where nothing does)."""

    def __init__(self, dataset: GroupedDataset, augment: bool, min_scale: float, seed: int) -> None:
        self.transforms: dict[str, ImageBatchTransform] = {}
        for name, group in dataset.groups.items():
            store = _image_store(group.train.x)
            if store is not None and (augment or isinstance(store, DecodedImageStore)):
                t = store.transform
                self.transforms[name] = ImageBatchTransform(t.image_size, t.mean, t.std, augment, min_scale, seed,
                                                            name)

    def __call__(self, inputs: dict[str, Any], step: int,
                 shares: dict[str, tuple[torch.Tensor, int]] | None = None) -> dict[str, Any]:
        """``inputs`` with each transformed group's images (the first part of a pair) made model-ready.

        ``shares``: per group, (rows, total) when ``inputs`` hold only those rows of the batch (distributed).
        """
        if not self.transforms:
            return inputs
        out = dict(inputs)
        for name, transform in self.transforms.items():
            if name not in inputs:
                continue
            x = inputs[name]
            rows, total = (shares or {}).get(name, (None, None))
            images = transform(x[0] if isinstance(x, tuple) else x, step, rows, total)
            out[name] = (images, *x[1:]) if isinstance(x, tuple) else images
        return out

    @classmethod
    def from_config(cls, dataset: GroupedDataset, config: Any) -> "TrainInputs":
        """The transforms a run's config asks for (``augment``, ``augment_min_scale``, ``seed``)."""
        return cls(dataset, config.augment, config.augment_min_scale, config.seed)
