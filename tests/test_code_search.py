"""The searched two-stage bound: a valid bound on enumerable cases, never worse than the encoder's."""

import itertools

import pytest
import torch
from einops import rearrange

from pipelines.code_search import distinct_log_sum, search_codes
from priors import HistogramConfig, HistogramPrior
from tests.test_two_stage_bound import binary_images, tiny_bernoulli_vqvae

CODES = 3


@pytest.fixture(scope="module")
def two_stage():
    """A 4x4 Bernoulli VQ-VAE (2x2 tokens of 3 codes) with a joint-histogram prior over its tokens."""
    model = tiny_bernoulli_vqvae(CODES)
    prior = HistogramPrior(HistogramConfig(vocab_size=CODES, seq_len=4, mode="joint", smoothing=0.5))
    prior.fit(rearrange(model.encode(binary_images(64, seed=2)), "b h w -> b (h w)"))

    def log_joint(images, tokens, labels):
        grids = rearrange(tokens, "b (h w) -> b h w", h=2)
        return model.decoder_log_likelihood(images, grids).double() + prior.log_prob(tokens, labels).double()

    return model, log_joint


def test_search_never_loses_and_stays_above_the_exact_nll(two_stage):
    model, log_joint = two_stage
    x = binary_images(32, seed=3)
    tokens = rearrange(model.encode(x), "b h w -> b (h w)")
    result = search_codes(log_joint, x, tokens, None, CODES, sweeps=2)
    grids = torch.tensor(list(itertools.product(range(CODES), repeat=4)))  # all 81 token grids
    joint = torch.stack([log_joint(x, grids[k].expand(len(x), -1), None) for k in range(len(grids))])
    exact_log_px = torch.logsumexp(joint, dim=0)
    torch.testing.assert_close(result.start_log_joint, log_joint(x, tokens, None))
    torch.testing.assert_close(result.log_joint, log_joint(x, result.tokens, None))  # the reported joint is the codes'
    assert (result.log_joint >= result.start_log_joint).all()
    assert (result.log_joint <= exact_log_px + 1e-9).all()  # still a bound: p(x) >= p(x | z) p(z)
    # summing p(x, z) over the distinct codes visited: tighter, and still below the exact log p(x)
    assert (result.log_sum_joint > result.log_joint).all()
    assert (result.log_sum_joint <= exact_log_px + 1e-9).all()
    assert (result.log_joint > result.start_log_joint + 1e-6).any()  # and here it does find shorter codes
    torch.testing.assert_close(result.changed_positions, (result.tokens != tokens).sum(dim=1))


def test_search_ends_where_no_single_token_change_helps(two_stage):
    """Coordinate ascent run to its fixed point: every one-token neighbour has a lower or equal joint."""
    model, log_joint = two_stage
    x = binary_images(16, seed=4)
    result = search_codes(log_joint, x, rearrange(model.encode(x), "b h w -> b (h w)"), None, CODES, sweeps=4)
    for position, token in itertools.product(range(4), range(CODES)):
        neighbour = result.tokens.clone()
        neighbour[:, position] = token
        assert (log_joint(x, neighbour, None) <= result.log_joint + 1e-9).all()


def test_search_from_the_best_codes_changes_nothing(two_stage):
    model, log_joint = two_stage
    x = binary_images(8, seed=5)
    grids = torch.tensor(list(itertools.product(range(CODES), repeat=4)))
    joint = torch.stack([log_joint(x, grids[k].expand(len(x), -1), None) for k in range(len(grids))])
    best = grids[joint.argmax(dim=0)]
    result = search_codes(log_joint, x, best, None, CODES)
    assert torch.equal(result.tokens, best) and (result.changed_positions == 0).all()
    with pytest.raises(ValueError, match="sweeps"):
        search_codes(log_joint, x, best, None, CODES, sweeps=0)
    with pytest.raises(ValueError, match="small codebooks"):
        search_codes(log_joint, x, best, None, 20_000, sweeps=1)


def test_distinct_log_sum_counts_each_code_once():
    codes = torch.tensor([[[0, 1], [1, 0], [0, 1]], [[1, 1], [1, 1], [1, 1]]])
    scores = torch.tensor([[0.2, 0.3, 0.2], [0.1, 0.1, 0.1]]).log().double()
    torch.testing.assert_close(distinct_log_sum(codes, scores), torch.tensor([0.5, 0.1]).log().double())
