"""Loss terms of adversarial tokenizer training: reconstruction, GAN, adaptive weight, LeCAM, perceptual.

The recipe of Esser et al. 2021 ("Taming Transformers for High-Resolution Image Synthesis",
VQ-GAN): a reconstruction loss plus, after a warm-up, a patch discriminator's generator loss whose
weight adapts so that its gradient at the decoder's last layer has the size of the reconstruction
loss's gradient there. GAN losses are the hinge loss (Lim & Ye 2017, "Geometric GAN") and the
non-saturating loss (Goodfellow et al. 2014), each with taming's factor 1/2 on the discriminator
side. LeCAM (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data")
pulls real logits towards an EMA of fake ones and vice versa, in the form of the authors' code
(squared hinge on the gap); its EMA anchors are buffers, so checkpoints resume it exactly. The
perceptual loss is LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric") on a VGG-like network whose architecture and weights come entirely from a
local safetensors file: nothing is ever downloaded. The multi-resolution STFT loss for audio
belongs to the audio tokenizers and is not here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import reduce, repeat
from safetensors.torch import load_file
from torch import Tensor, nn

RECONSTRUCTION_LOSSES = ("mse", "l1")
GAN_LOSSES = ("hinge", "non_saturating")


# --- reconstruction and GAN terms -----------------------------------------------------------------


def reconstruction_loss(reconstruction: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean "mse" or "l1" error over all elements, in float32 even under bf16 autocast."""
    reconstruction, target = reconstruction.float(), target.float()
    if kind == "mse":
        return F.mse_loss(reconstruction, target)
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")


def _check_gan_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {kind!r}")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str) -> Tensor:
    """The discriminator's loss on (any-shaped) logits of real and of generated images.

    hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2;
    non_saturating: (mean softplus(-real) + mean softplus(fake)) / 2, i.e. binary cross-entropy
    with real = 1, fake = 0 (softplus(-l) = -log sigmoid(l), computed stably).
    """
    _check_gan_loss(kind)
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: Tensor, kind: str) -> Tensor:
    """The generator's loss on the discriminator's logits of generated images.

    hinge: -mean fake (as in taming-transformers); non_saturating: mean softplus(-fake) =
    -log sigmoid(fake), which keeps a strong gradient while the discriminator still wins.
    """
    _check_gan_loss(kind)
    logits_fake = logits_fake.float()
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_generator_weight(nll_loss: Tensor, generator_loss_value: Tensor, last_layer_weight: Tensor,
                              epsilon: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_w nll|| / (||grad_w L_G|| + epsilon), clamped to [0, max_weight], detached.

    `w` is the decoder's last layer weight (taming-transformers' `calculate_adaptive_weight`):
    the GAN term then moves that layer as much as the reconstruction term does, whatever the scale
    of the discriminator's logits. The graph is retained for the caller's backward. Under DDP give
    the underlying parameter: `autograd.grad` on it runs no gradient-accumulation hooks, so no
    collective starts. Without autograd (evaluation under `no_grad`) the weight is 0, as in taming.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and generator_loss_value.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    (nll_gradient,) = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)
    (generator_gradient,) = torch.autograd.grad(generator_loss_value, last_layer_weight, retain_graph=True)
    weight = nll_gradient.float().norm() / (generator_gradient.float().norm() + epsilon)
    return weight.clamp(0.0, max_weight).detach()


# --- LeCAM ----------------------------------------------------------------------------------------


