"""Gaussian data augmentation (Cohen, Rosenfeld and Kolter, ICML 2019).

One SGD step per batch on cross-entropy at x + sigma * e, e ~ N(0, I).
Run folder: logs/{dataset}/cohen/noise_{sigma}/{arch}/{id}/.
"""
import time

import torch
import torch.nn.functional as F

from train_utils import AverageMeter, Method, accuracy, train_main


def method_path(args) -> str:
    return f"cohen/noise_{args.noise_sd}"


def train(ctx, loader, epoch: int):
    losses, top1 = AverageMeter(), AverageMeter()
    started = time.time()
    for i, batch in enumerate(loader):
        inputs, targets = ctx.to_device(batch[0], batch[1])
        noisy = inputs + torch.randn_like(inputs) * ctx.args.noise_sd
        with ctx.autocast():
            outputs = ctx.model(noisy)
        loss = F.cross_entropy(outputs.float(), targets)
        ctx.step(loss)
        losses.update(loss, inputs.size(0))
        top1.update(accuracy(outputs, targets), inputs.size(0))
        ctx.log_batch(epoch, i, len(loader), losses, top1, started)
    return losses.avg, top1.avg


METHOD = Method(description="Gaussian data augmentation (Cohen et al. 2019)", method_path=method_path, train=train)


def main(argv=None):
    train_main(METHOD, argv)


if __name__ == "__main__":
    main()
