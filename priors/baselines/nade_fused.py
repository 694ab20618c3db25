"""Binary NADE's training loss with its gradients in one blocked pass (the CPU training path).

Autograd through `NADE.binary_pre_activations` keeps the (L b H) pre-activations, hidden units and
their gradients: for binarized MNIST at batch 100 each is 157 MB, so a CPU step is bound by memory
traffic. But the gradient of position t's loss needs only a_t, x_t and the weights, so one pass over
blocks of positions can compute the loss and every gradient while a block's (k b H) slab is still in
cache, keeping only (b H) running sums. Backward then scales the stored gradients by the incoming
scalar. With W_s the input weights of position s and g_t = dL/da_t:

    dL/dW_s = sum_b x_bs sum_{t>s} g_bt
            = (t > s inside the block: a masked matmul) + x_s^T (G - G_through_block),

where G is the sum of g over all positions (known at the end) and G_through_block the sum up to
the end of the block: so the pass runs forwards, like the pre-activations.
`benchmarks/bench_baseline_training.py` times it against autograd through the blocked matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

BLOCK = 8  # positions per slab: (8 b H) stays in cache at b = 100, H = 500; 6-16 time alike on CPU
# Below about this many pre-activations (b L H) the whole tensor is cache-friendly and autograd through
# the blocked matmuls wins; measured crossover on one core at L = 784, H = 500: batch 16 (6.3M).
MIN_ELEMENTS = 6_000_000


class BinaryNADENLL(torch.autograd.Function):
    """(x (b L) 0/1 floats, weights (b L), bias (b H), W (L H), V (L H), out_bias (L)) ->
    sum_{b,t} weights_bt * -log p(x_bt | x_b<t), with p(x_t = 1 | x_<t) = sigmoid(out_bias_t + V_t . h_t),
    h_t = sigmoid(bias + sum_{s<t} x_s W_s). Gradients flow to bias, W, V and out_bias."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # sums of 784 terms: not in bf16
    def forward(ctx, x: Tensor, weights: Tensor, bias: Tensor, W: Tensor, V: Tensor, out_bias: Tensor) -> Tensor:
        need_grad = any(ctx.needs_input_grad)
        seq_len = x.shape[1]
        total = x.new_zeros(())
        running = bias  # a_t at the start of the block
        if need_grad:
            grad_W, grad_V, grad_out_bias = torch.empty_like(W), torch.empty_like(V), torch.empty_like(out_bias)
            g_so_far = torch.zeros_like(bias)  # sum of g_t over the positions done
        for start in range(0, seq_len, BLOCK):
            stop = min(start + BLOCK, seq_len)
            inputs, W_block, V_block = x[:, start:stop], W[start:stop], V[start:stop]
            earlier = torch.ones(stop - start, stop - start, dtype=W.dtype, device=W.device).tril(-1)
            masked = rearrange(earlier, "t s -> t 1 s") * inputs  # (t b s): x_s for s < t inside the block
            hidden = torch.sigmoid(torch.matmul(masked, W_block) + running)  # (t b H)
            logit = torch.bmm(hidden, rearrange(V_block, "t h -> t h 1"))[:, :, 0] + out_bias[start:stop, None]
            target, weight = inputs.T, weights[:, start:stop].T  # (t b)
            total = total + (weight * F.binary_cross_entropy_with_logits(logit, target, reduction="none")).sum()
            running = running + inputs @ W_block
            if need_grad:
                grad_logit = weight * (torch.sigmoid(logit) - target)  # (t b)
                grad_out_bias[start:stop] = grad_logit.sum(dim=1)
                grad_V[start:stop] = torch.bmm(rearrange(grad_logit, "t b -> t 1 b"), hidden)[:, 0]
                g = torch.ops.aten.sigmoid_backward(grad_logit[:, :, None] * V_block[:, None, :], hidden)
                g_so_far = g_so_far + g.sum(dim=0)
                grad_W[start:stop] = (rearrange(masked, "t b s -> s (t b)") @ rearrange(g, "t b h -> (t b) h")
                                      - inputs.T @ g_so_far)
        if need_grad:
            grad_W += x.T @ g_so_far  # the G term of every position, in one matmul
            ctx.save_for_backward(g_so_far, grad_W, grad_V, grad_out_bias)
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: Tensor):
        grad_bias, grad_W, grad_V, grad_out_bias = ctx.saved_tensors
        return None, None, grad * grad_bias, grad * grad_W, grad * grad_V, grad * grad_out_bias
