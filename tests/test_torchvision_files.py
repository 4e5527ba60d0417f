"""torchvision's published networks beyond the shipped examples, written in .cnn
(tests/data/torchvision/, as docs/language.md section 11 says they can be): each parses and
has torchvision's parameter count (inception_v3 without its auxiliary head)."""

from pathlib import Path

import pytest

import cnndsl

FILES = Path(__file__).resolve().parent / "data" / "torchvision"
PARAMS = {"vgg11_bn": 132_868_840, "resnet34": 21_797_672, "resnet101": 44_549_160,
          "resnext50_32x4d": 25_028_904, "wide_resnet50_2": 68_883_240, "densenet169": 14_149_480,
          "mobilenet_v3_small": 2_542_856, "mobilenet_v3_large": 5_483_032, "efficientnet_b1": 7_794_184,
          "squeezenet1_1": 1_235_496, "mnasnet0_5": 2_218_512, "inception_v3": 23_834_568,
          "regnet_y_400mf": 4_344_144}


def test_every_file_is_counted():
    assert sorted(p.stem for p in FILES.glob("*.cnn")) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_the_parameter_count_is_torchvisions(name):
    net = cnndsl.parse(FILES / f"{name}.cnn")
    assert net.name == name and net.to_json()["total_params"] == PARAMS[name]
