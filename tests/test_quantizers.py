"""Contract tests of the quantizers: the same checks over every `QUANTIZERS` entry (shapes,
straight-through gradients, index -> lookup -> requantise, fp32 under bf16 autocast, state-dict
round trip), the vector quantizer in detail (EMA, restarts, k-means, fp32, metrics, cosine and
factorised codes), config kinds, and a VQ-VAE built with each quantizer kind."""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import tokenizers_vq.quantizers.vq as vq_module
from tokenizers_vq import TOKENIZERS, VQVAE, VQVAEConfig, load_tokenizer
from tokenizers_vq.quantizers import (
    QUANTIZERS,
    LFQConfig,
    QuantizerOutput,
    ResidualVQConfig,
    VectorQuantizer,
    VQConfig,
    build_quantizer,
    quantizer_config_from_dict,
)
from tokenizers_vq.quantizers.base import code_counts, usage_and_perplexity
from tokenizers_vq.checkpoint import load_state_strictly

DIM = 4


def make_quantizer(**overrides) -> VectorQuantizer:
    config = dataclasses.replace(VQConfig(codebook_size=16), **overrides)
    return VectorQuantizer(config, DIM)


def random_inputs(batch=2, length=10, dim=DIM, seed=1234) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


def test_registry_builds_every_quantizer():
    for kind, (config_cls, quantizer_cls) in QUANTIZERS.items():
        quantizer = quantizer_cls(config_cls(), DIM)
        output = quantizer(random_inputs())
        assert isinstance(output, QuantizerOutput), kind


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_shapes_and_dtypes(ema, training):
    quantizer = make_quantizer(ema=ema).train(training)
    z = random_inputs(batch=3, length=5)
    output = quantizer(z)
    assert output.quantized.shape == (3, 5, DIM) and output.quantized.dtype == z.dtype
    assert output.indices.shape == (3, 5) and output.indices.dtype == torch.int64
    assert output.aux_loss.ndim == 0 and torch.isfinite(output.aux_loss)
    assert set(output.metrics) == {"usage", "perplexity", "dead_codes"}
    assert all(value.ndim == 0 for value in output.metrics.values())
    assert quantizer.codebook_size == 16
    assert quantizer.lookup(output.indices).shape == (3, 5, DIM)


def test_bf16_input_gives_bf16_output():
    quantizer = make_quantizer().eval()
    output = quantizer(random_inputs().bfloat16())
    assert output.quantized.dtype == torch.bfloat16
    assert output.aux_loss.dtype == torch.float32


def test_straight_through_gradient_reaches_input_and_codebook():
    quantizer = make_quantizer(ema=False, dead_code_threshold=0.0).train()
    z = random_inputs().requires_grad_()
    output = quantizer(z)
    output.quantized.sum().backward(retain_graph=True)
    # Straight-through: d quantized / d z is the identity, and the codebook gets nothing from it.
    assert torch.equal(z.grad, torch.ones_like(z))
    assert quantizer.codebook.grad is None or not quantizer.codebook.grad.any()
    z.grad = None
    output.aux_loss.backward()
    assert z.grad.abs().sum() > 0  # commitment term
    used = torch.zeros(16, dtype=torch.bool)
    used[output.indices.flatten()] = True
    row_has_grad = quantizer.codebook.grad.abs().sum(dim=1) > 0
    assert torch.equal(row_has_grad, used)  # the codebook term moves exactly the used codes


def rotation_matrices(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n d), (n d) -> (n d d): the rotation taking each source direction to its target's, built whole."""
    source_unit = torch.nn.functional.normalize(source, dim=-1)
    target_unit = torch.nn.functional.normalize(target, dim=-1)
    reflector = torch.nn.functional.normalize(source_unit + target_unit, dim=-1)
    eye = torch.eye(source.shape[1]).expand(source.shape[0], -1, -1)
    return (eye - 2 * reflector[:, :, None] * reflector[:, None, :]
            + 2 * target_unit[:, :, None] * source_unit[:, None, :])


