"""The digits data, patches, canvases with known boxes, and the cache of the trained models."""
from __future__ import annotations

import json

import pytest
import torch

from attnlab.analysis.digits import (
    CNNSettings,
    DigitViT,
    ViTSettings,
    canvas_test_set,
    digit_cnn,
    digit_vit,
    load_digits_split,
    paste_digits,
    patchify,
    unpatchify,
)


def test_the_split_covers_the_data_once():
    data = load_digits_split()
    assert data.train_images.shape == (1438, 8, 8) and data.test_images.shape == (359, 8, 8)
    assert float(data.train_images.min()) == 0.0 and float(data.train_images.max()) == 1.0
    assert set(data.test_labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    rows = {tuple(r.flatten().tolist()) for r in raw}
    train = {tuple(r.flatten().tolist()) for r in data.train_images}
    test = {tuple(r.flatten().tolist()) for r in data.test_images}
    assert train | test == rows and len(data.sha256) == 64


def test_patches_are_the_image_squares_in_raster_order():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 16, 4)
    assert patches[1, 6].tolist() == images[1, 2:4, 4:6].flatten().tolist()  # row 1, column 2
    assert torch.equal(unpatchify(patches, 2, 8, 8), images)
    with pytest.raises(ValueError, match="patch: expected a positive int dividing"):
        patchify(images, 3)


def test_the_digit_sits_in_its_box_and_the_distractor_elsewhere():
    settings = CNNSettings(noise=0.2)
    data = load_digits_split()
    canvases = paste_digits(data.test_images[:20], data.test_labels[:20], settings, torch.Generator().manual_seed(0),
                            data.test_images[20:40])
    assert canvases.images.shape == (20, 1, 24, 24)
    for i in range(20):
        top, left, bottom, right = canvases.boxes[i].tolist()
        assert bottom - top == 8 and right - left == 8
        inside = canvases.images[i, 0, top:bottom, left:right]
        digit = data.test_images[i]
        assert bool((inside >= digit).all()) and bool((inside[digit > 0.2] == digit[digit > 0.2]).all())
        outside = canvases.images[i, 0].clone()
        outside[top:bottom, left:right] = 0
        bright = (outside > 0.2).nonzero()  # the distractor's ink: one 8×8 square that misses the box
        assert len(bright) > 0
        assert int(bright[:, 0].max() - bright[:, 0].min()) < 8 and int(bright[:, 1].max() - bright[:, 1].min()) < 8
    again = canvas_test_set(settings, 5)
    assert torch.equal(again.images, canvas_test_set(settings, 5).images)  # a fixed test set


def test_the_cache_loads_what_it_saved_and_misses_on_a_change(tmp_path):
    tiny = ViTSettings(dim=8, heads=2, layers=1, steps=3, batch=8)
    first = digit_vit(tiny, cache_dir=tmp_path, progress=False)
    second = digit_vit(tiny, cache_dir=tmp_path, progress=False)
    assert not first.cached and second.cached and second.path == first.path
    assert first.path is not None and first.path.name.startswith("custom-")
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value)
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["settings"]["dim"] == 8 and record["test_accuracy"] == first.test_accuracy
    changed = digit_vit(ViTSettings(dim=8, heads=2, layers=1, steps=3, batch=8, seed=1), cache_dir=tmp_path,
                        progress=False)
    assert not changed.cached and changed.path != first.path
    cnn = digit_cnn(CNNSettings(channels=(2, 2, 2), steps=2, batch=4), cache_dir=tmp_path, progress=False)
    assert not cnn.cached and digit_cnn(cnn.settings, cache_dir=tmp_path, progress=False).cached
    with pytest.raises(ValueError, match="name: expected a preset among"):
        digit_vit("huge", cache_dir=tmp_path)


def test_bad_settings_and_inputs_name_the_argument():
    with pytest.raises(ValueError, match="patch: expected a divisor of the image side"):
        ViTSettings(patch=3)
    with pytest.raises(ValueError, match="heads: expected a divisor of dim"):
        ViTSettings(dim=10, heads=4)
    with pytest.raises(ValueError, match="canvas: expected a side >= 16"):
        CNNSettings(canvas=12)
    with pytest.raises(ValueError, match="channels: expected three positive ints"):
        CNNSettings(channels=(1, 2))
    model = DigitViT(ViTSettings(dim=8, heads=2, layers=1))
    with pytest.raises(ValueError, match="images: expected a tensor \\(batch, 8, 8\\)"):
        model(torch.zeros(2, 7, 7))
    with pytest.raises(ValueError, match="images: expected finite values"):
        model(torch.full((2, 8, 8), float("nan")))
