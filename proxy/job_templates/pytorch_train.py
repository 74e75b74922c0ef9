"""Train a small PyTorch network on a synthetic dataset.

Two interleaved spirals, generated here: no dataset upload needed. The trained
weights and the metrics land in the job's outputs.
"""
import json
import math
import os

import torch
from torch import nn

torch.manual_seed(0)
OUTPUT = os.environ.get("JOBCLOUD_OUTPUT", ".")
EPOCHS = 60


def spirals(n_per_class: int = 500, noise: float = 0.15):
    """Two spirals around the origin: a classic that a linear model cannot separate."""
    t = torch.linspace(0.25, 3 * math.pi, n_per_class)
    features, labels = [], []
    for label, phase in ((0, 0.0), (1, math.pi)):
        xy = torch.stack([t * torch.cos(t + phase), t * torch.sin(t + phase)], dim=1) / (3 * math.pi)
        features.append(xy + noise * torch.randn_like(xy) / 3)
        labels.append(torch.full((n_per_class,), label, dtype=torch.long))
    return torch.cat(features), torch.cat(labels)


X, y = spirals()
order = torch.randperm(len(X))
X, y = X[order], y[order]
split = int(0.8 * len(X))
train = torch.utils.data.TensorDataset(X[:split], y[:split])
loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)

model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
loss_fn = nn.CrossEntropyLoss()

for epoch in range(1, EPOCHS + 1):
    model.train()
    total = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(xb)
    if epoch % 10 == 0 or epoch == 1:
        print(f"epoch {epoch:3d}  loss {total / split:.4f}", flush=True)

model.eval()
with torch.no_grad():
    accuracy = (model(X[split:]).argmax(dim=1) == y[split:]).float().mean().item()
print(f"test accuracy {accuracy:.3f}")

torch.save(model.state_dict(), os.path.join(OUTPUT, "model.pt"))
with open(os.path.join(OUTPUT, "metrics.json"), "w") as f:
    json.dump({"test_accuracy": accuracy, "epochs": EPOCHS, "train_size": split}, f, indent=2)
