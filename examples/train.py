"""Train examples/digits.cnn with the Python API and a plain torch optimizer loop: the network
and optimizer of `cnndsl train examples/digits.cnn`, with its own shuffle and no validation
split, checkpoints or progress bar.

    python examples/train.py [--epochs 4] [--backend triton|torch]
"""

import argparse
from pathlib import Path

import torch

import cnndsl
from cnndsl import data

args = argparse.ArgumentParser()
args.add_argument("--epochs", type=int, default=4)
args.add_argument("--backend", default="triton")
args = args.parse_args()

torch.manual_seed(0)
model = cnndsl.compile(Path(__file__).with_name("digits.cnn"), backend=args.backend)
train, test = data.load()  # the bundled 8x8 UCI digits, a fixed 80/20 split
x, y = torch.from_numpy(train.x).to(model.device), torch.from_numpy(train.y).to(model.device)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

for epoch in range(args.epochs):
    model.train()
    order = torch.randperm(len(y), device=y.device)
    for i in range(0, len(y), 64):
        batch = order[i:i + 64]
        optimizer.zero_grad()
        loss = model.loss(x[batch], y[batch])  # fused softmax + cross-entropy
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    xt, yt = torch.from_numpy(test.x).to(model.device), torch.from_numpy(test.y).to(model.device)
    accuracy = (model(xt).argmax(1) == yt).float().mean().item()
print(f"test accuracy: {accuracy:.3f}")
