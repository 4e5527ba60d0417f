"""Hand-built torch.nn models of the example networks, written from the papers and
torchvision's layouts, independently of cnndsl. Each registers its layers in the order
the .cnn file declares them, so that parameters(), buffers() and state_dict() of a
compiled cnndsl model and of the torch model pair up one to one, in order.

The models return logits; the .cnn files end in softmax, so compare `model.logits(x)`
(or `model(x)` against `softmax(torch_model(x))`)."""

import torch
from torch import nn

# --- weight transfer --------------------------------------------------------------------------

def copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy src's state dict into dst entry by entry, in order (names may differ),
    asserting the same number of entries and equal shapes. Returns dst."""
    s, d = list(src.state_dict().items()), list(dst.state_dict().items())
    assert len(s) == len(d), f"{len(s)} state entries in {type(src).__name__}, {len(d)} in {type(dst).__name__}"
    with torch.no_grad():
        for (ks, vs), (kd, vd) in zip(s, d):
            assert vs.shape == vd.shape, f"{ks} {tuple(vs.shape)} -> {kd} {tuple(vd.shape)}"
            vd.copy_(vs)
    return dst


def load_from(cnn_model: nn.Module, torch_model: nn.Module) -> nn.Module:
    """Load the hand-built torch model's weights and buffers into the cnndsl model, in order."""
    return copy_state(torch_model, cnn_model)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN buffer non-default values (BN weight/bias away from 1/0,
    running stats away from 0/1), so that a mix-up of entries shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(3)
    return model


# --- LeNet-5 and a small CIFAR net --------------------------------------------------------------

def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(16, 120, 5), nn.Tanh(),
        nn.Flatten(),
        nn.Linear(120, 84), nn.Tanh(),
        nn.Linear(84, 10),
    )


def cifar_small() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


# --- VGG-16 (configuration D) ----------------------------------------------------------------

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(image_size: int = 224, num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's vgg16 without the adaptive pool: the classifier takes 512 x (size/32)^2."""
    layers, c = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    s = image_size // 32
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(512 * s * s, 4096), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


# --- ResNet-18 / ResNet-50 (torchvision layout) --------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin: int, c: int, stride: int = 1):
        super().__init__()
        cout = c * self.expansion
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (c, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


# --- AlexNet and MobileNetV2 (torchvision layout) ------------------------------------------------

def alexnet(image_size: int = 224, num_classes: int = 1000, dropout: float = 0.5, hidden: int = 4096) -> nn.Module:
    """torchvision's alexnet without the adaptive pool (a 6x6 map at 224x224: it does nothing there);
    the classifier takes 256 x s x s for the map the features leave at `image_size`, and has two
    hidden layers of `hidden` units."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    s = features(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    return nn.Sequential(
        features, nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(256 * s * s, hidden), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))


def _conv_bn_relu6(cin: int, c: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, c, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, c: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_res = stride == 1 and cin == c
        layers = [_conv_bn_relu6(cin, hidden, 1)] if t != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet_v2(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    """torchvision's mobilenet_v2 at width 1.0."""
    layers, c = [_conv_bn_relu6(3, 32, stride=2)], 32
    for t, out, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
            c = out
    layers.append(_conv_bn_relu6(c, 1280, 1))
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(1280, num_classes))


# Published parameter counts (torchvision / the papers).
PARAMS = {"lenet5": 61706, "cifar_small": 122570, "vgg16": 138357544,
          "resnet18": 11689512, "resnet50": 25557032, "alexnet": 61100840, "mobilenet_v2": 3504872}

BUILDERS = {"lenet5": lenet5, "cifar_small": cifar_small, "vgg16": vgg16,
            "resnet18": resnet18, "resnet50": resnet50, "alexnet": alexnet, "mobilenet_v2": mobilenet_v2}
