"""Sample text from a train.py checkpoint, as build-nanogpt does during training: each new token is
drawn from the model's top-k next tokens, one at a time.

    python sample.py --checkpoint out/ckpt.pt
    python sample.py --checkpoint out/ckpt.pt --prompt "ROMEO:" --num-samples 2 --max-new-tokens 100

The model runs along the checkpoint's own eval plan (shared depths, MSG's gates), so a weight-shared
or mid-growth checkpoint writes as it was evaluated. A generator seeded with --seed draws the
tokens: the same seed gives the same text (on the same device). train.py --sample-every calls
sample() too.
"""

from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import torch
from torch.nn import functional as F

import runfolder
from data import tokenizer
from devices import autocast, pick_device

# build-nanogpt's: four continuations of this prompt (32 tokens in all there), top-50 at
# temperature 1
DEFAULTS = dict(prompt="Hello, I'm a language model,", num_samples=4, max_new_tokens=32, top_k=50,
                temperature=1.0, seed=42)


@torch.no_grad()
def generate(model, idx, max_new_tokens, top_k, temperature, gen, plan=None, vocab=None):
    """idx (N, T) and max_new_tokens tokens after it, (N, T + max_new_tokens). Each is drawn by the
    generator `gen` from the top_k most likely of the first `vocab` tokens at `temperature`, with
    the context cropped to the model's block_size."""
    for _ in range(max_new_tokens):
        with autocast(idx.device):
            h = model.hidden(idx[:, -model.config.block_size:], plan)[:, -1]  # (N, C)
        logits = model.lm_head(h.float())[:, :vocab] / temperature  # (N, V)
        top, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (N, k), (N, k)
        pick = torch.multinomial(F.softmax(top, dim=-1), 1, generator=gen)  # (N, 1)
        idx = torch.cat([idx, torch.gather(ids, -1, pick)], dim=1)  # (N, T + 1)
    return idx


def sample(model, enc, prompt, num_samples, max_new_tokens, top_k, temperature, seed, device,
           plan=None):
    """num_samples texts, each the prompt and max_new_tokens tokens after it (generate), drawn by a
    generator of their own seeded with `seed`: the global RNG is left alone, and the model's
    train/eval mode is kept. enc: a data.py tokenizer."""
    # no prompt: a new document
    start = enc.encode(prompt) or ([] if enc.eot is None else [enc.eot])
    if not start:
        raise ValueError(f"--prompt '': the {enc.name} tokenizer has no end-of-text token "
                         "to start a new document with: give a prompt")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    idx = torch.tensor(start, device=device).repeat(num_samples, 1)  # (N, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    # the padded vocabulary's extra rows never occur in data: draw from the tokenizer's tokens only
    out = generate(model, idx, max_new_tokens, top_k, temperature, gen, plan,
                   enc.vocab_size)  # (N, T + new)
    model.train(was_training)
    return [enc.decode(row) for row in out.tolist()]


def check(args):
    """A ValueError naming the first flag out of range."""
    for name, hi in (("num_samples", 10**4), ("max_new_tokens", 10**6), ("top_k", 10**7)):
        if not 1 <= getattr(args, name) <= hi:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a whole "
                             f"number from 1 to {hi:,}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature {args.temperature} must be above 0")
    if args.seed < 0:  # as train.py's --seed
        raise ValueError(f"--seed {args.seed}: must be 0 or more")


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--checkpoint", default="out/ckpt.pt", help="a train.py checkpoint")
    p.add_argument("--prompt", default=DEFAULTS["prompt"], help="'' starts a new document")
    p.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"],
                   help="texts to write")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"],
                   help="tokens after the prompt")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"],
                   help="draw from the k most likely next tokens")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help="divides the logits: below 1 sharper, above 1 flatter")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seeds the draws")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    args = p.parse_args(argv)
    with one_line_errors():
        check(args)
        device = pick_device(args.device)
        ckpt = runfolder.read(args.checkpoint, device)
        model, plan = runfolder.load_model(ckpt, device)
        enc = tokenizer(ckpt["tokenizer"])  # the tokenizer the model was trained with
        texts = sample(model, enc, args.prompt, args.num_samples, args.max_new_tokens,
                       args.top_k, args.temperature, args.seed, device, plan)
        for i, text in enumerate(texts):
            print(f"sample {i}: {text}")


if __name__ == "__main__":
    main()
