"""A memory optimization a reader may skip: GPT-2's head and cross-entropy fused, chunk by chunk.

At GPT-2's micro-batch (64 x 1024 tokens, 50,304 words) the eager head writes and reads ~13 GB of
fp32 logits several times, a large share of the step's peak memory. FusedLoss computes the same
mean cross-entropy without ever holding all the logits: `chunk` tokens' logits at a time. train.py
uses it on CUDA and under --compile; on the CPU otherwise it trains with GPT's own eager loss, so
CPU runs keep their numbers bit for bit (the golden runs). The two agree to float rounding
(test_all.py), and step_flops counts both alike: the head costs its three matmuls either way.

    loss_model = FusedLoss(model)                  # model: a GPT
    _, loss = loss_model(x, y, plan=plan)          # no logits: they never exist whole
"""
import torch
import torch.nn as nn


class FusedLoss(nn.Module):
    """GPT's training loss, forward(idx, targets, plan) -> (None, the mean cross-entropy): the
    blocks as GPT runs them, then the head and loss fused. It holds the GPT as a submodule, so
    DDP can wrap it like the model itself (same parameters, same order). compiled: the per-chunk
    step compiled too (train.py --compile), used in training mode."""

    def __init__(self, model, compiled=False, chunk=4096):
        super().__init__()
        self.gpt, self.chunk = model, chunk
        self.compiled_step = torch.compile(chunk_cross_entropy) if compiled else None

    def forward(self, idx, targets, plan=None):
        x = self.gpt.hidden(idx, plan)  # (B, T, C)
        step = self.compiled_step if (self.compiled_step and self.training) else chunk_cross_entropy
        return None, linear_cross_entropy(x.view(-1, x.size(-1)), self.gpt.lm_head.weight,
                                          targets.view(-1), self.chunk, step)


def chunk_cross_entropy(logits, targets, grad):
    """Summed cross-entropy of one chunk's logits (n, V) against targets (n,), computed in fp32,
    and, when grad, its gradient with respect to the logits (softmax minus the one-hot of the
    targets) in the logits' dtype (n, V); else None. A pure function, so it compiles alone:
    fused, it reads the logits once or twice instead of once per elementwise op."""
    logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)  # (n, V), as F.cross_entropy's
    loss = -logp.gather(1, targets[:, None]).sum()
    if not grad:
        return loss, None
    dz = logp.exp_()  # (n, V), the softmax, in place: one (n, V) fp32 tensor in all
    dz[torch.arange(len(targets), device=dz.device), targets] -= 1.0
    return loss, dz.to(logits.dtype)


def chunked_cross_entropy(x, weight, targets, chunk, step, grad):
    """Summed cross-entropy of the logits x @ weight.T, x (N, C), weight (V, C), targets (N,),
    `chunk` tokens at a time; with grad also the sum's gradients with respect to x (N, C, in x's
    dtype) and weight (V, C, fp32), else None. Under autocast the matmuls run in its dtype (bf16
    on CUDA, as the eager head's do) and the loss and the weight's gradient accumulate in fp32."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    xc, wc = x.to(dtype), weight.to(dtype)  # (N, C), (V, C): the matmuls' inputs, cast once
    loss = torch.zeros((), device=x.device)
    grad_x = torch.empty_like(x) if grad else None  # (N, C)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if grad else None  # (V, C)
    for i in range(0, len(x), chunk):
        x_i = xc[i:i + chunk]  # (n, C)
        loss_i, dlogits = step(x_i @ wc.t(), targets[i:i + chunk], grad)  # (n, V) logits in, out
        loss += loss_i
        if grad:
            grad_x[i:i + chunk] = dlogits @ wc  # (n, C)
            if dlogits.dtype == grad_w.dtype:
                grad_w.addmm_(dlogits.t(), x_i)  # (V, C), summed inside the matmul: no temporary
            else:  # bf16 under autocast: a bf16 product, summed over the chunks in fp32
                grad_w += dlogits.t() @ x_i  # (V, C)
    return loss, grad_x, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of x @ weight.T: forward computes the gradients too, chunk by chunk
    while each chunk's logits are at hand (as Liger-Kernel's fused linear cross-entropy does), and
    keeps only them, (N, C) and (V, C), for backward, which scales them by the incoming gradient.
    So the head stays at the eager path's three matmuls (recomputing the logits in backward would
    add a fourth, ~9% of GPT-2 124M's step, and break step_flops's count), and no (N, V) tensor
    outlives its chunk. Backward is not differentiable again (no double backward)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, step):
        loss, grad_x, grad_w = chunked_cross_entropy(x, weight, targets, chunk, step, grad=True)
        ctx.save_for_backward(grad_x, grad_w)
        return loss / len(x)

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad / len(grad_x)  # d loss / d (summed loss), times the caller's gradient
        # in place, to hold no second (V, C) copy; a second backward (retain_graph) would see the
        # changed version and raise, rather than scale twice
        return grad_x.mul_(scale), grad_w.mul_(scale), None, None, None


def linear_cross_entropy(x, weight, targets, chunk=4096, step=chunk_cross_entropy):
    """F.cross_entropy(x @ weight.T, targets) for x (N, C), weight (V, C), targets (N,), every
    target counted (no ignore_index), without storing the (N, V) logits: at most `chunk` tokens'
    logits exist at a time (4,096 x 50,304 fp32 is 0.8 GB, against 13 GB for GPT-2's 65,536-token
    micro-batch). step: chunk_cross_entropy or its compiled twin. Without autograd (evaluation)
    only the loss is computed."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, chunk, step)
    loss, _, _ = chunked_cross_entropy(x, weight, targets, chunk, step, grad=False)
    return loss / len(x)
