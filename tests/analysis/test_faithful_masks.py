"""P047 iFAM: given the mask, stage 2's prediction is exactly invariant to the dropped patches' pixels (softmax and
linear attention), stage 2's captured attention puts exactly zero weight on them, the straight-through gate leaves
the forward pass unchanged and brings the task's gradient to the mask scores, and a few training steps lower the
loss."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.analysis.capture import capture
from attnlab.analysis.digits import ViTSettings, load_digits_split, patchify, unpatchify
from attnlab.analysis.faithful_masks import (
    FaithfulMaskViT,
    FaithfulSettings,
    faithful_loss,
    masked_patch_invariance,
    train_faithful_masks,
)

MIXERS = ["softmax", "linear"]


def _model(mixer: str, seed: int = 0) -> FaithfulMaskViT:
    torch.manual_seed(seed)
    return FaithfulMaskViT(FaithfulSettings(ViTSettings(dim=16, heads=2, layers=2, mixer=mixer))).eval()


def _mask(batch: int, seed: int) -> torch.Tensor:
    mask = torch.rand(batch, 16, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[:, 5] = True  # at least one kept and one dropped patch per image
    mask[:, 10] = False
    return mask


@pytest.mark.parametrize("mixer", MIXERS)
def test_stage_two_is_invariant_to_the_dropped_patches(mixer):
    model = _model(mixer)
    images = load_digits_split().test_images[:16]
    mask = _mask(16, 1)
    patches = patchify(images, 2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        before = model(images, patch_mask=mask).logits
        for scale in (1.0, 100.0):  # arbitrary pixels, also far outside the data's range
            noise = scale * torch.randn(patches.shape, generator=generator)
            changed = unpatchify(torch.where(mask[..., None], patches, noise), 2, 8, 8)
            assert torch.equal(model(changed, patch_mask=mask).logits, before)
        # a changed KEPT patch does change the prediction: the check can fail
        kept = patches.clone()
        kept[:, 5] += 1.0
        assert not torch.equal(model(unpatchify(kept, 2, 8, 8), patch_mask=mask).logits, before)


@pytest.mark.parametrize("mixer", MIXERS)
def test_captured_stage_two_attention_is_zero_on_dropped_patches(mixer):
    model = _model(mixer)
    images = load_digits_split().test_images[:6]
    mask = _mask(6, 3)
    with torch.no_grad(), capture(model.stage2) as att:
        model(images, patch_mask=mask)
    assert len(att.layers) == 2
    keys = torch.cat([torch.ones(6, 1, dtype=torch.bool), mask], dim=1)  # [CLS] + patches
    for maps in att.layers:  # (batch, heads, 17, 17)
        dropped = (~keys)[:, None, None, :].expand_as(maps)
        assert bool((maps[dropped] == 0).all())
        assert bool((maps[:, :, 0][(keys[:, None, :]).expand(-1, maps.shape[1], -1)] != 0).any())


def test_the_gate_changes_no_forward_value_and_brings_gradient_to_the_scores():
    model = _model("softmax")
    with torch.no_grad():  # scores that keep some patches and drop others
        model.mask_head.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(4))
        model.mask_head.bias.zero_()
    data = load_digits_split()
    images, labels = data.train_images[:32], data.train_labels[:32]
    out = model(images)
    assert 0 < float(out.mask.double().mean()) < 1
    with torch.no_grad():
        assert torch.equal(out.logits, model(images, patch_mask=out.mask).logits)  # the gate is exactly the mask
    torch.nn.functional.cross_entropy(out.logits, labels).backward()  # stage 2's loss alone
    assert float(model.mask_head.weight.grad.abs().sum()) > 0  # reaches stage 1's mask scores through the gate
    assert float(model.stage2.embed.weight.grad.abs().sum()) > 0
    model.zero_grad()
    loss = faithful_loss(model, images, labels)
    assert bool(torch.isfinite(loss)) and float(loss.detach()) > 0


def test_training_runs_and_keeps_the_invariance():
    settings = FaithfulSettings(ViTSettings(dim=16, heads=2, layers=1, steps=40, batch=32, lr=5e-3))
    trained = train_faithful_masks(settings)
    assert sum(trained.train_losses[-5:]) < sum(trained.train_losses[:5])
    assert 0 <= trained.extra["kept_share"] <= 1
    check = masked_patch_invariance(trained.model, load_digits_split().test_images[:32],
                                    generator=torch.Generator().manual_seed(0))
    assert check["max_logit_difference"] == 0.0 and check["images"] == 32


def test_bad_inputs_name_the_argument():
    model = _model("softmax")
    images = load_digits_split().test_images[:3]
    with pytest.raises(ValueError, match="patch_mask: expected shape"):
        model(images, patch_mask=torch.ones(3, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="patch_mask: expected dtype torch.bool"):
        model(images, patch_mask=torch.ones(3, 16))
    with pytest.raises(ValueError, match="keep_target: expected a share"):
        FaithfulSettings(keep_target=1.5)
    with pytest.raises(ValueError, match="area: expected a finite float"):
        FaithfulSettings(area=-1.0)
    with pytest.raises(TypeError, match="settings: expected FaithfulSettings"):
        FaithfulMaskViT(ViTSettings())


def test_registered_with_the_paper():
    for name in ("faithful-masks", "faithful-mask-invariance"):
        spec = attnlab.get(name, kind="analysis")
        assert spec.paper.id == "P047" and spec.paper.arxiv == "2506.08915" and spec.family == "E"
