"""LeNet for 28x28 single-channel images (MNIST, Fashion-MNIST).

conv(1, 20, 5) - relu - maxpool 2 - conv(20, 50, 5) - relu - maxpool 2 -
fc(800, 500) - relu - fc(500, K). Parameter names match the published
checkpoints (``conv1``, ``conv2``, ``fc1``, ``fc2``).
"""
import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))
