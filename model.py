"""GPT-2, as in build-nanogpt, with one addition: the forward pass follows a Plan.

A Plan says what one forward pass runs: the block indices in order, which may skip blocks (layers
not yet active in incremental training) or repeat them (Apollo's weight sharing across depths);
how many leading positions run without autograd (phase 1 "isolate"); and MSG's gates. grow.py
decides the plan; the model only follows it, so it knows nothing about stages.

Also here, because it describes the model rather than a regime: the training FLOPs of one step
along a plan (step_flops), which train.py logs and cost.py sums, and MFU.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


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
        return cls(tuple(d["blocks"]), d["isolate"],
                   None if d["gates"] is None else tuple(d["gates"]))


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
        # compiled twins of the blocks (compile_blocks), in a plain list so they stay out of the
        # state dict
        self.compiled = None

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
        """Regional compilation: one graph per block, so any plan (depth, repeats) reuses it.
        Training runs the compiled blocks, evaluation the eager ones."""
        self.compiled = [torch.compile(block) for block in self.transformer.h]

    def hidden(self, idx, plan=None):
        """Final hidden states (B, T, C) of idx (B, T) along the Plan (default: every block
        once)."""
        B, T = idx.size()
        assert T <= self.config.block_size, (f"sequence of {T} exceeds block_size "
                                             f"{self.config.block_size}")
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
        """Logits (B, T, vocab_size) of idx (B, T) along the Plan, and with targets (B, T) the mean
        cross-entropy (else None). Training on CUDA takes the loss from fused_loss.FusedLoss
        instead, which never holds the logits whole."""
        logits = self.lm_head(self.hidden(idx, plan))  # (B, T, vocab_size)
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
        """OpenAI's GPT-2 weights via Hugging Face transformers (needs it installed and
        internet)."""
        if name not in SIZES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIZES)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise SystemExit("GPT.from_pretrained needs transformers: pip install transformers")
        try:
            hf = GPT2LMHeadModel.from_pretrained(name).state_dict()
        except OSError as e:  # offline, or the hub unreachable: transformers says it in lines
            raise ValueError(f"could not load OpenAI's {name} weights through transformers "
                             f"({str(e).splitlines()[0][:120]}): online once, or with them in "
                             "transformers' cache ($HF_HOME)") from None
        model = cls(GPTConfig(vocab_size=50257, **SIZES[name]))
        model.load_state_dict(convert_hf_state_dict(hf))
        return model


# OpenAI's checkpoints use Conv1D, which stores these weights as (in, out): Linear's transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def convert_hf_state_dict(hf):
    """Hugging Face GPT2LMHeadModel state dict -> this GPT's state dict."""
    sd = {}
    for k, v in hf.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not parameters
        sd[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v
    return sd


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
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
             "L4": 121e12}


def peak_flops(device_name):
    """The card's dense bf16 peak, or None for a card not in PEAK_BF16 (give it to train.py with
    --peak-flops)."""
    return next((peak for part, peak in PEAK_BF16.items() if part in device_name), None)


def mfu(flops, seconds, devices, peak):
    """Model FLOPs utilization: the training FLOPs step_flops counts, over what `devices` cards at
    `peak` FLOP/s could do in `seconds`."""
    return flops / (seconds * devices * peak)
