import pytest
import torch
import torch.fx

from autosculpt_env.models import ARCHITECTURES, build

SHAPES = [(1, 8, 10), (1, 28, 10), (3, 32, 100)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("in_channels,image_size,num_classes", SHAPES)
def test_every_model_traces_and_runs(arch, in_channels, image_size, num_classes):
    kwargs = (
        {"patch_size": 2 if image_size == 8 else 4, "depth": 2, "dim": 32} if arch == "vit" else {}
    )
    if arch.startswith("vgg"):
        kwargs["width_mult"] = 0.125
    if arch == "mobilenetv2":
        kwargs.update(width_mult=0.35, last_channel=64)
    if arch.startswith("resnet"):
        kwargs["width"] = 4
    torch.manual_seed(0)
    model = build(
        arch, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs
    ).eval()
    x = torch.randn(3, in_channels, image_size, image_size)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, num_classes)
        assert torch.allclose(traced(x), out, atol=1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build("resnet20", depth=21)
    with pytest.raises(ValueError, match="VGG depth"):
        build("vgg11", depth=13)
    with pytest.raises(ValueError, match="patch size 5 must divide"):
        build("vit", patch_size=5, image_size=28)
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        build("alexnet")
