"""GPT-2, as in build-nanogpt, with one addition: the forward pass follows a Plan.

A Plan says what one forward pass runs: the block indices in order, which may skip blocks (layers
not yet active in incremental training) or repeat them (Apollo's weight sharing across depths);
how many leading positions run without autograd (phase 1 "isolate"); and MSG's gates. grow.py
decides the plan; the model only follows it, so it knows nothing about stages.

Also here, because they describe the model rather than a regime: the training FLOPs of one step
along a plan (step_flops), and the step itself (forward_backward, optimizer_step), which train.py's
loop and cost.py --measure both run.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded up to a multiple of 128 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """What one forward pass runs.
    blocks: block index at each position, in order (positions may skip or repeat blocks).
    isolate: the first `isolate` positions, and the embeddings below them, run without autograd, so
        backward stops above them (phase 1 "isolate": old blocks cost no backward at all).
    gates: None, or one μ per position: a block at μ < 1 outputs μ·Block(x) + (1 − μ)·x (MSG)."""
    blocks: tuple
    isolate: int = 0
    gates: tuple = None

    def to_dict(self):
        return {"blocks": list(self.blocks), "isolate": self.isolate,
                "gates": None if self.gates is None else list(self.gates)}

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(d["blocks"]), d["isolate"], None if d["gates"] is None else tuple(d["gates"]))


def full_plan(n_layer):
    return Plan(tuple(range(n_layer)))


# OpenAI's released sizes; vocab padded as for training from scratch
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # Compiled twins of the blocks, kept in a plain list so they stay out of the state dict, and
        # of the fused loss's per-chunk step; both set by compile_blocks.
        self.compiled = None
        self.compiled_loss = None

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "RESIDUAL_SCALE"):
                # each block adds two residual branches; keep the residual stream's variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def compile_blocks(self):
        """Regional compilation: one graph per block, so any plan (depth, repeats) reuses it, and
        one for the fused loss's work on a chunk of logits (see fuses_loss)."""
        self.compiled = [torch.compile(block) for block in self.transformer.h]
        self.compiled_loss = torch.compile(chunk_cross_entropy)

    def fuses_loss(self, device):
        """Whether forward computes the loss with linear_cross_entropy (head and loss chunk by
        chunk, no fp32 logits stored) instead of the eager head and F.cross_entropy. Fused on CUDA
        and wherever compile_blocks ran: at GPT-2's micro-batch (64 x 1024 tokens, 50,304 words)
        the eager path writes and reads ~13 GB of fp32 logits several times, a large share of the
        step's peak memory. Eager on the CPU otherwise, so CPU runs keep their numbers bit for bit
        (the golden runs); the two agree to float rounding (test_all.py)."""
        return self.compiled is not None or device.type == "cuda"

    def hidden(self, idx, plan=None):
        """Final hidden states (B, T, C) of idx (B, T) along the Plan (default: every block once)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        plan = full_plan(self.config.n_layer) if plan is None else plan
        blocks = self.compiled if (self.compiled and self.training) else self.transformer.h
        grad = torch.is_grad_enabled()
        gates = plan.gates
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        with torch.set_grad_enabled(grad and plan.isolate == 0):
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for t, b in enumerate(plan.blocks):
            with torch.set_grad_enabled(grad and t >= plan.isolate):
                y = blocks[b](x)  # (B, T, C)
                x = y if gates is None or gates[t] == 1.0 else x + gates[t] * (y - x)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, plan=None):
        """(logits (B, T, vocab_size), None) without targets (B, T); with them, (logits, the mean
        cross-entropy), or (None, the loss) where the loss is fused (fuses_loss): its logits are
        never whole. Callers that need logits with targets (HellaSwag) use hidden and lm_head."""
        x = self.hidden(idx, plan)  # (B, T, C)
        if targets is not None and self.fuses_loss(idx.device):
            step = self.compiled_loss if (self.compiled_loss and self.training) else chunk_cross_entropy
            return None, linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1),
                                              step=step)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, fused=False):
        """AdamW over every parameter (frozen ones included: AdamW skips a parameter with no grad,
        so freezing and unfreezing never needs a new optimizer). Decay only matrices."""
        params = list(self.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @classmethod
    def from_pretrained(cls, name):
        """OpenAI's GPT-2 weights via Hugging Face transformers (needs it installed and internet)."""
        if name not in SIZES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIZES)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise SystemExit("GPT.from_pretrained needs transformers: pip install transformers")
        hf = GPT2LMHeadModel.from_pretrained(name).state_dict()
        model = cls(GPTConfig(vocab_size=50257, **SIZES[name]))
        model.load_state_dict(convert_hf_state_dict(hf))
        return model


