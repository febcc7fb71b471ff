"""The rotation methods' model (model/view_classifier.py) over every registered backbone."""

import pytest
import torch
from torch import nn

from model.backbones import BACKBONES
from model.view_classifier import ViewClassifier, build_view_classifier, relation_pairs
from pipeline.rotation_views import ViewFormat, rotation_views
from train.methods import METHODS
from train.methods.rotation import RotationMethod

ROTATION_METHODS = {name: cls for name, cls in METHODS.items() if issubclass(cls, RotationMethod)}

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def batch_of_views(method: str, batch: int = 3, size: int = 32):
    images = torch.randint(
        0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return rotation_views(
        images, ROTATION_METHODS[method].num_views, 0.4, ViewFormat(MEAN, STD), torch.Generator().manual_seed(1)
    )


def build(method: str, backbone: str = "resnet8", width: float = 1.0) -> ViewClassifier:
    spec = ROTATION_METHODS[method]
    return build_view_classifier(spec.num_classes, spec.relation, backbone, width)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(ROTATION_METHODS))
def test_every_method_on_every_backbone_classifies_all_views_in_one_backbone_call(method: str, backbone: str) -> None:
    model = build(method, backbone, width=0.25)
    calls: list[int] = []
    views = batch_of_views(method)
    model.backbone.forward_features = _counting(model.backbone.forward_features, calls)
    result = model(views.views, views.labels)
    spec = ROTATION_METHODS[method]
    assert calls == [spec.num_views * 3]  # every view of the batch, one call
    rows = 3 * (4 if spec.relation else spec.num_views)
    assert result.logits.shape == (rows, spec.num_classes) and result.logits.dtype == torch.float32
    assert result.targets.shape == (rows,)
    assert torch.isfinite(result.loss) and 0 <= result.accuracy <= 1
    result.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _counting(function, calls: list):
    def wrapped(x):
        calls.append(x.shape[0])
        return function(x)

    return wrapped


def test_relation_pairs_join_the_turned_and_the_patched_view_of_the_same_image_and_rotation() -> None:
    batch, dim = 3, 2
    views, images = torch.arange(8).repeat_interleave(batch), torch.arange(batch).repeat(8)
    features = torch.stack([views, images], dim=1).float()  # each row says which view of which image it is
    labels = views.clone()
    pairs, targets = relation_pairs(features, labels)
    assert pairs.shape == (4 * batch, 2 * dim)
    for k in range(4):
        for b in range(batch):
            row = pairs[k * batch + b].tolist()
            assert row == [k, b, 4 + k, b]  # (turned image k, patched image k) of image b
            assert targets[k * batch + b] == k


class ViewIndexBackbone(nn.Module):
    """A fake backbone whose feature is the view's mean pixel, to check the model's plumbing."""

    num_features = 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True)


def test_relation_targets_are_the_rotation_of_the_pair_and_single_view_targets_the_view_label() -> None:
    views = batch_of_views("patch_relnet")
    relnet = ViewClassifier(ViewIndexBackbone(), 4, relation=True)(views.views, views.labels)
    assert relnet.targets.tolist() == [k for k in range(4) for _ in range(3)]
    patch_rotnet = ViewClassifier(ViewIndexBackbone(), 8)(views.views, views.labels)
    assert patch_rotnet.targets.tolist() == views.labels.tolist() == [v for v in range(8) for _ in range(3)]


def test_a_one_class_classifier_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        build_view_classifier(1)


def test_the_forward_is_the_backbone_features_then_the_head() -> None:
    torch.manual_seed(0)
    model = build("patch_relnet").eval()
    views = batch_of_views("patch_relnet")
    whole = model(views.views, views.labels)
    parts = model.forward_head(model.forward_features(views.views), views.labels)
    assert torch.equal(whole.logits, parts.logits) and torch.equal(whole.loss, parts.loss)


@pytest.mark.parametrize("method", sorted(ROTATION_METHODS))
def test_the_labels_are_learnable_a_few_images_are_fitted(method: str) -> None:
    torch.manual_seed(0)
    model = build(method, width=0.5)
    views = batch_of_views(method, batch=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(views.views, views.labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.accuracy == 1.0, out.accuracy
