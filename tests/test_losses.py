"""Loss terms of VQ-GAN training against hand computations: GAN losses, adaptive weight, LeCAM,
and the file-only LPIPS-style perceptual loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tokenizers_vq.losses import (
    LeCAMRegularizer,
    PerceptualLoss,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.0])


def softplus(value: float) -> float:
    return math.log1p(math.exp(value))


def test_reconstruction_losses_on_hand_values():
    reconstruction, target = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert reconstruction_loss(reconstruction, target, "l1").item() == pytest.approx(1.0)
    assert reconstruction_loss(reconstruction, target, "mse").item() == pytest.approx(5.0 / 3.0)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(reconstruction, target, "l2")


def test_hinge_losses_on_hand_values():
    # relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2); taming's factor 1/2.
    expected = 0.5 * ((0.0 + 0.5 + 2.0) / 3 + (0.0 + 1.0 + 2.0) / 3)
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(expected)
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(1.0 / 3.0)  # -mean(fake)


def test_non_saturating_losses_on_hand_values():
    expected_d = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert discriminator_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(expected_d, rel=1e-6)
    # -log sigmoid(f) = softplus(-f)
    expected_g = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3
    assert generator_loss(FAKE, "non_saturating").item() == pytest.approx(expected_g, rel=1e-6)
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(FAKE, "wasserstein")


def test_adaptive_weight_matches_a_hand_computation_on_a_tiny_net():
    torch.manual_seed(0)
    first, last = nn.Linear(3, 4), nn.Linear(4, 2)
    x, target = torch.randn(5, 3), torch.randn(5, 2)
    critic = torch.tensor([0.7, -1.3])  # a linear "discriminator" D(y) = y . critic
    hidden = torch.tanh(first(x))
    output = last(hidden)
    nll = (output - target).pow(2).mean()
    g_loss = -(output @ critic).mean()
    weight = adaptive_generator_weight(nll, g_loss, last.weight)

    # d nll / dW = 2/(5*2) sum_i (out_i - t_i) h_i^T ; d g / dW = -1/5 sum_i critic h_i^T
    hidden, output = hidden.detach(), output.detach()
    nll_gradient = 2.0 / 10.0 * (output - target).t() @ hidden
    g_gradient = -1.0 / 5.0 * torch.outer(critic, hidden.sum(0))
    expected = nll_gradient.norm() / (g_gradient.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (nll + weight * g_loss).backward()  # the graph was retained for the caller
    assert last.weight.grad is not None


def test_adaptive_weight_is_clamped_and_zero_without_autograd():
    weight_parameter = nn.Parameter(torch.ones(3))
    nll = (weight_parameter * 10.0).sum()
    g_loss = (weight_parameter * 0.0).sum()  # zero gradient: the ratio would be 30 * sqrt(3) / 1e-4
    assert adaptive_generator_weight(nll, g_loss, weight_parameter).item() == 1e4
    with torch.no_grad():
        nll, g_loss = (weight_parameter * 2).sum(), weight_parameter.sum()
        assert adaptive_generator_weight(nll, g_loss, weight_parameter).item() == 0.0


def test_lecam_anchors_update_as_an_ema_and_the_penalty_matches_hand_values():
    lecam = LeCAMRegularizer(decay=0.9)
    assert {name for name, _ in lecam.named_buffers()} == {"ema_logits_real", "ema_logits_fake", "initialized"}
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    penalty = lecam(real, fake)
    # The first call copies the batch means: anchors real 2, fake -0.5.
    assert lecam.ema_logits_real.item() == 2.0 and lecam.ema_logits_fake.item() == -0.5 and bool(lecam.initialized)
    # mean(relu(real + 0.5)^2) + mean(relu(2 - fake)^2) = (2.25 + 12.25)/2 + (9 + 4)/2
    assert penalty.item() == pytest.approx(13.75)
    lecam(torch.tensor([4.0]), torch.tensor([1.5]))
    assert lecam.ema_logits_real.item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert lecam.ema_logits_fake.item() == pytest.approx(0.9 * -0.5 + 0.1 * 1.5)
    before = lecam.ema_logits_real.clone()
    lecam.eval()
    lecam(torch.tensor([100.0]), torch.tensor([100.0]))
    assert torch.equal(lecam.ema_logits_real, before)  # eval mode leaves the anchors alone


def tiny_perceptual_tensors(in_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "shift": torch.tensor([-0.03, -0.088, -0.188][:in_channels]).reshape(1, in_channels, 1, 1),
        "scale": torch.tensor([0.458, 0.448, 0.45][:in_channels]).reshape(1, in_channels, 1, 1),
        "stages.0.0.weight": torch.randn(4, in_channels, 3, 3, generator=generator),
        "stages.0.0.bias": torch.randn(4, generator=generator),
        "stages.1.0.weight": torch.randn(6, 4, 3, 3, generator=generator),
        "stages.1.0.bias": torch.randn(6, generator=generator),
        "stages.1.1.weight": torch.randn(5, 6, 3, 3, generator=generator),
        "stages.1.1.bias": torch.randn(5, generator=generator),
        "heads.0.weight": torch.rand(1, 4, 1, 1, generator=generator),
        "heads.1.weight": torch.rand(1, 5, 1, 1, generator=generator),
    }


def reference_lpips(tensors, x, y):
    """LPIPS written out with functional ops, for comparison."""

    def features(image):
        image = (image - tensors["shift"]) / tensors["scale"]
        stage0 = F.relu(F.conv2d(image, tensors["stages.0.0.weight"], tensors["stages.0.0.bias"], padding=1))
        pooled = F.max_pool2d(stage0, 2)
        stage1 = F.relu(F.conv2d(pooled, tensors["stages.1.0.weight"], tensors["stages.1.0.bias"], padding=1))
        stage1 = F.relu(F.conv2d(stage1, tensors["stages.1.1.weight"], tensors["stages.1.1.bias"], padding=1))
        return [stage0, stage1]

    total = 0.0
    for index, (fx, fy) in enumerate(zip(features(x), features(y))):
        fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        total = total + F.conv2d((fx - fy) ** 2, tensors[f"heads.{index}.weight"]).mean()
    return total


def test_perceptual_loss_loads_strictly_from_a_safetensors_file(tmp_path):
    tensors = tiny_perceptual_tensors()
    path = tmp_path / "lpips.safetensors"
    save_file(tensors, path)
    perceptual = PerceptualLoss.from_file(path)
    assert all(not p.requires_grad for p in perceptual.parameters())
    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    value = perceptual(x, y)
    assert value.item() == pytest.approx(reference_lpips(tensors, x.detach(), y).item(), rel=1e-5)
    assert perceptual(y, y).item() == 0.0
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grey = torch.rand(2, 1, 8, 8, generator=generator)  # repeated to the network's three channels
    assert perceptual(grey, -grey).item() == pytest.approx(
        reference_lpips(tensors, grey.repeat(1, 3, 1, 1), -grey.repeat(1, 3, 1, 1)).item(), rel=1e-5
    )


def test_perceptual_loss_refuses_missing_files_and_unknown_tensor_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path.*does not exist"):
        PerceptualLoss.from_file(tmp_path / "absent.safetensors")
    tensors = tiny_perceptual_tensors()
    tensors["features.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected tensor 'features.0.weight'"):
        PerceptualLoss(tensors)
    tensors = tiny_perceptual_tensors()
    del tensors["heads.1.weight"]
    with pytest.raises(ValueError, match="heads"):
        PerceptualLoss(tensors)
    tensors = tiny_perceptual_tensors()
    del tensors["stages.1.1.bias"]
    with pytest.raises(RuntimeError, match="stages.1.1.bias"):  # the strict load names it
        PerceptualLoss(tensors)