# ----------------------------------------------------------------------------------------------
# The head and the loss fused: the mean cross-entropy of x @ W.T without ever holding all logits


def chunk_cross_entropy(logits, targets, grad):
    """Summed cross-entropy of one chunk's logits (n, V) against targets (n,), computed in fp32,
    and, when grad, its gradient with respect to the logits (softmax minus the one-hot of the
    targets) in the logits' dtype (n, V); else None. A pure function, so compile_blocks can compile
    it alone: fused, it reads the logits once or twice instead of once per elementwise op."""
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
                grad_w.addmm_(dlogits.t(), x_i)  # (V, C), summed inside the matmul: no (V, C) temporary
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


# OpenAI's checkpoints use Conv1D, which stores these weights as (in, out): Linear's transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def convert_hf_state_dict(hf):
    """Hugging Face GPT2LMHeadModel state dict -> this GPT's state dict."""
    sd = {}
    for k, v in hf.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not parameters
        sd[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v
    return sd


CHECKPOINT_KEYS = ("model", "model_config", "eval_plan")


def read_checkpoint(path, device="cpu"):
    """A train.py checkpoint as plain data, or a ValueError with one line saying what is wrong with
    the file: missing, truncated, random bytes, or some other program's."""
    fix = "point at a ckpt.pt written by train.py (or delete this one to start over)"
    if not Path(path).is_file():
        raise ValueError(f"no checkpoint at {path}: {fix}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises many kinds: zip, pickle, EOF, unsupported types
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated or "
                         f"not a train.py checkpoint): {fix}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a train.py checkpoint (it lacks {', '.join(CHECKPOINT_KEYS)}): {fix}")
    return ckpt


def load_model(path, device="cpu"):
    """A GPT from a train.py checkpoint, in eval mode, and the Plan it is evaluated with (shared
    depths and MSG's gates included)."""
    return checkpoint_model(read_checkpoint(path, device), device)


def checkpoint_model(ckpt, device="cpu"):
    """load_model on a checkpoint already read (read_checkpoint), for callers that read its other
    keys too."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    saved = ckpt["eval_plan"]  # checkpoints before Plan existed stored the block list alone
    return model, Plan.from_dict(saved) if isinstance(saved, dict) else Plan(tuple(saved))


# ----------------------------------------------------------------------------------------------
# Training FLOPs of one step along a plan: train.py's `flops` column and every cost.py figure


def step_flops(cfg, plan, trainable, tokens, seq_len):
    """Training FLOPs (forward + backward) of `tokens` tokens along the Plan, when the blocks in
    `trainable` train.

    Counted per token: each block's matmuls 24·d² and its attention scores and values 4·T·d (the
    full T×T, as FlopCounterMode and nanoGPT's MFU estimate count it; a causal kernel does about
    half), and the tied lm_head 2·d·V. Backward: a trainable block costs 2× its forward (input and
    weight gradients); a frozen block that gradients pass through costs its matmuls once (input
    gradients only) and its attention twice (dq, dk, dv); the first plan.isolate positions run
    under no_grad and cost no backward at all. Left out: layer norms, GELU, softmax, residual adds,
    embedding lookups and the optimizer update, all O(d) per token against O(d²).
    """
    d, V = cfg.n_embd, cfg.vocab_size
    mm, att, head = 24 * d * d, 4 * seq_len * d, 2 * d * V
    fwd = len(plan.blocks) * (mm + att) + head
    bwd = 2 * head  # the head's weight is the tied, always trained wte
    grad_below = plan.isolate == 0  # gradients flow on to the embeddings below the blocks
    for t, b in enumerate(plan.blocks):
        if t < plan.isolate:
            continue
        if b in trainable:
            bwd += 2 * mm + 2 * att
        elif grad_below:
            bwd += mm + 2 * att
        grad_below = grad_below or b in trainable
    return tokens * (fwd + bwd)


def full_step_flops(cfg, tokens, seq_len):
    """One step of the full-depth baseline: every block runs once and trains."""
    return step_flops(cfg, full_plan(cfg.n_layer), range(cfg.n_layer), tokens, seq_len)


def blocks_share(cfg, seq_len):
    """The share of the full-depth baseline's training FLOPs spent in the transformer blocks, the
    rest in the head (2·d·V a token forward): growth saves only on the blocks."""
    head = step_flops(cfg, Plan(()), (), 1, seq_len)  # no blocks: the head alone
    return 1 - head / full_step_flops(cfg, 1, seq_len)


# Dense bf16 peak FLOP/s of common cards (the datasheets' sparsity figures are twice these), by a
# part of the name torch.cuda.get_device_name gives; the first match wins, so "H100 PCIe" comes
# before "H100" (the SXM part)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device_name):
    """The card's dense bf16 peak, or None for a card not in PEAK_BF16 (give it to train.py with
    --peak-flops)."""
    return next((peak for part, peak in PEAK_BF16.items() if part in device_name), None)


def mfu(flops, seconds, devices, peak):
    """Model FLOPs utilization: the training FLOPs step_flops counts, over what `devices` cards at
    `peak` FLOP/s could do in `seconds`."""
    return flops / (seconds * devices * peak)


# ----------------------------------------------------------------------------------------------
# Devices, and the training step in two halves that cost.py --measure times apart


def pick_device(name):
    """The device for --device: "auto" is the best one here (cuda, then mps, then cpu); a named one
    must exist here, else a ValueError says so in one line."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(n for n, ok in available.items() if ok)
    if name not in available:
        raise ValueError(f"--device {name}: use auto, cpu, cuda or mps (torchrun picks the GPU of each rank)")
    if not available[name]:
        raise ValueError(f"--device {name}: this machine has no {name.upper()} device that torch "
                         f"{torch.__version__} can use; use --device cpu or auto")
    return name