def test_rotation_trick_keeps_the_codes_and_rotates_the_gradient():
    quantizer = make_quantizer(ema=False, dead_code_threshold=0.0, rotation_trick=True).train()
    z = random_inputs(batch=2, length=6).requires_grad_()
    output = quantizer(z)
    codes = quantizer.lookup(output.indices)
    assert torch.allclose(output.quantized, codes, atol=1e-6)  # the forward values are the codes
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    (output.quantized * upstream).sum().backward()
    flat_z, flat_codes = z.detach().reshape(-1, DIM), codes.detach().reshape(-1, DIM)
    rotations = rotation_matrices(flat_z, flat_codes)
    # Each R really is a rotation onto the code's direction: orthogonal, and R z^ = q^.
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(DIM).expand_as(rotations), atol=1e-5)
    mapped = (rotations @ torch.nn.functional.normalize(flat_z, dim=-1)[:, :, None])[..., 0]
    assert torch.allclose(mapped, torch.nn.functional.normalize(flat_codes, dim=-1), atol=1e-5)
    scale = flat_codes.norm(dim=-1) / flat_z.norm(dim=-1)
    expected = scale[:, None] * (rotations.transpose(1, 2) @ upstream.reshape(-1, DIM, 1))[..., 0]
    assert torch.allclose(z.grad.reshape(-1, DIM), expected, atol=1e-5)
    assert not torch.allclose(z.grad, upstream, atol=1e-2)  # not the straight-through copy
    assert quantizer.codebook.grad is None or not quantizer.codebook.grad.any()  # codes learn from aux_loss only


def test_rotation_trick_on_a_code_in_the_inputs_direction_only_rescales():
    quantizer = make_quantizer(ema=False, dead_code_threshold=0.0, rotation_trick=True).train()
    with torch.no_grad():  # codes 0-3 on the axes at length 2, the rest far away
        quantizer.codebook.copy_(torch.cat([2 * torch.eye(DIM), torch.full((12, DIM), 50.0)]))
    z = (0.5 * quantizer.lookup(torch.arange(4)[None])).detach().requires_grad_()
    output = quantizer(z)
    assert torch.equal(output.indices, torch.arange(4)[None])
    output.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 2.0), atol=1e-5)  # |q| / |z| = 2, no rotation


@pytest.mark.parametrize("use_cosine, codebook_dim", [(True, 0), (False, 4)])
def test_rotation_trick_trains_through_normalised_and_factorised_codes(use_cosine, codebook_dim):
    quantizer = make_quantizer(ema=False, rotation_trick=True, use_cosine=use_cosine, codebook_dim=codebook_dim).train()
    z = random_inputs().requires_grad_()
    output = quantizer(z)
    assert torch.allclose(output.quantized, quantizer.lookup(output.indices), atol=1e-5)
    output.quantized.square().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("num_quantizers", [1, 2])
def test_residual_vq_rotates_the_input_onto_the_total(num_quantizers):
    level = VQConfig(codebook_size=16, ema=False, dead_code_threshold=0.0, rotation_trick=True)
    quantizer = build_quantizer(ResidualVQConfig(num_quantizers=num_quantizers, quantizer=level), DIM).train()
    z = random_inputs(batch=2, length=6).requires_grad_()
    output = quantizer(z)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    (output.quantized * upstream).sum().backward()
    flat_z, total = z.detach().reshape(-1, DIM), output.quantized.detach().reshape(-1, DIM)
    scale = total.norm(dim=-1) / flat_z.norm(dim=-1)
    expected = scale[:, None] * (rotation_matrices(flat_z, total).transpose(1, 2) @ upstream.reshape(-1, DIM, 1))[..., 0]
    assert torch.allclose(z.grad.reshape(-1, DIM), expected, atol=1e-5)  # not the straight-through copy
    if num_quantizers == 1:  # one level: exactly a VectorQuantizer's rotation-trick gradient
        single = VectorQuantizer(level, DIM).train()
        single.load_state_dict(quantizer.levels[0].state_dict())
        z_single = z.detach().clone().requires_grad_()
        (single(z_single).quantized * upstream).sum().backward()
        assert torch.allclose(z.grad, z_single.grad, atol=1e-6)


