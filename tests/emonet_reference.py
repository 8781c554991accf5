"""Our own PyTorch implementation of EmoNet (Toisoul et al., Nature Machine Intelligence 2021).

Written from the paper and the structure of the official ``face-analysis/emonet`` model so that its
``state_dict`` has exactly the official key layout (``conv2.bn1.running_mean``, ``m0.b2_plus_1.conv3.weight``,
``emo_net_2.6.downsample.0.weight``, ``emo_fc_2.3.bias`` ...). It is the parity reference for the Flax port
in :mod:`facecrafter_jax.models.emonet` and the source of random-weight checkpoints for the data-prep tests.

Architecture facts encoded here:

* every normalisation is ``BatchNorm2d`` (the official code rebinds ``nn.InstanceNorm2d`` to
  ``nn.BatchNorm2d`` before building the face-alignment network, so its checkpoint holds BatchNorm
  weights and running statistics under the "InstanceNorm" layer names);
* the face-alignment backbone (FAN) is a 7x7/2 stem conv with bias, three bottleneck "ConvBlocks" and
  ``num_modules`` stacked depth-4 hourglasses predicting 68 heatmaps at 64x64;
* the emotion head multiplies the hourglass features by the summed heatmaps of the last stack
  (attention), concatenates them with the backbone features, and runs a 1x1 conv, four
  (ConvBlock, MaxPool) pairs, a 4x4 average pool and ``Linear -> BatchNorm1d -> ReLU -> Linear``
  giving ``n_expression`` logits then valence and arousal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    """Pre-activation multi-scale bottleneck: three 3x3 convs of widths out/2, out/4, out/4, concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half, quarter = cout // 2, cout // 4
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False)) if cin != cout else None
        )

    def forward(self, x):
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat([a, b, c], dim=1) + skip


class HourGlass(nn.Module):
    """Recursive hourglass of depth ``depth`` on 256 channels; submodules named ``b1_<level>`` etc."""

    def __init__(self, num_modules: int, depth: int, num_features: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            setattr(self, f"b1_{level}", ConvBlock(num_features, num_features))
            setattr(self, f"b2_{level}", ConvBlock(num_features, num_features))
            if level == 1:
                setattr(self, f"b2_plus_{level}", ConvBlock(num_features, num_features))
            setattr(self, f"b3_{level}", ConvBlock(num_features, num_features))

    def _level(self, level: int, x):
        upper = getattr(self, f"b1_{level}")(x)
        lower = getattr(self, f"b2_{level}")(F.max_pool2d(x, 2, 2))
        lower = self._level(level - 1, lower) if level > 1 else getattr(self, f"b2_plus_{level}")(lower)
        lower = getattr(self, f"b3_{level}")(lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x):
        return self._level(self.depth, x)


class EmoNetReference(nn.Module):
    def __init__(self, num_modules: int = 2, n_expression: int = 8, n_reg: int = 2, n_blocks: int = 4):
        super().__init__()
        self.num_modules = num_modules
        self.n_expression = n_expression
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for i in range(num_modules):
            setattr(self, f"m{i}", HourGlass(1, 4, 256))
            setattr(self, f"top_m_{i}", ConvBlock(256, 256))
            setattr(self, f"conv_last{i}", nn.Conv2d(256, 256, 1))
            setattr(self, f"bn_end{i}", nn.BatchNorm2d(256))
            setattr(self, f"l{i}", nn.Conv2d(256, 68, 1))
            if i < num_modules - 1:
                setattr(self, f"bl{i}", nn.Conv2d(256, 256, 1))
                setattr(self, f"al{i}", nn.Conv2d(68, 256, 1))
        self.conv1x1_input_emo_2 = nn.Conv2d(256 * (num_modules + 1), 256, 1)
        layers = []
        for _ in range(n_blocks):
            layers += [ConvBlock(256, 256), nn.MaxPool2d(2, 2)]
        self.emo_net_2 = nn.Sequential(*layers)
        self.avg_pool_2 = nn.AvgPool2d(4)
        self.emo_fc_2 = nn.Sequential(nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, n_expression + n_reg))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2, 2)
        x = self.conv4(self.conv3(x))
        prev, feats, heat = x, [], None
        for i in range(self.num_modules):
            h = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(prev))
            h = F.relu(getattr(self, f"bn_end{i}")(getattr(self, f"conv_last{i}")(h)))
            heat = getattr(self, f"l{i}")(h)
            if i < self.num_modules - 1:
                h = getattr(self, f"bl{i}")(h)
                prev = prev + h + getattr(self, f"al{i}")(heat)
            feats.append(h)
        attention = heat.sum(dim=1, keepdim=True)
        emo = torch.cat([x, torch.cat(feats, dim=1) * attention], dim=1)
        emo = self.avg_pool_2(self.emo_net_2(self.conv1x1_input_emo_2(emo)))
        out = self.emo_fc_2(emo.flatten(1))
        return {"heatmap": heat, "expression": out[:, :-2], "valence": out[:, -2], "arousal": out[:, -1]}


@torch.no_grad()
def randomize_(model: EmoNetReference, seed: int, calibration_batch: int = 2) -> EmoNetReference:
    """Seeded random weights with realistic BatchNorm running statistics.

    Conv / linear weights keep PyTorch's default initialisation (seeded). The running statistics
    are then set to the statistics of a random calibration batch (one train-mode pass with
    momentum 1), so activations stay O(1) through the 60+ normalisation layers, and finally the
    BatchNorm affine parameters and statistics are perturbed so that every one of them matters.
    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = 1.0
    model.train()
    model(torch.rand(calibration_batch, 3, 256, 256))
    for m in norms:
        m.momentum = 0.1
        n = m.num_features
        m.weight.copy_(1.0 + 0.2 * (torch.rand(n) - 0.5))
        m.bias.copy_(0.1 * torch.randn(n))
        m.running_mean.add_(0.05 * torch.randn(n) * m.running_var.sqrt())
        m.running_var.mul_(1.0 + 0.2 * (torch.rand(n) - 0.5))
    # The head's BatchNorm1d sees one vector per image: two calibration samples give a useless
    # per-channel variance. Re-estimate it in eval mode (after the perturbations above) from the
    # calibration features pooled over samples and channels, so logits stay O(1).
    model.eval()
    head_bn = model.emo_fc_2[1]
    captured = {}
    hook = model.emo_fc_2[0].register_forward_hook(lambda mod, inp, out: captured.setdefault("f", out))
    model(torch.rand(calibration_batch, 3, 256, 256))
    hook.remove()
    f = captured["f"]
    head_bn.running_mean.copy_(f.mean(0))
    head_bn.running_var.copy_(f.var() * (1.0 + 0.2 * (torch.rand(head_bn.num_features) - 0.5)))
    return model


def random_checkpoint(path, seed: int = 0, n_expression: int = 8, data_parallel_prefix: bool = True) -> EmoNetReference:
    """Save a random-weight EmoNet checkpoint in the official layout (``torch.save`` of a state dict).

    The official ``emonet_8.pth`` was saved from ``nn.DataParallel``; ``data_parallel_prefix`` adds
    its ``module.`` prefix. Returns the (eval-mode) reference model.
    """
    model = randomize_(EmoNetReference(n_expression=n_expression), seed)
    state = model.state_dict()
    if data_parallel_prefix:
        state = {"module." + k: v for k, v in state.items()}
    torch.save(state, path)
    return model
