"""Small models and data shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two convolutions at different resolutions and a linear head: costs differ per layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def small_data(n=240, seed=0):
    """(x (n, 1, 8, 8), y (n,)) with labels a learnable function of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].sum((1, 2)) > 0).long()
    return x, y


def trained_cnn(seed=0, steps=150):
    torch.manual_seed(seed)
    model = SmallCNN()
    x, y = small_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


class BatchNormCNN(nn.Module):
    """SmallCNN with BatchNorm after each convolution."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def trained_bn_cnn(seed=0, steps=150):
    """BatchNormCNN trained on ``small_data`` (running statistics from training), in eval
    mode."""
    torch.manual_seed(seed)
    model = BatchNormCNN()
    x, y = small_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