def test_ema_codebook_is_a_buffer_without_gradient():
    quantizer = make_quantizer(ema=True)
    assert "codebook" in dict(quantizer.named_buffers())
    assert len(list(quantizer.parameters())) == 0


def test_lookup_then_requantize_gives_the_same_indices():
    quantizer = make_quantizer().eval()
    indices = torch.randint(16, (3, 7), generator=torch.Generator().manual_seed(1))
    codes = quantizer.lookup(indices)
    assert torch.equal(quantizer.to_indices(codes), indices)
    assert torch.equal(quantizer(codes).indices, indices)


def test_ema_update_changes_only_used_codes_and_only_in_training():
    config = dict(ema=True, decay=0.9, dead_code_threshold=1.0)
    quantizer = make_quantizer(**config)
    quantizer.cluster_size.fill_(100.0)  # far above the threshold: no restarts in this test
    quantizer.embed_sum.copy_(quantizer.codebook * 100.0)
    codebook_before = quantizer.codebook.clone()
    state_before = {name: tensor.clone() for name, tensor in quantizer.state_dict().items()}
    # Inputs next to codes 2 and 5 only.
    z = torch.stack([codebook_before[2] + 0.01, codebook_before[5] - 0.01, codebook_before[2] - 0.01])[None]

    quantizer.eval()(z)
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(tensor, state_before[name]), f"{name} changed in eval mode"

    quantizer.train()(z)
    counts = torch.zeros(16)
    counts[2], counts[5] = 2.0, 1.0
    sums = torch.zeros(16, DIM)
    sums[2], sums[5] = z[0, 0] + z[0, 2], z[0, 1]
    cluster_size = 0.9 * 100.0 + 0.1 * counts
    embed_sum = 0.9 * codebook_before * 100.0 + 0.1 * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (total + 16 * 1e-5) * total
    assert torch.allclose(quantizer.cluster_size, cluster_size)
    assert torch.allclose(quantizer.embed_sum, embed_sum)
    for code in (2, 5):
        assert torch.allclose(quantizer.codebook[code], embed_sum[code] / smoothed[code])
        assert not torch.equal(quantizer.codebook[code], codebook_before[code])
    unused = [code for code in range(16) if code not in (2, 5)]
    assert torch.equal(quantizer.codebook[unused], codebook_before[unused])
    assert int(quantizer.training_steps) == 1


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_replaces_exactly_the_dead_codes(ema):
    quantizer = make_quantizer(ema=ema, decay=0.99, dead_code_threshold=1.0).train()
    dead_codes = [1, 4, 9, 15]
    quantizer.cluster_size.fill_(500.0)
    quantizer.cluster_size[dead_codes] = 0.5
    if ema:
        quantizer.embed_sum.copy_(quantizer.codebook * 500.0)
    codebook_before = quantizer.codebook.detach().clone()
    # Inputs sit exactly on live codes: an EMA step may nudge those (smoothing), nothing else moves.
    live_indices = torch.tensor([[0, 2, 3, 0, 2, 3, 5, 6]])
    used_codes = {0, 2, 3, 5, 6}
    z = quantizer.lookup(live_indices).detach().clone().requires_grad_()
    output = quantizer(z)
    changed = (quantizer.codebook.detach() != codebook_before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(set(changed) - used_codes) == dead_codes
    assert torch.allclose(quantizer.codebook.detach()[sorted(used_codes)], codebook_before[sorted(used_codes)])
    flat_inputs = z.detach()[0]
    for code in dead_codes:  # each replacement is one of this batch's encoder outputs
        assert (quantizer.codebook.detach()[code] == flat_inputs).all(dim=1).any()
    assert output.metrics["dead_codes"].item() == len(dead_codes)
    assert torch.all(quantizer.cluster_size[dead_codes] == 1.0)
    output.aux_loss.backward()  # the in-place restart must not break the backward pass
    assert z.grad is not None


def test_restart_sampling_is_seeded_and_reproducible():
    codebooks = []
    for _ in range(2):
        quantizer = make_quantizer(seed=7).train()
        for step in range(3):
            quantizer(random_inputs(seed=step))
        codebooks.append(quantizer.codebook.clone())
    assert torch.equal(codebooks[0], codebooks[1])
    other = make_quantizer(seed=8).train()
    for step in range(3):
        other(random_inputs(seed=step))
    assert not torch.equal(other.codebook, codebooks[0])


def test_kmeans_initialisation_runs_once_and_survives_reload(monkeypatch):
    calls = []
    original = vq_module.kmeans

    def counting_kmeans(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vq_module, "kmeans", counting_kmeans)
    generator = torch.Generator().manual_seed(3)
    centers = torch.eye(DIM)[:2] * 10.0  # two well-separated clusters
    z = (centers[torch.arange(40) % 2] + 0.01 * torch.randn(40, DIM, generator=generator))[None]
    quantizer = make_quantizer(codebook_size=2, kmeans_init=True, kmeans_iters=5, dead_code_threshold=0.0)
    quantizer.eval()(z)
    assert calls == []  # evaluation never initialises
    quantizer.train()(z)
    assert calls == [1] and bool(quantizer.kmeans_initialized)
    found = sorted(quantizer.codebook.tolist())
    assert torch.allclose(torch.tensor(found), centers.flip(0), atol=0.05)
    quantizer(z)
    quantizer(z)
    assert calls == [1]
    reloaded = make_quantizer(codebook_size=2, kmeans_init=True, kmeans_iters=5, dead_code_threshold=0.0)
    reloaded.load_state_dict(quantizer.state_dict(), strict=True)
    reloaded.train()(z)
    assert calls == [1]


def test_distances_are_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 8, generator=generator) + 20.0  # large norms: bf16 cancellation is severe
    z = codebook[torch.randint(64, (1, 200), generator=generator)] + 0.3 * torch.randn(1, 200, 8, generator=generator)
    quantizer = VectorQuantizer(VQConfig(codebook_size=64, dead_code_threshold=0.0), 8).eval()
    quantizer.codebook.copy_(codebook)
    reference = quantizer(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The same formula without the local fp32 guard flips many indices: the test can fail.
        naive = (z[0].pow(2).sum(1, keepdim=True) - 2 * z[0] @ codebook.t() + codebook.pow(2).sum(1)).argmin(1)
        assert (naive != reference[0]).any()
        output = quantizer(z)
        to_indices = quantizer.to_indices(z)
    assert torch.equal(output.indices, reference)
    assert torch.equal(to_indices, reference)


def test_nearest_codes_in_chunks_of_rows_equal_the_whole_search():
    generator = torch.Generator().manual_seed(3)
    vectors, codebook = torch.randn(300, 16, generator=generator), torch.randn(50, 16, generator=generator)
    expected = torch.cdist(vectors, codebook).argmin(dim=1)
    for chunk_entries in (1, 50 * 7, 10**9):  # one row, 7 rows (a ragged last chunk), everything at once
        assert torch.equal(vq_module.nearest_codes(vectors, codebook, chunk_entries=chunk_entries), expected)
    assert vq_module.nearest_codes(vectors[:0], codebook).shape == (0,)


def test_usage_and_perplexity_on_hand_made_counts():
    usage, perplexity = usage_and_perplexity(torch.tensor([2, 2, 0, 0]))
    assert usage.item() == pytest.approx(0.5) and perplexity.item() == pytest.approx(2.0)
    usage, perplexity = usage_and_perplexity(torch.tensor([4, 0, 0, 0]))
    assert usage.item() == pytest.approx(0.25) and perplexity.item() == pytest.approx(1.0)
    usage, perplexity = usage_and_perplexity(torch.tensor([3, 1, 0, 0]))
    entropy = -(0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(torch.tensor(0.25)))
    assert usage.item() == pytest.approx(0.5) and perplexity.item() == pytest.approx(torch.exp(entropy).item())
    assert torch.equal(code_counts(torch.tensor([[0, 3], [3, 3]]), 5), torch.tensor([1, 0, 0, 3, 0]))
    with pytest.raises(ValueError, match="indices must lie"):
        code_counts(torch.tensor([5]), 5)


def test_forward_metrics_on_hand_made_batch():
    quantizer = make_quantizer().eval()
    z = quantizer.lookup(torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]]))
    metrics = quantizer(z).metrics
    probabilities = torch.tensor([0.25, 0.5, 0.25])
    expected_perplexity = torch.exp(-(probabilities * probabilities.log()).sum())
    assert metrics["usage"].item() == pytest.approx(3 / 16)
    assert metrics["perplexity"].item() == pytest.approx(expected_perplexity.item())
    assert metrics["dead_codes"].item() == 0  # fresh cluster sizes equal the threshold


