"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import torch


def randomise_bn(module, seed: int = 0):
    """Give every BatchNorm2d non-trivial running statistics, so that eval mode differs from
    train mode and a wrongly loaded or wrongly set-up model shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module
