"""Tests of lookup-free quantisation: the bit <-> index bijection, the entropy terms (exact, grouped
and factorised), the 2^18-code path without (tokens x 2^18) tensors, metrics, subsampling, configs."""

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

import tokenizers_vq.quantizers.lfq as lfq_module
from tokenizers_vq.quantizers import LFQConfig, LookupFreeQuantizer
from tokenizers_vq.quantizers.lfq import (
    bit_groups,
    bits_to_indices,
    exact_entropy_terms,
    factorised_entropy_terms,
    grouped_entropy_terms,
    indices_to_bits,
)


def random_inputs(batch=2, length=16, dim=4, seed=0, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


def test_index_is_the_bit_pattern_of_the_signs():
    quantizer = LookupFreeQuantizer(LFQConfig(bits=3, code_scale=0.5), 3).eval()
    z = torch.tensor([[[0.3, -2.0, 1.0], [-0.1, -0.1, -0.1], [1.0, 1.0, 1.0], [0.0, 5.0, -1.0]]])
    output = quantizer(z)
    assert output.indices.tolist() == [[1 + 4, 0, 7, 2]]  # bit i (channel i) weighs 2^i; 0 -> bit 0
    assert torch.equal(output.quantized, 0.5 * torch.sign(z).where(z != 0, torch.tensor(-1.0)))


def test_all_64_codes_of_six_bits_are_a_bijection():
    quantizer = LookupFreeQuantizer(LFQConfig(bits=6), 6).eval()
    indices = torch.arange(64)
    codes = quantizer.lookup(indices[None])[0]
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.unique(codes, dim=0).shape[0] == 64  # distinct codes for distinct indices
    assert torch.equal(quantizer.to_indices(codes[None])[0], indices)
    assert torch.equal(bits_to_indices(indices_to_bits(indices, 6)), indices)


def test_random_indices_round_trip_at_eighteen_bits():
    quantizer = LookupFreeQuantizer(LFQConfig(bits=18), 18).eval()
    indices = torch.randint(2**18, (3, 500), generator=torch.Generator().manual_seed(1))
    assert torch.equal(quantizer.to_indices(quantizer.lookup(indices)), indices)
    assert torch.equal(bits_to_indices(indices_to_bits(indices, 18)), indices)
    with pytest.raises(ValueError, match="indices must lie"):
        quantizer.lookup(torch.tensor([[2**18]]))


def brute_force_entropies(x, code_scale, temperature):
    """Both entropies straight from the definition, q(c | x) = softmax_c(-||x - c||^2 / temperature)."""
    num_bits = x.shape[-1]
    codes = code_scale * (2.0 * indices_to_bits(torch.arange(2**num_bits), num_bits) - 1.0)
    probabilities = (-torch.cdist(x.double(), codes.double()).pow(2) / temperature).softmax(dim=-1)
    per_sample = -(probabilities * probabilities.clamp_min(1e-300).log()).sum(dim=-1).mean()
    average = probabilities.mean(dim=0)
    return per_sample, -(average * average.clamp_min(1e-300).log()).sum()


def test_exact_and_factorised_entropies_agree_where_they_must():
    x = random_inputs(batch=1, length=40, dim=5, scale=0.02)[0]
    reference_per_sample, reference_codebook = brute_force_entropies(x, 1.5, 0.01)
    exact_per_sample, exact_codebook = exact_entropy_terms(x, 1.5, 0.01)
    per_sample, codebook = factorised_entropy_terms(x, 1.5, 0.01)
    assert exact_codebook.item() == pytest.approx(reference_codebook.item(), rel=1e-4)
    # q(c | x) factorises over bits, so the per-sample entropy is exact in both forms; the codebook
    # entropy is bounded by the sum of its marginals' entropies, with a real gap for these bits.
    assert per_sample.item() == pytest.approx(reference_per_sample.item(), rel=1e-4)
    assert exact_per_sample.item() == pytest.approx(reference_per_sample.item(), rel=1e-4)
    assert codebook.item() > exact_codebook.item() + 0.1
    assert 0.0 < exact_codebook.item() <= 5 * torch.log(torch.tensor(2.0)).item() + 1e-5
    # With one bit there is nothing to factorise: both forms are the same number.
    one_bit = x[:, :1]
    assert torch.allclose(torch.stack(exact_entropy_terms(one_bit, 1.0, 0.01)),
                          torch.stack(factorised_entropy_terms(one_bit, 1.0, 0.01)), rtol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return result


def test_grouped_entropy_lies_between_the_joint_and_the_per_bit_bound():
    x = random_inputs(batch=1, length=60, dim=6, scale=0.02)[0]
    exact = exact_entropy_terms(x, 1.0, 0.01)
    per_bit = factorised_entropy_terms(x, 1.0, 0.01)
    # one group is the exact entropy, groups of one bit are the per-bit bound
    assert torch.allclose(torch.stack(grouped_entropy_terms(x, 1.0, 0.01, 6)), torch.stack(exact), rtol=1e-5)
    assert torch.allclose(torch.stack(grouped_entropy_terms(x, 1.0, 0.01, 1)), torch.stack(per_bit), rtol=1e-4)
    per_sample, grouped = grouped_entropy_terms(x, 1.0, 0.01, 3)
    assert per_sample.item() == pytest.approx(exact[0].item(), rel=1e-5)
    assert exact[1].item() - 1e-5 <= grouped.item() <= per_bit[1].item() + 1e-5
    assert per_bit[1].item() - exact[1].item() > 0.1  # the bounds differ here, so the test can tell them apart


@pytest.mark.parametrize("num_bits, max_bits, expected", [(14, 12, [7, 7]), (18, 12, [9, 9]), (16, 12, [8, 8]),
                                                          (13, 6, [5, 4, 4]), (10, 12, [10]), (5, 1, [1] * 5)])
def test_bit_groups_are_few_near_equal_and_within_the_cap(num_bits, max_bits, expected):
    assert bit_groups(num_bits, max_bits) == expected


def record_entropy_groups(monkeypatch) -> list[int]:
    """Widths of every (t k) input the exact entropy is called with."""
    widths = []
    original = lfq_module.exact_entropy_terms
    monkeypatch.setattr(lfq_module, "exact_entropy_terms", lambda x, *a: widths.append(x.shape[-1]) or original(x, *a))
    return widths


@pytest.mark.parametrize("max_bits, expected_widths", [(20, [18]), (12, [9, 9])])
def test_eighteen_bits_never_materialise_a_tokens_by_codebook_tensor(monkeypatch, max_bits, expected_widths):
    widths = record_entropy_groups(monkeypatch)
    quantizer = LookupFreeQuantizer(LFQConfig(bits=18, exact_entropy_max_bits=max_bits), 18).train()
    assert quantizer.uses_exact_entropy == (max_bits >= 18)
    z = random_inputs(batch=2, length=64, dim=18).requires_grad_()
    with LargestTensor() as guard:
        output = quantizer(z)
        output.aux_loss.backward()
    assert widths == expected_widths  # the whole codebook, or two sub-codebooks of 2^9 codes
    # (2^18,) vectors (usage counts, the average q) are the largest tensors; (tokens x 2^18) would be 128 times larger.
    assert guard.largest <= 2**18 < 2 * 64 * 2**18
    assert torch.isfinite(output.aux_loss) and z.grad.abs().sum() > 0
    assert output.metrics["usage"].item() == pytest.approx(128 / 2**18)


def test_threshold_selects_the_exact_form_for_small_codebooks(monkeypatch):
    widths = record_entropy_groups(monkeypatch)
    LookupFreeQuantizer(LFQConfig(bits=4, exact_entropy_max_bits=4), 4)(random_inputs())
    assert widths == [4]
    LookupFreeQuantizer(LFQConfig(bits=4, exact_entropy_max_bits=3), 4)(random_inputs())
    assert widths == [4, 2, 2]


def test_usage_perplexity_and_dead_codes_on_a_hand_made_batch():
    quantizer = LookupFreeQuantizer(LFQConfig(bits=2), 2).eval()
    # Codes 3, 3, 0, 1 (bits (1,1), (1,1), (0,0), (1,0)).
    z = torch.tensor([[[1.0, 2.0], [0.5, 0.5], [-1.0, -1.0], [3.0, -3.0]]])
    output = quantizer(z)
    assert output.indices.tolist() == [[3, 3, 0, 1]]
    probabilities = torch.tensor([0.5, 0.25, 0.25])
    assert output.metrics["usage"].item() == pytest.approx(3 / 4)
    assert output.metrics["perplexity"].item() == pytest.approx(torch.exp(-(probabilities * probabilities.log()).sum()).item())
    assert output.metrics["dead_codes"].item() == 1  # code 2 unused in this batch


def test_aux_loss_is_entropy_minus_diversity_plus_commitment():
    config = LFQConfig(bits=3, entropy_weight=0.3, commitment_weight=0.7, diversity_gamma=2.0, entropy_temperature=0.5)
    quantizer = LookupFreeQuantizer(config, 3).eval()
    z = random_inputs(dim=3, scale=0.5)
    output = quantizer(z)
    per_sample, codebook = exact_entropy_terms(z.reshape(-1, 3), 1.0, 0.5)
    commitment = (z - torch.where(z > 0, 1.0, -1.0)).pow(2).mean()
    expected = 0.3 * (per_sample - 2.0 * codebook) + 0.7 * commitment
    assert output.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_entropy_loss_spreads_a_collapsed_batch_over_the_codebook():
    torch.manual_seed(0)  # Adam has no generator argument; this test's inputs are seeded below
    quantizer = LookupFreeQuantizer(LFQConfig(bits=4, entropy_weight=1.0, commitment_weight=0.0,
                                              entropy_temperature=0.1), 4).train()
    z = (0.3 + random_inputs(batch=1, length=64, scale=0.05)).requires_grad_()  # every token on code 15
    assert quantizer(z).metrics["usage"].item() == pytest.approx(1 / 16)
    optimizer = torch.optim.Adam([z], lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        quantizer(z).aux_loss.backward()
        optimizer.step()
    assert quantizer(z).metrics["usage"].item() >= 0.75


def test_entropy_subsampling_is_seeded_and_training_only():
    config = LFQConfig(bits=4, entropy_subsample=0.25, seed=3)
    first, second = LookupFreeQuantizer(config, 4).train(), LookupFreeQuantizer(config, 4).train()
    full = LookupFreeQuantizer(LFQConfig(bits=4, seed=3), 4).train()
    z = random_inputs(length=32)
    losses = [first(z).aux_loss, first(z).aux_loss]
    assert torch.equal(losses[0], second(z).aux_loss)  # same seed and step: same subset
    assert losses[0] != losses[1]  # the subset changes with the step counter
    assert losses[0] != full(z).aux_loss
    assert torch.equal(first.eval()(z).aux_loss, full.eval()(z).aux_loss)  # evaluation uses every token
    assert int(first.training_steps) == 2


def test_projection_when_input_dim_differs_from_bits():
    quantizer = LookupFreeQuantizer(LFQConfig(bits=6), 4)
    assert quantizer.project_in.weight.shape == (6, 4) and quantizer.project_out.weight.shape == (4, 6)
    assert LookupFreeQuantizer(LFQConfig(bits=4), 4).project_in is None
    assert list(LookupFreeQuantizer(LFQConfig(bits=4), 4).parameters()) == []
    # Seeded from the config alone, not from the global RNG.
    torch.manual_seed(123)
    again = LookupFreeQuantizer(LFQConfig(bits=6), 4)
    assert torch.equal(again.project_in.weight, quantizer.project_in.weight)


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=25), dict(entropy_temperature=0.0),
                                 dict(entropy_subsample=0.0), dict(entropy_weight=-1.0), dict(kind="vq")])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValueError):
        LFQConfig(**bad)


def test_chunked_codebook_entropy_matches_plain_autograd_in_value_and_gradient(monkeypatch):
    # 5 bits split 3 + 2: 2^3 + 2^2 = 12 sub-code probabilities per token, 3 tokens per chunk, 17 tokens in 6 chunks
    monkeypatch.setattr(lfq_module, "CHUNK_ELEMENTS", 3 * 12)
    x = random_inputs(batch=1, length=17, dim=5, scale=0.02)[0].double().requires_grad_()
    reference = x.detach().clone().requires_grad_()
    _, chunked = exact_entropy_terms(x, 1.0, 0.01)
    codes = 2.0 * indices_to_bits(torch.arange(32), 5).double() - 1.0
    average = (2.0 * reference @ codes.t() / 0.01).softmax(dim=-1).mean(dim=0)
    plain = -(average * average.clamp_min(1e-30).log()).sum()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-10)
    chunked.backward()
    plain.backward()
    assert torch.allclose(x.grad, reference.grad, rtol=1e-8, atol=1e-10)
    assert reference.grad.abs().max() > 0