def test_config_from_dict_rejects_unknown_keys():
    assert VQConfig.from_dict({"codebook_size": 8}) == VQConfig(codebook_size=8)
    with pytest.raises(ValueError, match=r"codebook_sise.*valid keys:.*codebook_size"):
        VQConfig.from_dict({"codebook_sise": 8})
    with pytest.raises(ValueError, match="decay"):
        VQConfig(decay=1.5)


def test_init_scale_scales_the_initial_codes_and_must_be_positive():
    plain = VectorQuantizer(VQConfig(codebook_size=256, seed=3), DIM)
    small = VectorQuantizer(VQConfig(codebook_size=256, seed=3, init_scale=0.01), DIM)
    torch.testing.assert_close(small.codebook, 0.01 * plain.codebook)  # same draw, scaled
    torch.testing.assert_close(small.embed_sum, small.codebook)  # EMA sums consistent with unit cluster sizes
    assert 0.5 < plain.codebook.std().item() < 1.5
    with pytest.raises(ValueError, match="init_scale"):
        VQConfig(init_scale=0.0)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(b n d\)"):
        make_quantizer()(torch.randn(2, 3, DIM + 1))


# --- two processes: statistics all-reduced, codebooks identical -------------------------------------


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        quantizer = make_quantizer(kmeans_init=True, kmeans_iters=2, seed=5).train()
        local_counts = torch.zeros(16, dtype=torch.int64)
        for step in range(3):  # each rank sees different data
            output = quantizer(random_inputs(batch=2, length=6, seed=100 * rank + step))
        local_counts += code_counts(output.indices, 16)
        save_file(
            {"codebook": quantizer.codebook, "cluster_size": quantizer.cluster_size, "counts": local_counts,
             "usage": output.metrics["usage"], "perplexity": output.metrics["perplexity"]},
            os.path.join(out_dir, f"rank{rank}.safetensors"),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_identical_codebooks_and_global_metrics(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2))
    assert torch.equal(rank0["codebook"], rank1["codebook"])
    assert torch.equal(rank0["cluster_size"], rank1["cluster_size"])
    usage, perplexity = usage_and_perplexity(rank0["counts"] + rank1["counts"])
    assert rank0["usage"].item() == pytest.approx(usage.item())
    assert rank1["perplexity"].item() == pytest.approx(perplexity.item())
    _, local_perplexity = usage_and_perplexity(rank0["counts"])  # the check could tell local from global
    assert local_perplexity.item() != pytest.approx(perplexity.item())


