"""Tests of residual vector quantisation: greedy residual indices, summed lookup, the loss, per-level
metrics, quantizer dropout (training only, seeded, prefixes of levels), configs."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vq.quantizers import ResidualVectorQuantizer, ResidualVQConfig, VQConfig, quantizer_config_from_dict

DIM = 4


def make_quantizer(num_quantizers=3, codebook_size=8, quantizer_dropout=0.0, **level) -> ResidualVectorQuantizer:
    config = ResidualVQConfig(num_quantizers=num_quantizers, quantizer_dropout=quantizer_dropout,
                              quantizer=VQConfig(codebook_size=codebook_size, **level))
    return ResidualVectorQuantizer(config, DIM)


def random_inputs(batch=2, length=6, seed=0) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


def test_levels_quantise_successive_residuals_greedily():
    quantizer = make_quantizer().eval()
    z = random_inputs()
    output = quantizer(z)
    assert output.indices.shape == (2, 6, 3)
    residual = z.clone()
    for level, vector_quantizer in enumerate(quantizer.levels):
        codebook = vector_quantizer.codebook
        distances = ((residual[..., None, :] - codebook) ** 2).sum(-1)  # (b n k)
        assert torch.equal(output.indices[..., level], distances.argmin(-1))
        residual = residual - codebook[output.indices[..., level]]
    total = sum(quantizer.levels[q].codebook[output.indices[..., q]] for q in range(3))
    assert torch.allclose(output.quantized, total, atol=1e-6)
    assert torch.allclose(quantizer.lookup(output.indices), total, atol=1e-6)
    # The residual left over shrinks as levels are added (on average, for this batch).
    assert residual.pow(2).mean() < z.pow(2).mean()


def test_levels_start_from_different_codebooks():
    quantizer = make_quantizer()
    assert not torch.equal(quantizer.levels[0].codebook, quantizer.levels[1].codebook)
    assert [level.config.seed for level in quantizer.levels] == [0, 1, 2]


def test_aux_loss_sums_the_levels_commitment_terms():
    quantizer = make_quantizer(num_quantizers=2, commitment_weight=0.5).eval()
    z = random_inputs().requires_grad_()
    output = quantizer(z)
    code0 = quantizer.levels[0].codebook[output.indices[..., 0]]
    code1 = quantizer.levels[1].codebook[output.indices[..., 1]]
    expected = 0.5 * F.mse_loss(z, code0) + 0.5 * F.mse_loss(z - code0, code1)
    assert output.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    output.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight through the total


def test_one_level_keeps_the_single_codebook_shape_of_vq_and_lfq():
    """At num_quantizers=1 the indices are (b n), as every quantizer with one codebook gives them."""
    quantizer = make_quantizer(num_quantizers=1).eval()
    z = random_inputs()
    output = quantizer(z)
    assert quantizer.num_codebooks == 1 and output.indices.shape == (2, 6)
    assert torch.equal(quantizer.to_indices(z), output.indices)
    assert torch.allclose(quantizer.lookup(output.indices), output.quantized)
    assert torch.equal(quantizer.lookup(output.indices[..., None]), quantizer.lookup(output.indices))


def test_per_level_and_average_usage_on_a_hand_made_batch():
    quantizer = make_quantizer(num_quantizers=2, codebook_size=4).eval()
    with torch.no_grad():
        quantizer.levels[0].codebook.copy_(10.0 * torch.eye(DIM))
        quantizer.levels[1].codebook.copy_(0.1 * torch.eye(DIM))
    first, second = [0, 0, 1, 2], [3, 3, 3, 3]
    z = (10.0 * torch.eye(DIM)[first] + 0.1 * torch.eye(DIM)[second])[None]
    output = quantizer(z)
    assert output.indices[0].tolist() == [[a, b] for a, b in zip(first, second)]
    metrics = output.metrics
    assert metrics["usage_q0"].item() == pytest.approx(3 / 4) and metrics["usage_q1"].item() == pytest.approx(1 / 4)
    assert metrics["usage"].item() == pytest.approx(0.5)
    probabilities = torch.tensor([0.5, 0.25, 0.25])
    perplexity_q0 = torch.exp(-(probabilities * probabilities.log()).sum()).item()
    assert metrics["perplexity_q0"].item() == pytest.approx(perplexity_q0)
    assert metrics["perplexity_q1"].item() == pytest.approx(1.0)
    assert metrics["perplexity"].item() == pytest.approx((perplexity_q0 + 1.0) / 2)
    assert {f"dead_codes_q{q}" for q in range(2)} <= set(metrics)


def test_quantizer_dropout_only_in_training_and_only_prefixes():
    # No EMA and no restarts: the codebooks stay fixed, so lookup can be compared with the output.
    quantizer = make_quantizer(num_quantizers=4, quantizer_dropout=1.0, ema=False, dead_code_threshold=0.0)
    quantizer.eval()
    for seed in range(5):
        assert (quantizer(random_inputs(seed=seed)).indices >= 0).all()  # every level in evaluation
    quantizer.train()
    active_counts = []
    for seed in range(12):
        steps_before = [int(level.training_steps) for level in quantizer.levels]
        output = quantizer(random_inputs(seed=seed))
        active = (output.indices >= 0).all(dim=(0, 1))
        num_active = int(active.sum())
        assert torch.equal(active, torch.arange(4) < num_active)  # a prefix of the levels ran
        assert (output.indices[..., num_active:] == -1).all()
        steps_after = [int(level.training_steps) for level in quantizer.levels]
        assert [after - before for before, after in zip(steps_before, steps_after)] == \
            [1] * num_active + [0] * (4 - num_active)  # dropped levels keep their statistics
        assert torch.allclose(quantizer.lookup(output.indices), output.quantized, atol=1e-6)
        assert output.metrics["usage"].item() == pytest.approx(
            sum(output.metrics[f"usage_q{q}"].item() for q in range(num_active)) / num_active, rel=1e-6)
        active_counts.append(num_active)
    assert len(set(active_counts)) >= 3  # the number of levels really varies between batches


def test_quantizer_dropout_is_seeded_and_off_by_default():
    def active_counts(quantizer):
        quantizer.train()
        return [int((quantizer(random_inputs(seed=s)).indices >= 0).all(dim=(0, 1)).sum()) for s in range(8)]

    first = active_counts(make_quantizer(num_quantizers=4, quantizer_dropout=0.5, seed=2))
    assert first == active_counts(make_quantizer(num_quantizers=4, quantizer_dropout=0.5, seed=2))
    assert min(first) < 4
    assert active_counts(make_quantizer(num_quantizers=4)) == [4] * 8


def test_lookup_refuses_the_wrong_number_of_levels():
    with pytest.raises(ValueError, match=r"\(b n q\)"):
        make_quantizer().lookup(torch.zeros(2, 6, dtype=torch.int64))


def test_config_round_trip_and_validation():
    config = ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=32, use_cosine=True),
                              quantizer_dropout=0.25)
    as_json = json.loads(json.dumps(dataclasses.asdict(config)))
    assert as_json["kind"] == "residual_vq" and as_json["quantizer"]["kind"] == "vq"
    assert quantizer_config_from_dict(as_json) == config
    assert ResidualVectorQuantizer(config, DIM).codebook_size == 32
    for bad in (dict(num_quantizers=0), dict(quantizer_dropout=1.5)):
        with pytest.raises(ValueError):
            ResidualVQConfig(**bad)
    with pytest.raises(ValueError, match="codebook_sise"):
        ResidualVQConfig.from_dict({"quantizer": {"codebook_sise": 3}})
