"""What training really costs, in FLOPs.

train.py's cumulative `flops` column comes from step_flops below, so the log and this script agree
by construction.
"""


def step_flops(cfg, plan, trainable, isolate, tokens, seq_len):
    """Training FLOPs (forward + backward) of `tokens` tokens through the layer plan.

    Counted per token: each block's matmuls 24·d² and its attention scores and values 4·T·d (the
    full T×T, as FlopCounterMode and nanoGPT's MFU estimate count it; a causal kernel does about
    half), and the tied lm_head 2·d·V. Backward: a trainable block costs 2× its forward (input and
    weight gradients); a frozen block that gradients pass through costs its matmuls once (input
    gradients only) and its attention twice (dq, dk, dv); the first `isolate` positions run under
    no_grad and cost no backward at all. Left out: layer norms, GELU, softmax, residual adds,
    embedding lookups and the optimizer update, all O(d) per token against O(d²).
    """
    d, V = cfg.n_embd, cfg.vocab_size
    mm, att, head = 24 * d * d, 4 * seq_len * d, 2 * d * V
    fwd = len(plan) * (mm + att) + head
    bwd = 2 * head  # the head's weight is the tied, always trained wte
    grad_below = isolate == 0  # gradients flow on to the embeddings below the blocks
    for t, b in enumerate(plan):
        if t < isolate:
            continue
        if b in trainable:
            bwd += 2 * mm + 2 * att
        elif grad_below:
            bwd += mm + 2 * att
        grad_below = grad_below or b in trainable
    return tokens * (fwd + bwd)