# --- the same contract over every registry entry --------------------------------------------------


def _shrink_residual_levels(quantizer) -> None:
    # Requantising a sum of codes recovers every index when each level's codes are far smaller than
    # the previous level's spacing, as after training; random initial codebooks are all alike.
    with torch.no_grad():
        for level, vector_quantizer in enumerate(quantizer.levels):
            vector_quantizer.codebook.mul_(0.02**level)
            vector_quantizer.embed_sum.mul_(0.02**level)


# name: (config, input dim, exact inverse (requantising lookup(i) gives i), preparation)
CASES = {
    "vq": (VQConfig(codebook_size=16, seed=1), DIM, True, None),
    "vq_cosine_factorised": (VQConfig(codebook_size=16, use_cosine=True, codebook_dim=3, ema=False), DIM, False, None),
    "lfq": (LFQConfig(bits=4), 4, True, None),
    "lfq_projected": (LFQConfig(bits=5, entropy_subsample=0.5), DIM, False, None),
    "residual_vq": (ResidualVQConfig(num_quantizers=3, quantizer=VQConfig(codebook_size=16)), DIM, True,
                    _shrink_residual_levels),
}


def build_case(name):
    config, dim, exact_inverse, prepare = CASES[name]
    quantizer = build_quantizer(config, dim)
    if prepare is not None:
        prepare(quantizer)
    return quantizer, dim, exact_inverse