def _mean_over_processes(value: Tensor) -> Tensor:
    """The mean of a 0-d tensor over processes, so every rank keeps the same anchors."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


class LeCAMRegularizer(nn.Module):
    """R = mean relu(real - anchor_fake)^2 + mean relu(anchor_real - fake)^2 (Tseng et al. 2021).

    The anchors are exponential moving averages of the mean real and fake logits. In training
    mode each call first folds the batch's means (averaged over processes) into them, as the
    authors' code does, the first call copying them; in eval mode the anchors stay put. Buffers:
    `ema_logits_real`, `ema_logits_fake` (float32) and `initialized`.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_logits_real", torch.zeros(()))
        self.register_buffer("ema_logits_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        means = _mean_over_processes(torch.stack([logits_real.float().mean(), logits_fake.float().mean()]))
        decay = self.decay if bool(self.initialized) else 0.0
        self.ema_logits_real.mul_(decay).add_(means[0], alpha=1.0 - decay)
        self.ema_logits_fake.mul_(decay).add_(means[1], alpha=1.0 - decay)
        self.initialized.fill_(True)

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        if self.training:
            self.update(logits_real.detach(), logits_fake.detach())
        real_gap = F.relu(logits_real.float() - self.ema_logits_fake).pow(2).mean()
        fake_gap = F.relu(self.ema_logits_real - logits_fake.float()).pow(2).mean()
        return real_gap + fake_gap


# --- perceptual (LPIPS) ---------------------------------------------------------------------------

_CONV_NAME = re.compile(r"^stages\.(\d+)\.(\d+)\.(weight|bias)$")
_HEAD_NAME = re.compile(r"^heads\.(\d+)\.weight$")
PERCEPTUAL_TENSORS_HELP = (
    "expected tensors: 'shift' and 'scale' (1 c 1 1), input normalisation x -> (x - shift) / scale; "
    "'stages.S.K.weight' (out in k k) and 'stages.S.K.bias' (out), conv K of stage S, stages and convs "
    "numbered from 0 without gaps; 'heads.S.weight' (1 c_S 1 1), one non-negative linear head per stage"
)


class PerceptualLoss(nn.Module):
    """LPIPS distance between two image batches `(b c h w)` in [-1, 1], averaged over the batch.

    Network: `x -> (x - shift) / scale`, then stages; every stage after the first begins with a
    2x2 max-pool, and each conv (stride 1, same padding) is followed by ReLU. The output of each
    stage is unit-normalised over channels, the squared difference of the two images' features
    weighted by the stage's 1x1 head, averaged over space, and the stages summed. Tensor names in
    the safetensors file (see `PERCEPTUAL_TENSORS_HELP`) map to LPIPS-VGG16 as follows:
    torchvision `vgg16().features.{0,2}` -> `stages.0.{0,1}`, `{5,7}` -> `stages.1.{0,1}`,
    `{10,12,14}` -> `stages.2.{0,1,2}`, `{17,19,21}` -> `stages.3.{0,1,2}`, `{24,26,28}` ->
    `stages.4.{0,1,2}`; lpips' `lin{S}.model.1.weight` -> `heads.{S}.weight`; lpips' ScalingLayer
    `shift`/`scale` -> `shift`/`scale`. Weights are frozen; gradients reach the images only.
    """

    def __init__(self, tensors: dict[str, Tensor], source: str | Path = "<tensors>"):
        super().__init__()
        stage_shapes = self._architecture(tensors, source)
        self.register_buffer("shift", torch.zeros_like(tensors["shift"]))
        self.register_buffer("scale", torch.ones_like(tensors["scale"]))
        self.stages = nn.ModuleList()
        for shapes in stage_shapes:
            convs = [nn.Conv2d(s[1], s[0], (s[2], s[3]), padding=(s[2] // 2, s[3] // 2)) for s in shapes]
            self.stages.append(nn.ModuleList(convs))
        self.heads = nn.ModuleList(nn.Conv2d(shapes[-1][0], 1, 1, bias=False) for shapes in stage_shapes)
        self.load_state_dict(tensors, strict=True)
        self.requires_grad_(False)
        self.in_channels = int(tensors["shift"].shape[1])

    @staticmethod
    def _architecture(tensors: dict[str, Tensor], source) -> list[list[tuple[int, ...]]]:
        """Conv weight shapes per stage, read from the names and shapes of the file's tensors."""
        convs: dict[int, dict[int, tuple[int, ...]]] = {}
        heads: dict[int, tuple[int, ...]] = {}
        for name, tensor in tensors.items():
            if conv := _CONV_NAME.match(name):
                if conv.group(3) == "weight":
                    convs.setdefault(int(conv.group(1)), {})[int(conv.group(2))] = tuple(tensor.shape)
            elif head := _HEAD_NAME.match(name):
                heads[int(head.group(1))] = tuple(tensor.shape)
            elif name not in ("shift", "scale"):
                raise ValueError(f"{source}: unexpected tensor {name!r}; {PERCEPTUAL_TENSORS_HELP}")
        problems = []
        if "shift" not in tensors or "scale" not in tensors:
            problems.append("'shift' or 'scale' is missing")
        if not convs or sorted(convs) != list(range(len(convs))):
            problems.append(f"stages {sorted(convs)} are not numbered 0..S-1")
        if sorted(heads) != sorted(convs):
            problems.append(f"heads {sorted(heads)} do not match stages {sorted(convs)}")
        if problems:
            raise ValueError(f"{source}: {'; '.join(problems)}; {PERCEPTUAL_TENSORS_HELP}")
        stage_shapes = []
        channels = int(tensors["shift"].shape[1]) if tensors["shift"].ndim == 4 else -1
        for stage in range(len(convs)):
            if sorted(convs[stage]) != list(range(len(convs[stage]))):
                raise ValueError(f"{source}: convs of stage {stage} are not numbered 0..K-1; {PERCEPTUAL_TENSORS_HELP}")
            shapes = [convs[stage][k] for k in range(len(convs[stage]))]
            for shape in shapes:
                if len(shape) != 4 or shape[1] != channels or shape[2] % 2 == 0 or shape[3] % 2 == 0:
                    raise ValueError(f"{source}: stage {stage} conv of shape {shape} does not take {channels} "
                                     f"channels with an odd kernel; {PERCEPTUAL_TENSORS_HELP}")
                channels = shape[0]
            if heads[stage] != (1, channels, 1, 1):
                raise ValueError(
                    f"{source}: heads.{stage}.weight has shape {heads[stage]}, expected (1, {channels}, 1, 1)"
                )
            stage_shapes.append(shapes)
        return stage_shapes

    @classmethod
    def from_file(cls, path: str | Path) -> "PerceptualLoss":
        """Load from a local safetensors file; a missing file is an error, never a download."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual_weights_path {str(path)!r} does not exist. The perceptual loss loads LPIPS-style "
                f"weights only from a local safetensors file ({PERCEPTUAL_TENSORS_HELP}); give an existing "
                f"file, or set perceptual_weight = 0 to train without it"
            )
        return cls(load_file(path), source=path)

    def _features(self, x: Tensor) -> list[Tensor]:
        features = []
        x = (x - self.shift) / self.scale
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = F.max_pool2d(x, 2)
            for conv in stage:
                x = F.relu(conv(x))
            features.append(x)
        return features

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(
                f"expected two image batches (b c h w) of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if x.shape[1] == 1 and self.in_channels == 3:  # grey images: the network was trained on RGB
            x, y = (repeat(t, "b 1 h w -> b c h w", c=3) for t in (x, y))
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the perceptual network takes {self.in_channels}-channel images, got {x.shape[1]}")
        total = x.new_zeros((), dtype=torch.float32)
        for head, feature_x, feature_y in zip(self.heads, self._features(x), self._features(y)):
            # LPIPS's unit normalisation over channels (epsilon 1e-10 as in the reference code).
            feature_x = feature_x.float() / (feature_x.float().norm(dim=1, keepdim=True) + 1e-10)
            feature_y = feature_y.float() / (feature_y.float().norm(dim=1, keepdim=True) + 1e-10)
            distance = head((feature_x - feature_y).pow(2).to(head.weight.dtype)).float()
            total = total + reduce(distance, "b 1 h w -> ", "mean")
        return total
