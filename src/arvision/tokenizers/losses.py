"""Stage-1 losses: reconstruction, perceptual (LPIPS, only with local weights) and PatchGAN adversarial."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# torchvision's hub file names for the LPIPS backbones.
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(recon, target)
    if kind == "l2":
        return F.mse_loss(recon, target)
    raise ValueError(f"reconstruction loss must be l1 or l2, got {kind!r}")


def hub_checkpoint_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(torch_home) / "hub" / "checkpoints"


def build_perceptual_loss(net: str = "vgg") -> nn.Module | None:
    """LPIPS as a training loss when its backbone weights are in the local torch hub cache, else None.

    Never downloads: a tokenizer trained without it says so in its log and in results.json.
    """
    weights = hub_checkpoint_dir() / LPIPS_BACKBONE_FILES[net]
    if not weights.exists():
        log.warning("perceptual loss disabled: LPIPS backbone %s not found (put it there to enable it)", weights)
        return None
    from torchmetrics.functional.image.lpips import _LPIPS

    lpips = _LPIPS(pretrained=True, net=net, pnet_rand=False).eval()
    for p in lpips.parameters():
        p.requires_grad_(False)
    return lpips


def perceptual_loss(lpips: nn.Module, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if recon.shape[1] == 1:  # LPIPS backbones are RGB
        recon, target = recon.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
    return lpips(recon, target, normalize=False).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): stride-2 4×4 convs, BatchNorm, LeakyReLU(0.2)."""

    def __init__(self, *, in_channels: int, width: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