def test_every_registry_kind_has_a_contract_case():
    assert {config.kind for config, *_ in CASES.values()} == set(QUANTIZERS)


def index_shape(quantizer, batch, length):
    return (batch, length) if quantizer.num_codebooks == 1 else (batch, length, quantizer.num_codebooks)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_contract_shapes_dtypes_and_metrics(name, training):
    quantizer, dim, _ = build_case(name)
    quantizer.train(training)
    z = random_inputs(batch=3, length=5, dim=dim)
    output = quantizer(z)
    assert isinstance(output, QuantizerOutput)
    assert output.quantized.shape == z.shape and output.quantized.dtype == z.dtype
    assert output.indices.shape == index_shape(quantizer, 3, 5) and output.indices.dtype == torch.int64
    assert int(output.indices.min()) >= 0 and int(output.indices.max()) < quantizer.codebook_size
    assert output.aux_loss.ndim == 0 and torch.isfinite(output.aux_loss)
    assert {"usage", "perplexity", "dead_codes"} <= set(output.metrics)
    assert all(value.ndim == 0 and torch.isfinite(value) for value in output.metrics.values())
    assert quantizer.lookup(output.indices).shape == z.shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_straight_through_gradients(name):
    quantizer, dim, exact_inverse = build_case(name)
    quantizer.train()
    z = random_inputs(dim=dim).requires_grad_()
    output = quantizer(z)
    output.quantized.sum().backward(retain_graph=True)
    if getattr(quantizer, "project_in", None) is None and not getattr(quantizer.config, "use_cosine", False):
        assert torch.equal(z.grad, torch.ones_like(z))  # the identity, straight through
    else:  # through the projections/normalisation around the code space
        assert z.grad.abs().sum() > 0
        assert quantizer.project_in.weight.grad.abs().sum() > 0
    z.grad = None
    output.aux_loss.backward()
    assert z.grad.abs().sum() > 0  # commitment (and entropy) terms reach the encoder


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_indices_lookup_and_requantise(name):
    quantizer, dim, exact_inverse = build_case(name)
    quantizer.eval()
    z = random_inputs(batch=2, length=9, dim=dim)
    output = quantizer(z)
    assert torch.equal(quantizer.to_indices(z), output.indices)
    assert torch.allclose(quantizer.lookup(output.indices), output.quantized, atol=1e-5)
    if exact_inverse:
        size = index_shape(quantizer, 3, 7)
        indices = torch.randint(quantizer.codebook_size, size, generator=torch.Generator().manual_seed(4))
        codes = quantizer.lookup(indices)
        assert torch.equal(quantizer.to_indices(codes), indices)
        assert torch.equal(quantizer(codes).indices, indices)


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_fp32_under_bf16_autocast(name):
    quantizer, dim, _ = build_case(name)
    quantizer.eval()
    # A large common offset: rounding the inputs or projections to bf16 would move many indices.
    z = 30.0 + random_inputs(batch=2, length=50, dim=dim)
    if name.startswith("lfq") and getattr(quantizer, "project_in", None) is None:
        z = z - 30.0  # signs of the raw input: centre them so every code can occur
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = quantizer(z)
        to_indices = quantizer.to_indices(z)
    assert torch.equal(output.indices, reference.indices) and torch.equal(to_indices, reference.indices)
    assert output.quantized.dtype == torch.float32 and output.aux_loss.dtype == torch.float32
    assert torch.allclose(output.quantized, reference.quantized)
    bf16_output = quantizer(z.bfloat16())
    assert bf16_output.quantized.dtype == torch.bfloat16 and bf16_output.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_state_dict_round_trip(name, tmp_path):
    quantizer, dim, _ = build_case(name)
    quantizer.train()
    for seed in range(2):  # training moves EMA statistics, step counters, codebooks
        quantizer(random_inputs(dim=dim, seed=seed))
    save_file({key: value.contiguous() for key, value in quantizer.state_dict().items()}, tmp_path / "q.safetensors")
    reloaded, _, _ = build_case(name)
    load_state_strictly(reloaded, load_file(tmp_path / "q.safetensors"), tmp_path / "q.safetensors")
    for key, value in quantizer.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    z = random_inputs(dim=dim, seed=9)
    assert torch.equal(reloaded.eval()(z).quantized, quantizer.eval()(z).quantized)
    # Training continues identically after the reload (seeded restarts, subsampling, dropout).
    next_batch = random_inputs(dim=dim, seed=10)
    assert torch.equal(reloaded.train()(next_batch).aux_loss, quantizer.train()(next_batch).aux_loss)


