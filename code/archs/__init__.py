"""Base classifiers: LeNet and the CIFAR ResNets (ResNet-50 comes from torchvision)."""
