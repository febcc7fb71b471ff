import pytest
import torch

from model.attention_pool import PoolShape
from model.classifier import ARCHS, build_classifier, load_pretrained
from model.selfie import build_selfie

SMALL = {"width": 0.125, "stem": "small", "pool": PoolShape(layers=1, intermediate=32, heads=4)}


def tiny_selfie(width: float = 0.125):
    torch.manual_seed(1)
    selfie = build_selfie(width=width, stem="small", grid=4, pool=PoolShape(layers=1, intermediate=32, heads=4))
    with torch.no_grad():  # make every tensor distinguishable from a fresh initialisation
        for name, tensor in selfie.state_dict().items():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 2) if name.endswith("running_var") else tensor.uniform_(-1, 1)
    return selfie


# Every arch fine-tuned, and every arch a linear probe accepts (not resnet50: its stage 4 is not pretrained).
@pytest.mark.parametrize(
    ("arch", "frozen"), [(arch, False) for arch in ARCHS] + [("resnet36", True), ("resnet36_attn", True)]
)
def test_every_arch_classifies(arch: str, frozen: bool) -> None:
    model = build_classifier(arch, num_classes=7, frozen=frozen, **SMALL)
    images = torch.randn(3, 3, 32, 32)
    assert model.forward_features(images).shape == (3, model.backbone.num_features)
    logits = model(images)
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert model.head.weight.grad is not None


def test_resnet50_takes_p_as_its_first_three_stages_and_nothing_else() -> None:
    selfie = tiny_selfie()
    model = build_classifier("resnet50", num_classes=10, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_pretrained(model, "resnet50", selfie.state_dict())
    after, patch_net = model.state_dict(), selfie.patch_net.state_dict()
    p_names = [k for k in patch_net if k.startswith(("stem.", "stages.0.", "stages.1.", "stages.2."))]
    assert sorted(loaded) == sorted(f"backbone.{k}" for k in p_names)
    for name in p_names:
        assert torch.equal(after[f"backbone.{name}"], patch_net[name]), name
    rest = [
        k
        for k in after
        if not k.startswith(tuple(f"backbone.{p}" for p in ("stem.", "stages.0.", "stages.1.", "stages.2.")))
    ]
    assert any(k.startswith("backbone.stages.3.") for k in rest) and "backbone.final_norm.0.weight" in rest
    for name in rest:  # stage 4, the final norm and the head keep their fresh initialisation
        assert torch.equal(after[name], before[name]), name
    weight = "backbone.stages.3.0.conv2.weight"
    assert not any(
        torch.equal(after[weight], t) for t in selfie.state_dict().values() if t.shape == after[weight].shape
    )


def test_resnet36_attn_takes_p_and_the_attention_pooling() -> None:
    selfie = tiny_selfie()
    model = build_classifier("resnet36_attn", num_classes=10, **SMALL)
    load_pretrained(model, "resnet36_attn", selfie.state_dict())
    for name, tensor in selfie.pool.state_dict().items():
        assert torch.equal(model.pool.state_dict()[name], tensor), name
    for name, tensor in selfie.patch_net.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))


def test_a_checkpoint_of_another_width_is_refused() -> None:
    model = build_classifier("resnet50", num_classes=10, **SMALL)
    with pytest.raises(ValueError, match="a different width or stem"):
        load_pretrained(model, "resnet50", tiny_selfie(width=0.25).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        load_pretrained(model, "resnet50", {"pool.u0": torch.zeros(1)})


def test_a_linear_probe_trains_only_the_head_and_keeps_batch_norm_statistics() -> None:
    model = build_classifier("resnet36", num_classes=5, frozen=True, **SMALL)
    load_pretrained(model, "resnet36", tiny_selfie().state_dict())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    model.train()
    assert not model.backbone.training and model.head_norm.training
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())  # incl. running stats
    assert model.head.weight.abs().sum() > 0