# --- config kinds and the registry helpers ------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_config_kind_survives_asdict_and_rebuilds(kind):
    config_cls, _ = QUANTIZERS[kind]
    config = config_cls()
    as_json = json.loads(json.dumps(dataclasses.asdict(config)))
    assert as_json["kind"] == kind
    assert quantizer_config_from_dict(as_json) == config
    with pytest.raises(ValueError, match="kind"):
        config_cls(kind="something_else")


def test_config_dispatch_defaults_and_errors():
    assert quantizer_config_from_dict({"codebook_size": 8}) == VQConfig(codebook_size=8)
    with pytest.raises(ValueError, match="valid kinds: lfq, residual_vq, vq"):
        quantizer_config_from_dict({"kind": "fsq"})
    with pytest.raises(ValueError, match="not a registered quantizer config"):
        build_quantizer({"kind": "vq"}, DIM)


# --- cosine and factorised codes ------------------------------------------------------------------


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("use_cosine, codebook_dim", [(True, 0), (False, 2), (True, 2)])
def test_cosine_and_factorised_vq_train_and_stay_consistent(ema, use_cosine, codebook_dim):
    quantizer = make_quantizer(ema=ema, use_cosine=use_cosine, codebook_dim=codebook_dim, kmeans_init=True,
                               kmeans_iters=3, dead_code_threshold=0.5).train()
    code_dim = codebook_dim or DIM
    assert quantizer.codebook.shape == (16, code_dim)
    assert (quantizer.project_in is not None) == (codebook_dim > 0)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.1) if list(quantizer.parameters()) else None
    before = quantizer.codebook.detach().clone()
    for step in range(3):
        output = quantizer(random_inputs(batch=4, length=8, seed=step))
        if optimizer is not None:
            optimizer.zero_grad()
            output.aux_loss.backward()
            optimizer.step()
    assert not torch.equal(quantizer.codebook.detach(), before)
    assert bool(quantizer.kmeans_initialized) and int(quantizer.training_steps) == 3
    codes = quantizer.codes()
    if use_cosine:
        assert torch.allclose(codes.norm(dim=1), torch.ones(16), atol=1e-5)
    quantizer.eval()
    z = random_inputs(seed=11)
    output = quantizer(z)
    # The chosen code has the highest cosine similarity (cosine) / smallest distance in code space.
    flat = quantizer._to_code_space(z.reshape(-1, DIM))
    if use_cosine:
        expected = (flat @ codes.t()).argmax(dim=1)
    else:
        expected = torch.cdist(flat, codes).argmin(dim=1)
    assert torch.equal(output.indices.flatten(), expected)
    assert torch.allclose(quantizer.lookup(output.indices), output.quantized, atol=1e-5)


