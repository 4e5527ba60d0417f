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

def alexnet(image_size: int = 224, num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's alexnet without the adaptive pool (a 6x6 map at 224x224: it does nothing there);
    the classifier takes 256 x s x s for the map the features leave at `image_size`."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    s = features(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    return nn.Sequential(
        features, nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(256 * s * s, 4096), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, num_classes))


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


# --- GoogLeNet, DenseNet-121 and EfficientNet-B0 (torchvision layout) ----------------------------

class BasicConv2d(nn.Module):
    """torchvision googlenet's BasicConv2d: conv without bias, BN with eps 0.001, ReLU."""

    def __init__(self, cin: int, c: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """torchvision's Inception module; its branch3 has a 3x3 conv where the paper has 5x5
    (pytorch/vision#906). The four branches are concatenated along channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet with aux_logits=False and transform_input=False."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, 7, 2, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        for m in list(self.children())[:-3]:  # the stem, inceptions and max pools, in order
            x = m(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def googlenet(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    return GoogLeNet(num_classes, dropout)


def _named(**modules: nn.Module) -> nn.Sequential:
    """An nn.Sequential whose children have the given names, in the given order."""
    seq = nn.Sequential()
    for name, m in modules.items():
        seq.add_module(name, m)
    return seq


class _DenseLayer(nn.Sequential):
    """torchvision's _DenseLayer (BN-ReLU-conv1x1 to bn_size*growth, BN-ReLU-conv3x3 to growth),
    drop_rate 0. It takes the concatenation of all earlier features and returns the new ones."""

    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(cin))
        self.add_module("relu1", nn.ReLU())
        self.add_module("conv1", nn.Conv2d(cin, bn_size * growth, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth))
        self.add_module("relu2", nn.ReLU())
        self.add_module("conv2", nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int):
        super().__init__({f"denselayer{i + 1}": _DenseLayer(cin + i * growth, growth, bn_size) for i in range(n)})

    def forward(self, x):
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class DenseNet(nn.Module):
    """torchvision's DenseNet (BC): features, ReLU, global average pool, flatten, classifier."""

    def __init__(self, growth: int = 32, blocks=(6, 12, 24, 16), init_features: int = 64, bn_size: int = 4,
                 num_classes: int = 1000):
        super().__init__()
        self.features = _named(conv0=nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
                               norm0=nn.BatchNorm2d(init_features), relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, 2, 1))
        c = init_features
        for i, n in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", _named(
                    norm=nn.BatchNorm2d(c), relu=nn.ReLU(), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, 2)))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def densenet121(num_classes: int = 1000) -> nn.Module:
    return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: to the nearest multiple of divisor (at least divisor),
    never more than 10% below v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin: int, c: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.SiLU) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (padding (k-1)//2, no bias), BatchNorm2d, activation
    (none when act is None)."""
    layers = [nn.Conv2d(cin, c, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c)]
    return nn.Sequential(*layers, *([act()] if act else []))


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth in "row" mode: in training, each sample of the batch is zeroed
    with probability p and the survivors scaled by 1/(1-p); identity in eval or when p == 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * (mask / keep if keep > 0.0 else mask)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with SiLU: x * sigmoid(fc2(silu(fc1(avgpool(x)))))."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class MBConv(nn.Module):
    """torchvision efficientnet's MBConv: [expand 1x1] - depthwise kxk - SE - project 1x1 (no activation);
    on a residual block (stride 1, cin == c) the branch goes through stochastic depth, then adds x."""

    def __init__(self, cin: int, c: int, k: int, stride: int, ratio: int, sd_prob: float):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == c
        hidden = _make_divisible(cin * ratio)
        layers = [_conv_bn_act(cin, hidden, 1)] if hidden != cin else []
        layers += [_conv_bn_act(hidden, hidden, k, stride, groups=hidden),
                   SqueezeExcitation(hidden, max(1, cin // 4)),
                   _conv_bn_act(hidden, c, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


# (expand ratio, kernel, stride, cin, cout, layers): torchvision's efficientnet_b0 stages, width/depth 1.0
EFFICIENTNET_B0_CFG = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                       (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def efficientnet_b0(num_classes: int = 1000, dropout: float = 0.2, stochastic_depth_prob: float = 0.2) -> nn.Module:
    """torchvision's efficientnet_b0 (default BatchNorm2d: eps 1e-5, momentum 0.1). Block i of the
    16 (counted over all stages from 0) has stochastic depth probability stochastic_depth_prob * i / 16."""
    total = sum(cfg[-1] for cfg in EFFICIENTNET_B0_CFG)
    layers, block_id = [_conv_bn_act(3, _make_divisible(EFFICIENTNET_B0_CFG[0][3]), 3, 2)], 0
    for ratio, k, s, cin, c, n in EFFICIENTNET_B0_CFG:
        cin, c, stage = _make_divisible(cin), _make_divisible(c), []
        for i in range(n):
            stage.append(MBConv(cin if i == 0 else c, c, k, s if i == 0 else 1, ratio,
                                stochastic_depth_prob * block_id / total))
            block_id += 1
        layers.append(nn.Sequential(*stage))
    last = 4 * c
    layers.append(_conv_bn_act(c, last, 1))
    return _named(features=nn.Sequential(*layers), avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                  classifier=nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes)))


PARAMS.update(googlenet=6624904, densenet121=7978856, efficientnet_b0=5288548)
BUILDERS.update(googlenet=googlenet, densenet121=densenet121, efficientnet_b0=efficientnet_b0)
