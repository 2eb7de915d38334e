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


class TinyResNet(nn.Module):
    """Stem conv+BN, one residual block (conv-BN-ReLU-conv-BN plus identity skip), global
    pool and a linear head: ``width`` residual channels (6) and ``inner`` channels inside
    the block (5), on images of ``in_channels`` (1) into ``classes`` (4)."""

    def __init__(self, width=6, inner=5, in_channels=1, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(h)))
        return self.fc(x.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """conv 3->8, BN, depthwise conv (groups=8), BN, pointwise 8->4, BN, pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 4, 1, bias=False)
        self.b3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.dw(x)))
        x = F.relu(self.b3(self.pw(x)))
        return self.fc(x.mean((2, 3)))


class FixedHeadNet(nn.Module):
    """A classifier that reads the raw inputs besides one convolution's pooled channels:
    its input columns for the raw pixels can never be removed (256 of its 848 MACs),
    and keeping one channel of the convolution needs 404."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 + 64, 4)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.c1(x)).mean((2, 3)), x.flatten(1)], 1))


class NoGradCNN(SmallCNN):
    """SmallCNN whose forward runs under torch.no_grad: its output has no autograd graph."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


class GroupedConvNet(nn.Module):
    """conv 1->8, BN, grouped conv 8->8 (groups=4, not depthwise), BN, pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class NoBiasCNN(nn.Module):
    """SmallCNN without convolution biases: its channels own weights only."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class TinyAttention(nn.Module):
    """A Linear, one nn.MultiheadAttention (16 wide, 2 heads) and a classifier over the
    mean token: (N, T, 8) -> (N, 3)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.mha(h, h, h)[0].mean(1))


class TinyEncoder(nn.Module):
    """A Linear, a 2-layer nn.TransformerEncoder (``d`` wide, ``heads`` heads, MLP ``ff``)
    and a classifier over the mean token: (N, T, 8) -> (N, 3)."""

    def __init__(self, d=16, heads=2, ff=32):
        super().__init__()
        self.inp = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(self.enc(self.inp(x)).mean(1))


class HeadAttentionNet(nn.Module):
    """Self-attention written out as HuggingFace models do: separate query, key and value
    Linear layers whose outputs are viewed as (N, T, heads, d), an output projection and a
    classifier over the mean token: (N, T, 8) -> (N, 3); 16 wide, 4 heads of 4."""

    def __init__(self, width=16, d=4):
        super().__init__()
        self.d = d
        self.inp = nn.Linear(8, width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        n, t, _ = h.shape
        q, k, v = (f(h).view(n, t, -1, self.d).transpose(1, 2)
                   for f in (self.query, self.key, self.value))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v
        return self.fc(self.out(a.transpose(1, 2).reshape(n, t, -1)).mean(1))


class GroupedQueryNet(HeadAttentionNet):
    """HeadAttentionNet with grouped-query attention: 4 query heads share 2 key/value
    heads (each repeated twice), so query and key/value heads are not coupled one to one."""

    def __init__(self):
        super().__init__()
        self.key, self.value = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        n, t, _ = h.shape
        q, k, v = (f(h).view(n, t, -1, self.d).transpose(1, 2)
                   for f in (self.query, self.key, self.value))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v
        return self.fc(self.out(a.transpose(1, 2).reshape(n, t, -1)).mean(1))


def global_methods() -> list[str]:
    """The registered methods that run with the global loss model (every built-in but the
    layer-wise sparsegpt and wanda, which need a model of repeated blocks)."""
    import falcon_prune as fp

    return [m for m in fp.METHODS if "global" in fp.methods.get_method(m).loss_models]