def test_spherical_kmeans_gives_unit_centroids():
    samples = torch.nn.functional.normalize(random_inputs(batch=1, length=40)[0], dim=1)
    centroids = vq_module.kmeans(samples, 5, 4, torch.Generator().manual_seed(0), spherical=True)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(5), atol=1e-5)


# --- a VQ-VAE with each quantizer kind -------------------------------------------------------------


TOKENIZER_QUANTIZERS = {
    "vq": VQConfig(codebook_size=16, seed=1),
    "lfq": LFQConfig(bits=4),
    "residual_vq": ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=8)),
}


@pytest.mark.parametrize("kind", sorted(TOKENIZER_QUANTIZERS))
def test_vqvae_with_each_quantizer_encodes_decodes_and_reloads(kind, tmp_path):
    quantizer_config = TOKENIZER_QUANTIZERS[kind]
    config = VQVAEConfig(hidden_channels=4, embedding_dim=4, quantizer=quantizer_config)
    model = VQVAE(config).train()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, metrics = model.loss({"pixel_values": x}, "main", step=0)
    loss.backward()
    model.eval()
    tokens = model.encode(x)
    grid_shape = (2, 4, 4) if model.num_codebooks == 1 else (2, 4, 4, model.num_codebooks)
    assert tokens.shape == grid_shape and model.forward(x).indices.shape == grid_shape
    assert model.vocab_size == model.quantizer.codebook_size and int(tokens.max()) < model.vocab_size
    assert model.decode(tokens).shape == x.shape
    with pytest.raises(ValueError, match="token grid"):
        model.decode(tokens[..., 0] if model.num_codebooks > 1 else tokens[..., None])
    model.save_pretrained(tmp_path / "tok")
    stored = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert stored["config"]["quantizer"]["kind"] == kind
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.config == config
    assert torch.equal(loaded.encode(x), tokens) and torch.equal(loaded.decode(tokens), model.decode(tokens))


def test_lfq_tokenizer_kind_round_trips(tmp_path):
    config_cls, model_cls = TOKENIZERS["lfq"]
    config = config_cls.from_dict({"hidden_channels": 4, "embedding_dim": 6, "quantizer": {"bits": 6}})
    assert config.kind == "lfq" and config.quantizer == LFQConfig(bits=6)  # a kind-less table stays LFQ
    assert model_cls(config_cls()).vocab_size == 2**10
    model = model_cls(config).eval()
    model.save_pretrained(tmp_path / "lfq")
    assert json.loads((tmp_path / "lfq" / "config.json").read_text())["kind"] == "lfq"
    loaded = load_tokenizer(tmp_path / "lfq")
    assert type(loaded) is model_cls and loaded.config == config and loaded.vocab_size == 64
    with pytest.raises(ValueError, match="not a 'vqvae' tokenizer"):
        VQVAE.from_pretrained(tmp_path / "lfq")


def test_old_vqvae_json_without_quantizer_kind_loads_as_vq():
    data = json.loads(json.dumps(dataclasses.asdict(VQVAEConfig())))
    del data["quantizer"]["kind"]
    assert VQVAEConfig.from_dict(data) == VQVAEConfig()
    data["quantizer"] = {"kind": "lfq", "bits": 5}
    assert VQVAEConfig.from_dict(data).quantizer == LFQConfig(bits=5)