def autocast(device, precision="bf16"):
    # bf16 on CUDA (no grad scaler needed) unless fp32 is asked for; fp32 elsewhere
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and precision == "bf16")


def forward_backward(model, micro_batches, device, precision="bf16"):
    """Forward and backward of each micro-batch (x, y, plan), their gradients summed as one batch's
    (each loss divided by their number), under `precision` autocast on CUDA. model may be
    DDP-wrapped: it then all-reduces gradients on the last backward only. Returns the mean loss on
    this rank, detached."""
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y, plan) in enumerate(micro_batches):
        if isinstance(model, DDP):  # DDP reads this flag in forward
            model.require_backward_grad_sync = i == n - 1
        with autocast(device, precision):
            _, loss = model(x, y, plan=plan)
        loss = loss / n
        total += loss.detach()
        loss.backward()
    return total


def optimizer_step(model, opt, lr, grad_clip):
    """Clip the gradients' global norm to grad_clip (0: no clipping, as the authors' code), step
    AdamW at lr, drop the gradients. Returns the norm before clipping. Blocks that did not train
    this step have no gradient and are skipped."""
    for group in opt.param_groups:
        group["lr"] = lr
    params = [p for p in model.parameters() if p.grad is not None]
    # an infinite bound still measures the norm, and scales every gradient by exactly 1.0
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm
