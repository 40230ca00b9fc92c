"""LeNet for 28x28 single-channel images (MNIST, Fashion-MNIST).

conv(1, 20, 5) - relu - maxpool 2 - conv(20, 50, 5) - relu - maxpool 2 -
fc(800, 500) - relu - fc(500, K). Parameter names match the published
checkpoints (``conv1``, ``conv2``, ``fc1``, ``fc2``).
"""
import torch
import torch.nn.functional as F
from torch import nn


class _SingleChannelConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` for a one-channel ``x`` (stride 1, no padding), whose input gradient
    is computed as weight^T @ grad_output followed by ``F.fold`` (col2im).

    Same values as the built-in convolution (the input gradient is the same sum, in another order);
    on a CPU oneDNN's input-gradient kernel for one input channel takes several times as long as the
    forward pass (about 55 against 15 ms for 256 LeNet images), and the attacks of adversarial
    training ask for that gradient at every step. The weight and bias gradients use the built-in
    kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        out_channels, _, kh, kw = weight.shape
        n, _, oh, ow = grad_output.shape
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            columns = torch.matmul(weight.reshape(out_channels, kh * kw).t(),
                                   grad_output.reshape(n, out_channels, oh * ow))
            grad_x = F.fold(columns, tuple(x.shape[-2:]), (kh, kw))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, [out_channels] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return grad_x, grad_weight, grad_bias


def _first_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; through ``_SingleChannelConv2d`` when the input gradient is wanted in float32 on a CPU."""
    if (x.requires_grad and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] == 1
            and not torch.is_autocast_enabled("cpu")):
        return _SingleChannelConv2d.apply(x, conv.weight, conv.bias)
    return conv(x)


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        # relu(max_pool(z)) = max_pool(relu(z)) exactly (both monotone; same gradient routing), and the
        # ReLU then runs on a quarter of the elements.
        x = F.relu(F.max_pool2d(_first_conv(self.conv1, x), 2, 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2, 2))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))
