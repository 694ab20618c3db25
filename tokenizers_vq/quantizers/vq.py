"""Vector quantisation with a learned codebook: nearest code, straight-through gradient.

Implements the quantiser of van den Oord et al. 2017, "Neural Discrete Representation Learning"
(VQ-VAE): each `d`-dimensional encoder output is replaced by its nearest codebook vector, the
gradient is copied straight through to the encoder, and the loss adds a codebook term
`||sg[z] - e||^2` and a commitment term `beta * ||z - sg[e]||^2`. With `ema=True` the codebook
term is dropped and the codebook follows exponential moving averages of cluster sizes and sums
(the paper's appendix A.1; Razavi et al. 2019, "Generating Diverse High-Fidelity Images with
VQ-VAE-2"), with Laplace smoothing of the cluster sizes. Codes whose moving-average cluster size
falls below `dead_code_threshold` are restarted from encoder outputs of the current batch
(Dhariwal et al. 2020, "Jukebox"; Zeghidour et al. 2021, "SoundStream"), and the codebook may be
initialised by k-means on the first training batch. Two options of later VQ tokenizers (Yu et al.
2022, "Vector-quantized Image Modeling with Improved VQGAN", ViT-VQGAN; Sun et al. 2024, LlamaGen):
`codebook_dim > 0` factorises the codes, quantising a linear projection of the input to a small
code space and projecting the code back out, and `use_cosine` l2-normalises inputs and codes, so
the nearest code is the one of highest cosine similarity. `rotation_trick` replaces the straight-through
copy of the gradient by the rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with
the Rotation Trick"; vector-quantize-pytorch's default): the input reaches its code through a rotation
and rescaling held constant in the backward pass, so the gradient is rotated and scaled on its way back
and inputs at different places in one code's cell get different gradients. Distances are always computed in float32.
Under `torch.distributed`, counts and sums are all-reduced and random choices are made on rank 0
and broadcast, so every rank keeps an identical codebook; collectives happen only in training
mode, because export and evaluation run on the main process alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import (
    ADDED_LATER,
    QuantizerOutput,
    all_reduce_sum,
    broadcast_from_rank_zero,
    check_kind,
    code_counts,
    config_from_dict,
    is_rank_zero,
    seeded_linear,
    usage_and_perplexity,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VQConfig:
    """Settings of a `VectorQuantizer`; the input dimension comes from the model that owns it."""

    kind: str = "vq"
    codebook_size: int = 256
    commitment_weight: float = 0.25  # beta in the paper
    ema: bool = True
    decay: float = 0.99
    epsilon: float = 1e-5  # Laplace smoothing of EMA cluster sizes
    dead_code_threshold: float = 1.0  # in EMA cluster-size units (assignments per batch); 0 disables
    kmeans_init: bool = False
    kmeans_iters: int = 10
    seed: int = 0
    use_cosine: bool = False  # l2-normalised inputs and codes (ViT-VQGAN, LlamaGen)
    codebook_dim: int = 0  # > 0: quantise a projection to this many dimensions (factorised codes)
    # std of the initial codes (without k-means). Near 0 (e.g. 0.01, vector-quantize-pytorch's scale)
    # the first step assigns inputs by direction, so every code takes a share: fuller use early on,
    # at some cost in PSNR in short runs (BENCHMARKS.md); ignored under use_cosine (unit codes).
    init_scale: float = 1.0
    # In place of the straight-through copy; off: on the FSDD codec and CIFAR-10 it lost 0.75-1.7 dB (BENCHMARKS.md).
    rotation_trick: bool = field(default=False, metadata=ADDED_LATER)

    def __post_init__(self):
        check_kind(self, "vq")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if self.commitment_weight < 0 or self.epsilon <= 0 or self.dead_code_threshold < 0:
            raise ValueError("commitment_weight and dead_code_threshold must be >= 0 and epsilon > 0")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.codebook_dim < 0:
            raise ValueError(f"codebook_dim must be >= 0 (0 = no projection), got {self.codebook_dim}")

    @classmethod
    def from_dict(cls, data: dict) -> "VQConfig":
        return config_from_dict(cls, data)


# Distances nearest_codes holds at once (fp32: 256 MiB). Whole, the (n k) matrix of 65,536 tokens and
# 16,384 codes is 4 GiB, and its temporaries took the quantizer step's peak to 8.2 GiB on an H200.
NEAREST_CODES_CHUNK_ENTRIES = 2**26


@torch.no_grad()
def nearest_codes(vectors: Tensor, codebook: Tensor, chunk_entries: int = NEAREST_CODES_CHUNK_ENTRIES) -> Tensor:
    """(n d), (k d) -> (n,) int64 index of each vector's nearest code, in fp32 whatever autocast says.

    |v - c|^2 = |v|^2 - 2 v.c + |c|^2 and |v|^2 is the same for every code, so the argmin needs only
    |c|^2 - 2 v.c: one fused matmul (addmm) a chunk of rows, at most `chunk_entries` distances at a time.
    Autocast is off here: in bf16 the matmul keeps 8 significant bits, enough to pick the wrong code.
    """
    if vectors.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=vectors.device)
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        vectors, codebook = vectors.float(), codebook.float()
        code_norms = codebook.pow(2).sum(dim=1)
        rows = max(1, chunk_entries // codebook.shape[0])
        return torch.cat([torch.addmm(code_norms, chunk, codebook.t(), alpha=-2.0).argmin(dim=1)
                          for chunk in vectors.split(rows)])


@torch.no_grad()
def kmeans(samples: Tensor, num_clusters: int, num_iters: int, generator: torch.Generator,
           spherical: bool = False) -> Tensor:
    """Lloyd's k-means on (n d) float32 samples -> (num_clusters d) centroids.

    Centroids start at distinct samples when there are enough of them (drawn with `generator`,
    a CPU generator); a cluster that empties keeps its previous centroid. `spherical` keeps the
    centroids on the unit sphere (for l2-normalised samples: k-means under cosine similarity).
    """
    count = samples.shape[0]
    if count >= num_clusters:
        start = torch.randperm(count, generator=generator)[:num_clusters]
    else:
        start = torch.randint(count, (num_clusters,), generator=generator)
    centroids = samples[start.to(samples.device)].clone()
    for _ in range(num_iters):
        assignment = nearest_codes(samples, centroids)
        sizes = torch.bincount(assignment, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, samples)
        means = sums / rearrange(sizes.clamp_min(1), "k -> k 1")
        if spherical:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(rearrange(sizes > 0, "k -> k 1"), means, centroids)
    return centroids


def rotate_onto(source: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """(... d), (... d) -> `target`'s values, with the gradient of the rotation trick flowing to `source`.

    Each `source` row s is mapped onto its target t by lambda * R s, where R is the rotation that takes
    s's direction to t's in the plane they span and lambda = |t| / |s|; R and lambda are constants of
    the backward pass, so d loss / d s = lambda * R^T d loss / d t. R = I - 2 r r^T + 2 t^ s^T with
    s^ = s / |s|, t^ = t / |t|, r = (s^ + t^) / |s^ + t^|, applied without forming the (d d) matrix.
    A target opposite its source (s^ = -t^) has no such plane and gets a non-orthogonal map; the
    nearest code is never in that direction in practice. The values are `target`'s exactly: the few
    ulps between lambda * R s and t are added as a constant.
    """
    target = target.detach()
    source_norm = source.detach().norm(dim=-1, keepdim=True).clamp_min(eps)
    target_norm = target.norm(dim=-1, keepdim=True).clamp_min(eps)
    source_unit, target_unit = source.detach() / source_norm, target / target_norm
    reflector = F.normalize(source_unit + target_unit, dim=-1, eps=eps)
    rotated = (source - 2 * (source * reflector).sum(-1, keepdim=True) * reflector
               + 2 * (source * source_unit).sum(-1, keepdim=True) * target_unit)
    scaled = rotated * (target_norm / source_norm)
    return scaled + (target - scaled).detach()


class VectorQuantizer(nn.Module):
    """(b n d) -> QuantizerOutput; `lookup` inverts indices to codes, `to_indices` only encodes.

    State in the state dict: `codebook` (k c, c = codebook_dim or d; a parameter without EMA, a
    buffer with it), `cluster_size` (EMA of assignments per code, kept in both modes because
    dead-code detection uses it), `embed_sum` (EMA of assigned vectors, EMA mode only),
    `kmeans_initialized`, `training_steps` (seeds the restart sampling, so a reloaded model
    continues the same stream), and `project_in`/`project_out` when the codes are factorised.
    With factorised codes `lookup` returns the projected-out code, so requantising it need not give
    back the same index (the projections are not inverses); without them it does.
    """

    def __init__(self, config: VQConfig, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.code_dim = config.codebook_dim or dim
        self.codebook_size = config.codebook_size
        self.num_codebooks = 1
        # The module owns its generator; it is re-seeded from (seed, training_steps) before each
        # use, so sampling is reproducible, identical after a reload, and independent of global RNG.
        self.generator = torch.Generator().manual_seed(config.seed)
        initial = config.init_scale * torch.randn(config.codebook_size, self.code_dim, generator=self.generator)
        if config.use_cosine:
            initial = F.normalize(initial, dim=-1)
        if config.ema:
            self.register_buffer("codebook", initial)
            self.register_buffer("embed_sum", initial.clone())  # = codebook * cluster_size (ones)
        else:
            self.codebook = nn.Parameter(initial)
        if config.codebook_dim:
            self.project_in = seeded_linear(dim, self.code_dim, self.generator)
            self.project_out = seeded_linear(self.code_dim, dim, self.generator)
        else:
            self.project_in = self.project_out = None
        self.register_buffer("cluster_size", torch.ones(config.codebook_size))
        self.register_buffer("kmeans_initialized", torch.tensor(not config.kmeans_init))
        self.register_buffer("training_steps", torch.tensor(0, dtype=torch.int64))

    # --- code space -----------------------------------------------------------------------------

    def codes(self) -> Tensor:
        """(k c) float32 code vectors as used for matching: unit length under `use_cosine`."""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=-1) if self.config.use_cosine else codebook

    def _to_code_space(self, flat: Tensor) -> Tensor:
        """((b n) d) float32 -> ((b n) c): projected in, then normalised under `use_cosine`."""
        if self.project_in is not None:
            flat = F.linear(flat, self.project_in.weight.float(), self.project_in.bias.float())
        return F.normalize(flat, dim=-1) if self.config.use_cosine else flat

    def _from_code_space(self, codes: Tensor) -> Tensor:
        if self.project_out is None:
            return codes
        return F.linear(codes, self.project_out.weight.float(), self.project_out.bias.float())

    # --- inference ------------------------------------------------------------------------------

    def lookup(self, indices: Tensor) -> Tensor:
        """(b n) int64 -> (b n d) float32 codes (differentiable in the codebook and projection)."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self._from_code_space(F.embedding(indices, self.codes()))

    @torch.no_grad()
    def to_indices(self, z: Tensor) -> Tensor:
        """(b n d) -> (b n) nearest-code indices, with no statistics update and no collectives."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._to_code_space(rearrange(z, "b n d -> (b n) d").float())
            return rearrange(nearest_codes(flat, self.codes()), "(b n) -> b n", b=z.shape[0])

    # --- training -------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._to_code_space(rearrange(z, "b n d -> (b n) d").float())
            if self.training and not bool(self.kmeans_initialized):
                self._kmeans_initialize(flat.detach())
            indices = nearest_codes(flat.detach(), self.codes())
            codes = F.embedding(indices, self.codes())
            aux_loss = self.config.commitment_weight * F.mse_loss(flat, codes.detach())
            if not self.config.ema:  # the EMA replaces the codebook term's gradient step
                aux_loss = aux_loss + F.mse_loss(codes, flat.detach())
            if self.training:
                counts, dead_codes = self._update(flat.detach(), indices)
            else:
                counts = code_counts(indices, self.codebook_size)
                dead_codes = (self.cluster_size < self.config.dead_code_threshold).sum()
            usage, perplexity = usage_and_perplexity(counts)
            if self.project_out is None and not self.config.use_cosine and not self.config.rotation_trick:
                # Plain VQ: d quantized / d z is exactly the identity.
                quantized = z + (rearrange(codes, "(b n) d -> b n d", b=z.shape[0]).to(z.dtype) - z).detach()
            else:  # straight through (or rotated) in code space, then back through the normalisation/projections
                through = rotate_onto(flat, codes) if self.config.rotation_trick else flat + (codes - flat).detach()
                quantized = self._from_code_space(through)
                quantized = rearrange(quantized, "(b n) d -> b n d", b=z.shape[0]).to(z.dtype)
        metrics = {"usage": usage, "perplexity": perplexity, "dead_codes": dead_codes.float()}
        indices = rearrange(indices, "(b n) -> b n", b=z.shape[0])
        return QuantizerOutput(quantized, indices, aux_loss, metrics)

    def _check_input(self, z: Tensor) -> None:
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"expected (b n d) input with d={self.dim}, got shape {tuple(z.shape)}")

    def _seeded_generator(self) -> torch.Generator:
        return self.generator.manual_seed(self.config.seed * 1_000_003 + int(self.training_steps))

    @torch.no_grad()
    def _kmeans_initialize(self, flat: Tensor) -> None:
        centroids = torch.empty_like(self.codebook, dtype=torch.float32)
        if is_rank_zero():  # one rank clusters its batch; the others receive its codebook
            generator = self._seeded_generator()
            centroids.copy_(kmeans(flat, self.codebook_size, self.config.kmeans_iters, generator,
                                   spherical=self.config.use_cosine))
        broadcast_from_rank_zero(centroids)
        self.codebook.data.copy_(centroids)
        if self.config.ema:
            self.embed_sum.copy_(centroids * rearrange(self.cluster_size, "k -> k 1"))
        self.kmeans_initialized.fill_(True)
        logger.info("initialised %d codes by k-means on %d vectors", self.codebook_size, flat.shape[0])

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """EMA statistics, EMA codebook step and dead-code restart; returns global counts, #dead.

        `flat` is in code space (projected, normalised under cosine); under cosine the EMA mean is
        stored unnormalised and normalised where it is used, as in spherical k-means.
        """
        decay = self.config.decay
        counts = code_counts(indices, self.codebook_size).float()
        sums = flat.new_zeros(self.codebook_size, self.code_dim).index_add_(0, indices, flat)
        # One collective for both statistics: identical inputs on every rank keep codebooks equal.
        statistics = all_reduce_sum(torch.cat([rearrange(counts, "k -> k 1"), sums], dim=1))
        counts, sums = statistics[:, 0], statistics[:, 1:]
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        if self.config.ema:
            self.embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.config.epsilon) / (total + self.codebook_size * self.config.epsilon)
            updated = self.embed_sum / rearrange(smoothed * total, "k -> k 1")
            # Unused codes keep their vector exactly; smoothing would otherwise drift them slowly.
            used = rearrange(counts > 0, "k -> k 1")
            self.codebook.copy_(torch.where(used, updated, self.codebook))
        dead = self.cluster_size < self.config.dead_code_threshold
        num_dead = dead.sum()
        if num_dead > 0:
            self._restart(dead, flat)
        self.training_steps.add_(1)
        return counts, num_dead

    @torch.no_grad()
    def _restart(self, dead: Tensor, flat: Tensor) -> None:
        """Replace the codes flagged `dead` by encoder outputs drawn from this batch (rank 0's)."""
        dead_indices = dead.nonzero().squeeze(1)
        num_dead = dead_indices.numel()
        replacements = flat.new_empty(num_dead, self.code_dim)
        if is_rank_zero():
            generator = self._seeded_generator()
            if flat.shape[0] >= num_dead:  # distinct vectors, so restarted codes do not coincide
                choice = torch.randperm(flat.shape[0], generator=generator)[:num_dead]
            else:
                choice = torch.randint(flat.shape[0], (num_dead,), generator=generator)
            replacements.copy_(flat[choice.to(flat.device)])
        broadcast_from_rank_zero(replacements)
        self.codebook.data.index_copy_(0, dead_indices, replacements.to(self.codebook.dtype))
        # A restarted code gets the threshold's mass: one more unused step marks it dead again.
        self.cluster_size.index_fill_(0, dead_indices, self.config.dead_code_threshold)
        if self.config.ema:
            self.embed_sum.index_copy_(0, dead_indices, replacements * self.config.dead_code_threshold)
