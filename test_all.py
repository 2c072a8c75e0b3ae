"""nanogrow's test suite: `python -m pytest -q test_all.py`. No network; offline copies of the data
come from ../shared/data (CI puts it beside the checkout).

Ordered by method, as the README is; test names carry the method, so `pytest -k apollo` (or
incremental, msg, growth, cost, data, hellaswag, plot, sweep, model, baseline, sample, export)
selects all of its tests."""
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

# ----------------------------------------------------------------------------------------------
# Shared fixtures and helpers


HERE = Path(__file__).resolve().parent
# offline copies of the public files the project downloads; CI has them in ../shared/data
SHARED = Path(os.environ.get("NANOGROW_TEST_DATA", HERE.parent / "shared" / "data"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

import tiktoken  # noqa: E402

import grow  # noqa: E402
import plot  # noqa: E402
import results  # noqa: E402
from hellaswag import (DATA_DIR_ENV, SCORING_TAG, download_split, evaluate,  # noqa: E402
                       load_examples, main as hs_main, predict, render, score_batch)
import data as data_mod  # noqa: E402
import prepare_fineweb as pf  # noqa: E402
import sweep  # noqa: E402
import train  # noqa: E402
from cost import (incremental_report, main as cost_main, paper_closed_form,  # noqa: E402
                  per_layer_phases)
from model import (GPT, GPTConfig, Plan, blocks_share, convert_hf_state_dict,  # noqa: E402
                   full_step_flops, peak_flops as model_peak, step_flops)
from fused_loss import FusedLoss, linear_cross_entropy  # noqa: E402
import config  # noqa: E402
import runfolder  # noqa: E402
from data import DataError  # noqa: E402
from prepare_fineweb import DownloadError  # noqa: E402
from export import main as export_main  # noqa: E402
from sample import DEFAULTS as SAMPLE_DEFAULTS, generate, main as sample_main, sample  # noqa: E402

SMALL = GPTConfig(block_size=32, vocab_size=512, n_layer=4, n_head=2, n_embd=32)


def small_model(seed=0, cfg=SMALL):
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(seed, n, vocab=512):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def incremental_schedule(L, S, steps, mode="freeze", **options):
    """The Schedule train.py runs for --stages S over `steps` incremental steps (then continual)."""
    return config.resolve(dict(n_layer=L, max_steps=2 * steps, inc_steps=steps, seed=0, warmup=0,
                               stages=S, phase1_mode=mode, **options)).build_schedule()


def growth_schedule(regime, L=12, steps=100, warmup=10, **given):
    return config.resolve(dict(regime=regime, n_layer=L, max_steps=steps, inc_steps=steps, seed=0,
                               warmup=warmup, **given)).build_schedule()


def load_model(path):
    """The GPT and eval Plan of the checkpoint at path, as sample.py and export.py load them."""
    return runfolder.load_model(runfolder.read(path))


def make_shards(folder, n_train=2, train_len=4097, val_len=2049, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_mod.write_shard(folder / "toy_val_000000.bin", rng.integers(0, 512, val_len))
    for i in range(n_train):
        data_mod.write_shard(folder / f"toy_train_{i + 1:06d}.bin", rng.integers(0, 512, train_len))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


TOY = ["--n-layer", "4", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--batch-size", "4",
       "--total-batch", "256", "--val-tokens", "256", "--eval-every", "4", "--warmup", "2",
       "--lr", "3e-3", "--min-lr", "3e-4", "--hellaswag-every", "0", "--device", "cpu"]


def run_train(out, data, *flags):
    train.main(["--preset", "tiny", "--data-dir", str(data), "--out", str(out), *TOY, *flags])
    return read_log(out)


def read_log(out):
    """Step records, the last one written for each step (a resumed run may log a step again)."""
    recs = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    return [steps[k] for k in sorted(steps)], [r for r in recs if "val_loss" in r]


def torchrun(out, data, *flags, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000), str(HERE / "train.py"),
           "--preset", "tiny", "--data-dir", str(data), "--out", str(out), *TOY, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_log(out)


def killed_run(out, data, at_step, *flags):
    """Run train.py in a subprocess and SIGTERM it once it prints step `at_step`: the stop path a
    cluster's preemption takes. Returns the step its checkpoint holds."""
    cmd = [sys.executable, "-u", str(HERE / "train.py"), "--preset", "tiny",
           "--data-dir", str(data), "--out", str(out), *TOY, "--ckpt-every", "100", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(f"step {at_step:5d} |"):
            proc.send_signal(signal.SIGTERM)  # checkpoints at the end of the step it is in
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # stopped, not finished
    return torch.load(out / "ckpt.pt", weights_only=True)["step"]


class FakeHub(BaseHTTPRequestHandler):
    """Serves server.routes {path: (body, headers)}; honours Range unless told not to; can fail
    on purpose."""

    def do_GET(self):
        hub = self.server
        rng = self.headers.get("Range")
        hub.log.append((self.path, rng))
        if hub.errors:  # answer the next requests with these status codes
            self.send_error(hub.errors.pop(0))
            return
        if self.path not in hub.routes:
            self.send_error(404)
            return
        body, headers = hub.routes[self.path]
        start = (int(rng.removeprefix("bytes=").removesuffix("-")) if rng and not hub.ignore_range
                 else 0)
        self.send_response(206 if rng and not hub.ignore_range else 200)
        if rng and not hub.ignore_range:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        rest = body[start:]
        if hub.drops:  # promise the full length, send a third, hang up
            hub.drops -= 1
            self.wfile.write(rest[:len(rest) // 3])
            self.close_connection = True
            return
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    (server.routes, server.log, server.errors, server.drops,
     server.ignore_range) = {}, [], [], 0, False
    server.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def dead_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


FAST = dict(retries=3, backoff=0.01)  # keep retry sleeps short


# ----------------------------------------------------------------------------------------------
# model.py: GPT-2 along a Plan, its FLOPs, the import graph


def test_model_shapes_and_initial_loss():
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
    model = small_model(cfg=cfg)
    x, y = tokens(1, 64, 50257), tokens(2, 64, 50257)
    logits, loss = model(x, y)
    assert logits.shape == (2, 64, 50304)
    assert abs(loss.item() - math.log(50257)) < 0.2  # a fresh model guesses uniformly


def test_model_weight_tying():
    model = small_model()
    assert model.transformer.wte.weight is model.lm_head.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    assert n == sum(p.numel() for name, p in model.named_parameters() if name != "lm_head.weight")


def test_model_hf_state_dict_round_trip():
    model = small_model()
    # Build what transformers' GPT2LMHeadModel would hold: Conv1D weights stored (in, out), plus
    # mask buffers
    hf = {}
    for k, v in model.state_dict().items():
        hf[k] = (v.t().clone() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                 else v.clone())
    for i in range(SMALL.n_layer):
        hf[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32)
        hf[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    other = small_model(seed=1)
    other.load_state_dict(convert_hf_state_dict(hf))
    x = tokens(0, 16)
    assert torch.equal(model(x)[0], other(x)[0])


def test_model_plan_skips_and_repeats_blocks():
    model = small_model().eval()
    x = tokens(0, 16)
    h = model.transformer
    pos = torch.arange(16)

    def by_hand(plan):
        z = h.wte(x) + h.wpe(pos)
        for b in plan:
            z = h.h[b](z)
        return model.lm_head(h.ln_f(z))

    with torch.no_grad():
        for blocks in ((0, 1, 2, 3), (0, 2), (1, 1, 1), (3, 0)):
            assert torch.allclose(model(x, plan=Plan(blocks))[0], by_hand(blocks), atol=1e-6)
        assert torch.equal(model(x)[0], model(x, plan=Plan((0, 1, 2, 3)))[0])
        assert not torch.allclose(model(x, plan=Plan((0, 1)))[0], model(x)[0])


def test_model_isolate_stops_backward_and_gates_interpolate():
    model = small_model()
    x = tokens(0, 16)
    _, loss = model(x, x, plan=Plan((0, 1, 2), isolate=2))
    loss.backward()
    assert all(p.grad is None for b in (0, 1) for p in model.transformer.h[b].parameters())
    assert all(p.grad is not None for p in model.transformer.h[2].parameters())
    assert model.transformer.wpe.weight.grad is None
    with torch.no_grad():  # μ = 0 skips the block; μ = 1 is the plain block
        assert torch.allclose(model(x, plan=Plan((0, 1), gates=(1.0, 0.0)))[0],
                              model(x, plan=Plan((0,)))[0], atol=1e-6)
        assert torch.equal(model(x, plan=Plan((0, 1), gates=(1.0, 1.0)))[0],
                           model(x, plan=Plan((0, 1)))[0])
        h = model.transformer  # μ = 0.5: halfway between skipping block 1 and running it
        z = h.h[0](h.wte(x) + h.wpe(torch.arange(16)))
        by_hand = h.ln_f(z + 0.5 * (h.h[1](z) - z))
        assert torch.allclose(model.hidden(x, Plan((0, 1), gates=(1.0, 0.5))), by_hand, atol=1e-6)


def counted_flops(model, sp, x, y):
    """FLOPs of one forward + backward as FlopCounterMode counts them: matmuls only (mm, addmm,
    bmm). Left out, as step_flops leaves them out: layer norms, GELU, softmax, cross-entropy,
    residual adds and the embedding backward (O(d) or O(V) per token, against O(d²) and O(d·V) for
    matmuls), and the optimizer (per parameter, not per token). The math SDPA backend builds
    attention from bmm, which the counter sees; on CPU the flash kernel would not be counted at
    all."""
    grow.set_trainable(model, sp)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(x, y, plan=Plan(tuple(range(sp.unique)), sp.isolate))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_model_step_flops_match_flop_counter():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=6, n_head=2, n_embd=32)
    model = GPT(cfg)
    B, seq = 2, cfg.block_size
    x, y = torch.randint(cfg.vocab_size, (2, B, seq))
    # S=3 stages of 2 layers, one step per phase: steps 4 and 5 are stage 3's phases 1 and 2
    schedules = {mode: incremental_schedule(cfg.n_layer, 3, 6, mode)
                 for mode in ("freeze", "isolate")}
    cases = {"stage 3 phase 1 freeze": schedules["freeze"].step_plan(4),
             "stage 3 phase 1 isolate": schedules["isolate"].step_plan(4),
             "stage 2 phase 2": schedules["freeze"].step_plan(3),
             "baseline": schedules["freeze"].step_plan(5)}
    assert cases["stage 3 phase 1 isolate"].isolate == 4 and len(cases["baseline"].trainable) == 6
    for name, sp in cases.items():
        want = step_flops(cfg, Plan(tuple(range(sp.unique)), sp.isolate), sp.trainable,
                          B * seq, seq)
        got = counted_flops(model, sp, x, y)
        assert got == pytest.approx(want, rel=0.02), name


def loss_and_grads(model, loss_fn):
    """loss_fn()'s loss and every parameter's gradient after its backward, by name (the tied
    wte / lm_head weight once, its gradient from the embedding and the head together)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def fused_loss(model, x, y, chunk):
    """The loss as FusedLoss computes it (on CUDA and under --compile), at any chunk size."""
    return FusedLoss(model, chunk=chunk)(x, y)[1]


def test_model_fused_loss_and_gradients_equal_eager_at_any_chunk():
    model = small_model()
    x, y = tokens(0, 29), tokens(1, 29)  # 58 tokens: chunks of 5 and 16 leave a shorter last one
    want_loss, want = loss_and_grads(model, lambda: model(x, y)[1])
    for chunk in (1, 5, 16, 58, 100):
        loss, got = loss_and_grads(model, lambda: fused_loss(model, x, y, chunk))
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0, msg=f"chunk {chunk}")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=f"chunk {chunk}")
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(fused_loss(model, x, y, 5), want_loss, rtol=1e-6, atol=0)


def test_model_fused_loss_under_bf16_autocast():
    """bf16 matmuls as the eager head's under autocast, the loss and the weight's gradient
    accumulated in fp32: within bf16 rounding of the eager path under the same autocast."""
    model = small_model()
    x, y = tokens(0, 29), tokens(1, 29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = loss_and_grads(model, lambda: model(x, y)[1])
        loss, got = loss_and_grads(model, lambda: fused_loss(model, x, y, 16))
    assert loss.dtype == want_loss.dtype == torch.float32
    assert abs(loss - want_loss) < 1e-2
    for name, g in got.items():
        assert (g - want[name]).abs().max() <= 0.02 * want[name].abs().max(), name


def test_model_fused_loss_keeps_the_heads_three_matmuls():
    """Gradients computed in forward, not logits recomputed in backward: the FLOPs step_flops
    counts for the head, 2·N·d·V forward and twice that backward."""
    N, C, V = 58, 32, 512
    x, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    y = torch.randint(V, (N,))
    # the counter has no formula for the in-place addmm_ that sums the weight's gradient: addmm's,
    # from the shapes of C += A (m, k) @ B (k, n)
    in_place = {torch.ops.aten.addmm_: lambda c, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1]}
    counts = []
    for loss_fn in (lambda: F.cross_entropy(F.linear(x, w), y),
                    lambda: linear_cross_entropy(x, w, y, 16)):
        with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
            loss_fn().backward()
        counts.append(counter.get_total_flops())
    assert counts == [3 * 2 * N * C * V] * 2


@pytest.mark.slow
def test_model_returns_logits_in_every_mode_and_training_fuses_the_loss_where_it_should(data):
    """model(x, y) is (logits, loss) eagerly and after compile_blocks, bit for bit as
    F.cross_entropy over the whole head; train.build_model trains through GPT's own loss on a CPU
    and through FusedLoss (no logits, the per-chunk step compiled) under --compile."""
    cfg = GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=32)  # compiles fast
    eager, compiled = small_model(cfg=cfg), small_model(cfg=cfg)
    compiled.compile_blocks()
    x, y = tokens(0, 29), tokens(1, 29)
    for model in (eager, compiled):
        logits, loss = model(x, y)
        assert logits.shape == (2, 29, 512)
        assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    torch.testing.assert_close(compiled(x, y)[0], eager(x, y)[0], rtol=1e-5, atol=1e-6)
    flags = dict(n_layer=1, n_head=2, n_embd=32, seq_len=32, data_dir=str(data))
    plain, compiled = config.resolve(flags), config.resolve({**flags, "compile": True})
    model, loss_model = train.build_model(plain, plain.model_config(), torch.device("cpu"))
    assert loss_model is model
    model, loss_model = train.build_model(compiled, compiled.model_config(), torch.device("cpu"))
    assert isinstance(loss_model, FusedLoss) and loss_model.compiled_step is not None
    assert loss_model(x, y)[0] is None  # the fused loss never holds the whole logits
    want_loss, want = loss_and_grads(model, lambda: F.cross_entropy(
        model.lm_head(model.hidden(x)).flatten(0, 1), y.flatten()))
    loss, got = loss_and_grads(model, lambda: loss_model(x, y)[1])
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_model_import_graph_runs_one_way():
    """model <- grow <- train; cost.py, the CLI, uses model and grow and never train."""
    code = ("import sys, {mod}; print(sorted(m for m in "
            "('model', 'grow', 'train', 'cost', 'hellaswag') "
            "if m in sys.modules))")
    imported = {mod: subprocess.run([sys.executable, "-c", code.format(mod=mod)], cwd=HERE,
                                    capture_output=True, text=True,
                                    check=True).stdout.split("\n")[0]
                for mod in ("model", "grow", "cost")}
    assert imported == {"model": "['model']", "grow": "['grow', 'model']",
                        "cost": "['cost', 'grow', 'model']"}


# ----------------------------------------------------------------------------------------------
# The baseline's machinery (train.py): LR, data, runs, DDP, resume, errors, budgets


def test_baseline_lr_schedule_at_known_steps():
    gpt2 = dict(lr=6e-4, min_lr=6e-5, warmup=715, max_steps=19073, schedule="cosine")
    lr = lambda step, **kw: train.get_lr(step, **{**gpt2, **kw})  # noqa: E731
    assert lr(0) == 6e-4 / 715 and lr(714) == 6e-4 and lr(715) == 6e-4
    mid = 715 + (19073 - 715) // 2
    assert lr(mid) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert lr(19073) == pytest.approx(6e-5) and lr(30000) == pytest.approx(6e-5)
    assert lr(5000, schedule="constant") == 6e-4 and lr(0, schedule="constant", warmup=0) == 6e-4
    # constant honours the warmup: a linear ramp, then the peak for good
    assert [lr(s, schedule="constant", warmup=4) for s in (0, 3, 4, 19073)] == [
        6e-4 / 4, 6e-4, 6e-4, 6e-4]
    # a rewarm ramps linearly from the stage's start and leaves the schedule alone after it
    assert lr(5000, stage_start=5000, rewarm=100) == lr(5000) / 100
    assert lr(5049, stage_start=5000, rewarm=100) == lr(5049) * 50 / 100
    assert lr(5100, stage_start=5000, rewarm=100) == lr(5100)
    assert lr(4999, stage_start=0, rewarm=0) == lr(4999)


def test_baseline_loader_two_ranks_read_every_token_once(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    # token values are their own positions, so we can see which were read
    data_mod.write_shard(folder / "a_train_000001.bin", np.arange(0, 1025))
    data_mod.write_shard(folder / "a_train_000002.bin", np.arange(2000, 3025))
    files, _ = sorted(folder.glob("*train*")), None
    B, T = 2, 64
    seen = []
    loaders = [data_mod.ShardLoader(files, B, T, rank, 2, seed=3) for rank in range(2)]
    for _ in range(8):  # 1024 inputs per shard / (2·64) = 8 windows per shard, 2 ranks
        for ld in loaders:
            x, y = ld.next_batch()
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
            seen += x.flatten().tolist()
    expected = list(range(0, 1024)) + list(range(2000, 3024))
    assert sorted(seen) == expected  # every token once, none twice
    assert loaders[0].state_dict() == {"epoch": 0, "shard": 1, "pos": 8,
                                       "shards": data_mod.fingerprint(loaders[0].files)}
    loaders[0].next_batch()
    assert loaders[0].state_dict()["epoch"] == 1
    # shard order differs between epochs (seeded), the same for every rank
    assert [loaders[0].order(e) for e in range(6)] == [loaders[1].order(e) for e in range(6)]
    assert len({tuple(loaders[0].order(e)) for e in range(6)}) == 2


def test_baseline_loader_refuses_bad_shards(tmp_path):
    bad = tmp_path / "x_train_000001.bin"
    data_mod.write_shard(bad, np.arange(100))
    raw = bytearray(bad.read_bytes())
    raw[0] = 7  # break the magic number
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="x_train_000001.bin"):
        data_mod.ShardLoader([bad], 2, 8, 0, 1, 0).next_batch()
    small = tmp_path / "y_train_000001.bin"
    data_mod.write_shard(small, np.arange(10))
    with pytest.raises(ValueError, match="fewer than one step's 1 windows of 2x8"):
        data_mod.ShardLoader([small], 2, 8, 0, 1, 0).next_batch()


def loader_windows(files, seed, world, per_step, steps, B=2, T=8):
    """The first token of each window the loaders read, in global micro-batch order: step by
    step, rank by rank within each micro-step, as the ranks of one run read them together."""
    loaders = [data_mod.ShardLoader(files, B, T, r, world, seed, per_step=per_step)
               for r in range(world)]
    read = []
    for _ in range(steps * per_step // world):
        read += [int(ld.next_batch()[0][0, 0]) for ld in loaders]
    return read


def test_baseline_seeds_set_the_data_order_and_ranks_share_it(tmp_path):
    """Each seed reads the windows in its own order, within and across shards; one epoch reads
    every window once; 2 ranks read, together, exactly the windows of one process, also where a
    shard's tail is skipped (41 windows of 16 tokens: a 4-window step leaves 1 over)."""
    files = [tmp_path / f"a_train_00000{i}.bin" for i in (1, 2)]
    for i, f in enumerate(files):  # a token is its position: window starts are multiples of 16
        data_mod.write_shard(f, np.arange(i * 1000, i * 1000 + 41 * 16 + 1))
    one = loader_windows(files, seed=1, world=1, per_step=4, steps=20)
    assert loader_windows(files, seed=1, world=2, per_step=4, steps=20) == one
    assert loader_windows(files, seed=1, world=4, per_step=4, steps=20) == one
    epoch = one[:80]  # 10 steps of 4 windows from each shard; the 41st window is skipped
    assert len(set(epoch)) == 80 and {w % 1000 % 16 for w in epoch} == {0}
    assert epoch != sorted(epoch)  # not in file order
    other = loader_windows(files, seed=2, world=1, per_step=4, steps=20)
    assert sum(a != b for a, b in zip(one, other)) > 70  # two seeds: different windows each step
    assert one[80:] != epoch  # the next epoch, a new order


def test_baseline_run_learns_and_logs(tmp_path, data):
    steps, evals = run_train(tmp_path, data, "--max-steps", "12")
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    rec = steps[0]
    assert {"step", "loss", "lr", "tokens", "flops", "dt", "stage", "phase", "active_layers",
            "trainable_layers"} <= set(rec)
    cfg = GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=32)
    full = list(range(4))
    assert rec["flops"] == step_flops(cfg, Plan(tuple(full)), full, 256, 32)
    assert steps[-1]["flops"] == 12 * rec["flops"] and steps[-1]["tokens"] == 12 * 256
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain data only
    assert ckpt["step"] == 12 and isinstance(ckpt["config"], dict)
    model, plan = load_model(tmp_path / "ckpt.pt")
    assert plan == Plan(tuple(full)) and model.config.n_layer == 4


@pytest.mark.slow
def test_baseline_resume_after_sigterm_reproduces_losses_exactly(tmp_path, data):
    full, _ = run_train(tmp_path / "a", data, "--max-steps", "10")
    out = tmp_path / "b"
    assert 3 <= killed_run(out, data, 3, "--max-steps", "10") < 10
    resumed, _ = run_train(out, data, "--max-steps", "10", "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["flops"] for r in resumed] == [r["flops"] for r in full]


@pytest.mark.slow
def test_baseline_ddp_two_ranks_match_one_process_with_twice_the_accumulation(tmp_path, data):
    one, v1 = run_train(tmp_path / "one", data, "--max-steps", "6", "--total-batch", "256")
    two, v2 = torchrun(tmp_path / "two", data, "--max-steps", "6", "--total-batch", "256")
    assert np.allclose([r["loss"] for r in one], [r["loss"] for r in two], atol=1e-5, rtol=0)
    assert np.allclose([r["val_loss"] for r in v1], [r["val_loss"] for r in v2], atol=1e-5, rtol=0)
    assert [r["flops"] for r in one] == [r["flops"] for r in two]


def one_line_error(main, argv, capsys, code=2):
    """Run a script's main(argv) in-process; it must exit with `code` and one line on stderr, no
    traceback. Returns the line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def train_error(tmp_path, data, capsys, *flags, data_dir=None, out="x"):
    argv = ["--preset", "tiny", "--data-dir", str(data_dir or data), "--out", str(tmp_path / out),
            *TOY, *flags]
    return one_line_error(train.main, argv, capsys)


def test_baseline_bad_inputs_give_one_line_errors(tmp_path, data, capsys):
    def error_of(*flags, data_dir=None):
        return train_error(tmp_path, data, capsys, *flags, data_dir=data_dir)

    assert "no train and val shards" in error_of(data_dir=tmp_path / "empty")
    assert "--total-batch 250 must be a multiple" in error_of("--total-batch", "250")
    assert "no checkpoint" in error_of("--resume")
    assert "--stages 5: use 1 to 4" in error_of("--stages", "5")
    assert "exceeds --max-steps" in error_of("--stages", "2", "--inc-steps", "20",
                                             "--max-steps", "10")
    assert "phase would be empty" in error_of("--stages", "4", "--inc-steps", "4",
                                              "--max-steps", "10")
    assert "must end at the model's 4 layers" in error_of("--regime", "apollo", "--grow-layers",
                                                          "1,2", "--grow-at", "0.5")
    assert "--stages cannot go with --regime apollo" in error_of("--regime", "apollo",
                                                                 "--stages", "2")
    assert "--grow-at cannot go with --regime incremental" in error_of("--grow-at", "0.5")
    assert "--msg-ramp only applies to --grow-op msg" in error_of("--msg-ramp", "5")
    assert "--budget-steps sets --max-steps" in error_of("--budget-steps", "5", "--max-steps", "5")
    assert "does not split into --n-head 3 heads" in error_of("--n-head", "3")
    assert "--min-lr 0.01 is above --lr 0.003" in error_of("--min-lr", "0.01")
    assert "shrink every weight past zero" in error_of("--weight-decay", "1000")
    assert "less than one batch of --batch-size 4 x --seq-len 100000" in error_of(
        "--seq-len", "100000", "--total-batch", "400000")
    assert "this machine has no CUDA device" in error_of("--device", "cuda")
    assert "--device tpu: use auto, cpu, cuda or mps" in error_of("--device", "tpu")
    assert "GiB for weights, gradients and AdamW" in error_of("--n-embd", "200000")
    corrupt = make_shards(tmp_path / "corrupt")
    victim = corrupt / "toy_train_000001.bin"
    victim.write_bytes(victim.read_bytes()[:3000])  # a truncated download
    assert "toy_train_000001.bin" in error_of("--max-steps", "40", data_dir=corrupt)


def test_baseline_val_tokens_zero_is_the_whole_split(data):
    """The val shard holds 2049 tokens: 2048 (+1 for the targets) fill 16 batches of 4 x 32; 2 x 32
    batches of 64 tokens fit 32 times; a batch longer than the split is refused in one line."""
    val = [data / "toy_val_000000.bin"]
    assert len(data_mod.ValSet(val, 0, 4, 32)) == 16 and len(data_mod.ValSet(val, 0, 2, 32)) == 32
    assert len(data_mod.ValSet(val, 256, 4, 32)) == 2
    with pytest.raises(ValueError,
                       match=r"the validation split \(2048 tokens\) is less than one batch"):
        data_mod.ValSet(val, 0, 4, 1024)


def help_entries(main, capsys):
    """A script's `--help`, one entry a flag ("--name METAVAR help..."), whitespace folded."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])
    return [" ".join(entry.split()) for entry in entries
            if entry.strip() and not entry.strip().startswith("-h")]


def test_baseline_budget_is_the_datas_whether_or_not_its_folder_exists(tmp_path, monkeypatch):
    """--budget-steps sizes the run with the data's vocabulary: the char preset's folder is made
    (from its input.txt) by whichever command asks first, sweep.py's or train.py's, and two at
    once take turns (the folder's lock), so every answer is the same."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    shutil.copy(SHAKESPEARE, folder / "input.txt")
    argv = ["--preset", "char", "--stages", "12", "--inc-steps", "60", "--budget-steps", "100"]
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(config.parse_args(argv).max_steps))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert data_mod.read_meta(folder)["vocab_size"] == 65
    answers.append(config.parse_args(argv).max_steps)  # the folder made: the same answer
    gpt2_vocab = config.parse_args([*argv, "--data-dir", str(tmp_path / "elsewhere")]).max_steps
    assert len(answers) == 3 and len(set(answers)) == 1 and answers[0] != gpt2_vocab


def test_baseline_every_default_is_written_once_in_config(capsys):
    """config.Config is the one definition of every train.py flag's default: --help lists each
    flag with the dataclass's default; presets and regimes only override flags that exist, each
    with a value other than the default (a repeated default would be a second definition)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config.Config)}
    entries = {entry.split()[0][2:].replace("-", "_"): entry
               for entry in help_entries(train.main, capsys)}
    assert entries.keys() == defaults.keys()
    for name, default in defaults.items():
        shown = "unset" if default is None else str(default)
        assert f"; default {shown}" in entries[name], name
    for overrides in (*config.PRESETS.values(), *grow.REGIMES.values()):
        for name, value in overrides.items():
            assert name in defaults and value != defaults[name], (name, value)
    for module in ("train.py", "grow.py", "model.py", "runfolder.py"):  # no default elsewhere
        assert "default=" not in (HERE / module).read_text(), module


@pytest.mark.parametrize("script", ["train", "cost", "sample", "export", "hellaswag",
                                    "prepare_fineweb", "sweep", "plot"])
def test_every_scripts_help_shows_every_default(script, capsys):
    """`python SCRIPT.py --help`: each flag's entry says its default, or that it is required."""
    entries = help_entries(__import__(script).main, capsys)
    assert entries and all(re.search(r"\bdefault\b|\(required\)", entry)
                           for entry in entries), entries


INT_FLAGS = ["--n-layer", "--n-head", "--n-embd", "--batch-size", "--seq-len", "--total-batch",
             "--max-steps", "--stages", "--inc-steps", "--eval-every", "--ckpt-every"]  # 1 or more
NON_NEGATIVE = ["--warmup", "--seed", "--msg-ramp", "--budget-steps", "--val-tokens",
                "--hellaswag-every", "--sample-every", "--bench"]


@pytest.mark.parametrize("flag,value", [(f, v) for f in INT_FLAGS for v in ("0", "-3", "1.5", "x")]
                         + [(f, v) for f in NON_NEGATIVE for v in ("-3", "1.5", "x")]
                         + [(f, v) for f in ("--lr", "--min-lr", "--weight-decay", "--grad-clip",
                                             "--phase1-frac")
                            for v in ("-1", "nan", "inf", "x")]
                         + [("--lr", "0"), ("--phase1-frac", "1.5"), ("--seed", str(2**40)),
                            ("--rewarm", "-2"), ("--hellaswag-limit", "0"), ("--preset", "huge"),
                            ("--regime", "x"), ("--schedule", "x")]
                         + [(f, str(10**20)) for f in ("--max-steps", "--inc-steps",
                                                       "--budget-steps")])
def test_baseline_flag_sweep_refuses_every_bad_value(tmp_path, data, capsys, flag, value):
    """Zero, negative, malformed and out-of-range values of every numeric flag: refused before any
    work, in one line that names the flag and the value."""
    extra = {"--msg-ramp": ["--regime", "msg"],
             "--hellaswag-limit": ["--hellaswag-every", "5"]}.get(flag, [])
    err = train_error(tmp_path, data, capsys, *extra, flag, value)
    assert flag in err and value.lower() in err.lower(), err
    assert not (tmp_path / "x").exists()  # nothing was written


def test_baseline_mfu_on_every_step_when_the_peak_is_known(tmp_path, data, capsys):
    steps, _ = run_train(tmp_path / "a", data, "--max-steps", "2")
    assert all("mfu" not in r for r in steps)  # a CPU has no known peak
    steps, _ = run_train(tmp_path / "b", data, "--max-steps", "2", "--peak-flops", "1e12")
    flops = steps[0]["flops"]
    assert all(r["mfu"] == pytest.approx(flops / (r["dt"] * 1e12)) for r in steps)
    assert "| MFU " in capsys.readouterr().out
    assert (model_peak("NVIDIA H100 80GB HBM3") == 989e12
            and model_peak("NVIDIA H100 PCIe") == 756e12)
    assert model_peak("NVIDIA A100-SXM4-80GB") == 312e12 and model_peak("Tesla T4") is None


@pytest.mark.slow
def test_baseline_ddp_ranks_exit_cleanly_with_compile(tmp_path, data):
    """Two gloo ranks with --compile, started from a script that imports train and calls main (as
    notebooks and tests do), end on their own, several times in a row."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport train\n"
                      "train.main(sys.argv[1:])\n")
    for i in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29600 + os.getpid() % 300 + i), str(driver), "--preset", "tiny",
               "--data-dir", str(data), "--out", str(tmp_path / f"run{i}"), *TOY, "--compile",
               "--regime", "apollo", "--grow-layers", "1,2,4", "--grow-at", "0.25,0.5",
               "--max-steps", "6"]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert read_log(tmp_path / f"run{i}")[0][-1]["step"] == 6


def test_baseline_wsd_schedule_at_known_steps():
    wsd = dict(lr=1e-3, min_lr=1e-4, warmup=100, max_steps=1000, schedule="wsd")
    lr = lambda step, **kw: train.get_lr(step, **{**wsd, **kw})  # noqa: E731
    assert lr(0) == 1e-3 / 100 and lr(99) == 1e-3  # warmup
    assert lr(100) == lr(500) == lr(800) == 1e-3  # stable until the last 20%
    assert lr(900) == pytest.approx(1e-3 - 0.9e-3 * 0.5) and lr(1000) == pytest.approx(1e-4)
    assert lr(900, decay_shape="sqrt") == pytest.approx(1e-3 - 0.9e-3 * 0.5 ** 0.5)
    assert lr(700, decay_frac=0.5) == pytest.approx(1e-3 - 0.9e-3 * 0.4)
    assert lr(5000) == pytest.approx(1e-4)  # past the end it stays at the minimum


def test_baseline_grad_clip_zero_means_no_clipping(tmp_path, data):
    clipped, _ = run_train(tmp_path / "a", data, "--max-steps", "3", "--grad-clip", "1e-3")
    free, _ = run_train(tmp_path / "b", data, "--max-steps", "3", "--grad-clip", "0")
    huge, _ = run_train(tmp_path / "c", data, "--max-steps", "3", "--grad-clip", "1e9")
    # 0 leaves every gradient as it is
    assert [r["loss"] for r in free] == [r["loss"] for r in huge]
    assert [r["loss"] for r in free][1:] != [r["loss"] for r in clipped][1:]


def test_baseline_resume_extends_and_refuses_rewriting_the_past(tmp_path, data, capsys):
    run_train(tmp_path, data, "--max-steps", "4")
    assert "--seed: 1337 there, 7 here" in train_error(tmp_path, data, capsys, "--max-steps", "4",
                                                      "--seed", "7", "--resume", out=".")
    # a finished run trains further, and the resume record says what changed
    steps, _ = run_train(tmp_path, data, "--max-steps", "6", "--resume")
    assert [r["step"] for r in steps] == list(range(1, 7))
    resumed = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
               if "resumed" in line]
    assert resumed == [{"step": 4, "resumed": True, "changed": {"max_steps": [4, 6]}}]
    assert "resuming at step 4; --max-steps 4 -> 6" in capsys.readouterr().out
    # a growth regime's stages start at fractions of --max-steps: moving one already crossed is
    # refused
    apollo = ["--regime", "apollo", "--grow-layers", "1,2,4", "--grow-at", "0.25,0.5"]
    run_train(tmp_path / "g", data, *apollo, "--max-steps", "8")
    err = train_error(tmp_path, data, capsys, *apollo, "--max-steps", "16", "--resume", out="g")
    assert "--max-steps 16 moves a stage boundary this run crossed" in err and "step 2" in err


def test_baseline_nan_keeps_last_good_and_resume_may_lower_the_lr(tmp_path, data, capsys):
    run_train(tmp_path, data, "--max-steps", "4")
    # poison the weights: the next step's loss is NaN, the run stops, the checkpoint stays as it was
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    err = train_error(tmp_path, data, capsys, "--max-steps", "8", "--resume", out=".")
    assert "loss is nan at step 5" in err and "--resume with a lower --lr" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # the advice is taken: a lower --lr is accepted on resume (these weights are NaN, so NaN again)
    err = train_error(tmp_path, data, capsys, "--max-steps", "8", "--lr", "1e-4",
                      "--min-lr", "1e-5", "--resume", out=".")
    assert "loss is nan at step 5" in err and "start over in another --out" in err
    # ... and its second half: a new run with the lower --lr trains
    steps, _ = run_train(tmp_path / "again", data, "--max-steps", "2", "--lr", "1e-4",
                         "--min-lr", "1e-5")
    assert all(math.isfinite(r["loss"]) for r in steps)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "foreign", "empty"])
def test_baseline_unreadable_checkpoint_is_one_line(tmp_path, data, capsys, damage):
    run_train(tmp_path, data, "--max-steps", "2")
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(b"")
    err = train_error(tmp_path, data, capsys, "--max-steps", "4", "--resume", out=".")
    assert str(path) in err and ("not a readable checkpoint" in err
                                 or "not a train.py checkpoint" in err)
    assert "delete it (and its run's log.jsonl) to start that run over" in err  # the run's own
    err = one_line_error(hs_main, ["--checkpoint", str(path), "--data-file", str(VAL),
                                   "--limit", "4", "--device", "cpu"], capsys)
    # a checkpoint given to read, not the run's own: give another, never delete it
    assert str(path) in err and "give the ckpt.pt of a train.py run" in err
    assert "delete" not in err


@pytest.mark.slow
def test_baseline_one_run_per_folder(tmp_path, data, capsys):
    run_train(tmp_path, data, "--max-steps", "2")
    err = train_error(tmp_path, data, capsys, "--max-steps", "2", out=".")
    assert "holds an earlier run (its ckpt.pt): continue it with --resume" in err
    # a second process while the first runs is refused; killing the first leaves no stale lock
    cmd = [sys.executable, "-u", str(HERE / "train.py"), "--preset", "tiny",
           "--data-dir", str(data), "--out", str(tmp_path / "busy"), *TOY,
           "--max-steps", "100000", "--eval-every", "100000"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step     2 |"):
                break
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert (second.returncode == 2
                and f"is in use by another run (pid {first.pid})" in second.stderr)
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # it got past the lock: the killed run had no checkpoint yet, and its log is named
    assert again.returncode == 2 and "stopped before its first checkpoint" in again.stderr


def test_baseline_checkpoint_write_failure_keeps_the_last_good_one(tmp_path, data, capsys,
                                                                    monkeypatch):
    run_train(tmp_path, data, "--max-steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, path):  # torch.save's own words when the disk fills mid-write
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(runfolder.torch, "save", full_disk)
    err = train_error(tmp_path, data, capsys, "--max-steps", "4", "--resume", out=".")
    assert "could not write" in err and "the previous checkpoint is intact" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_baseline_torn_log_line_then_resume_then_plot(tmp_path, data, capsys):
    run_train(tmp_path, data, "--max-steps", "4")
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # a crash mid-write
    assert len(plot.read_log(tmp_path)["steps"]) == 4  # plot.py skips a torn last line
    assert "skipped a torn last line" in capsys.readouterr().err
    # cuts it away, then appends whole lines
    run_train(tmp_path, data, "--max-steps", "6", "--resume")
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert [r["step"] for r in plot.read_log(tmp_path)["steps"]] == list(range(1, 7))
    with open(log, "a") as f:
        # a bad record that is not the last line
        f.write('{"step": 7, "val_loss": 3.0}\n{"oops"}\n')
    # line 13: 6 step records, 4 evaluations, the resume record, then the valid evaluation above it
    with pytest.raises(ValueError, match=r"log.jsonl:13: not a JSON record"):
        plot.read_log(tmp_path)


@pytest.mark.slow
def test_baseline_signals_first_acknowledged_second_stops_at_once(tmp_path, data):
    def start(out):
        cmd = [sys.executable, "-u", str(HERE / "train.py"), "--preset", "tiny",
               "--data-dir", str(data), "--out", str(out), *TOY, "--max-steps", "100000",
               "--eval-every", "100000", "--ckpt-every", "3"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    once = start(tmp_path / "once")
    for line in once.stdout:
        if line.startswith("step     4 |"):
            once.send_signal(signal.SIGINT)
            break
    assert once.wait(timeout=120) == 130  # checkpointed, but not finished: `&& next` stops
    assert ("stopping after this step, checkpoint follows; Ctrl-C again to stop now"
            in once.stderr.read())
    assert torch.load(tmp_path / "once" / "ckpt.pt", weights_only=True)["step"] >= 4

    twice = start(tmp_path / "twice")
    for line in twice.stdout:
        if line.startswith("step     4 |"):  # the checkpoint of step 3 is on disk
            before = (tmp_path / "twice" / "ckpt.pt").read_bytes()
            # two signals of one kind may merge into one: use two kinds
            twice.send_signal(signal.SIGTERM)
            twice.send_signal(signal.SIGINT)
            break
    assert twice.wait(timeout=120) == 130
    err = twice.stderr.read()
    assert "stopped at once" in err and "Traceback" not in err
    assert (tmp_path / "twice" / "ckpt.pt").read_bytes() == before
    assert not (tmp_path / "twice" / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("script", ["train", "sweep", "plot", "cost", "prepare_fineweb",
                                    "hellaswag", "sample", "export", "results"])
def test_every_script_stopped_while_loading_leaves_no_traceback_and_nothing_written(tmp_path,
                                                                                   script):
    """Ctrl-C while torch and the rest are still loading (1-2 s): the script ends at once, as
    SIGINT's default does, with no traceback, and has written nothing. The signal goes once the
    script is loading libraries from site-packages with SIGINT not caught (cli has run, the parser
    not yet), seen in /proc, not after a fixed wait that a loaded machine can outrun. It starts
    with SIGINT at its default, as from a terminal, even where the tests run in the background
    (a shell's background job inherits SIGINT ignored)."""
    proc = subprocess.Popen([sys.executable, str(HERE / f"{script}.py"), "--out",
                             str(tmp_path / "out")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc_dir, deadline = Path(f"/proc/{proc.pid}"), time.monotonic() + 60
    while not (re.search(r"(site|dist)-packages/\S+\.so", (proc_dir / "maps").read_text())
               and not int(re.search(r"SigCgt:\s*(\w+)", (proc_dir / "status").read_text())[1],
                           16) >> (signal.SIGINT - 1) & 1):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err, (out, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--stages", "2", "--phase1-mode", "isolate"],
                                   ["--regime", "zero", "--grow-layers", "1,2,4",
                                    "--grow-at", "0.25,0.5"]])
def test_baseline_budget_steps_spend_the_baselines_flops(tmp_path, data, flags):
    steps, evals = run_train(tmp_path, data, *flags, "--budget-steps", "8", "--inc-steps", "8")
    cfg = GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=32)
    budget = 8 * full_step_flops(cfg, 256, 32)
    assert len(steps) > 8  # cheaper steps buy more of them
    assert steps[-2]["flops"] < budget <= steps[-1]["flops"]
    assert [r["step"] for r in evals if r.get("equal_cost")] == [len(steps)]


def test_baseline_char_preset_makes_its_data_and_its_blocks_are_the_flops(tmp_path, monkeypatch,
                                                                          capsys):
    """--preset char tokenizes Tiny Shakespeare by character into data/shakespeare_char on first
    use; at its shape the blocks are at least 95% of the training FLOPs (cost.py --split says
    so)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    shutil.copy(SHAKESPEARE, tmp_path / "data" / "shakespeare_char" / "input.txt")
    train.main(["--preset", "char", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                "--seq-len", "32", "--batch-size", "4", "--total-batch", "128",
                "--val-tokens", "256", "--max-steps", "1", "--device", "cpu", "--out", "out"])
    # nanoGPT's 65 characters
    assert data_mod.read_meta("data/shakespeare_char")["vocab_size"] == 65
    assert torch.load("out/ckpt.pt", weights_only=True)["model_config"]["vocab_size"] == 65
    assert "vocabulary 65 char" in capsys.readouterr().out
    args = config.parse_args(["--preset", "char"])
    cfg = args.model_config()
    assert (cfg.n_layer, cfg.vocab_size, args.seq_len, args.hellaswag_every) == (12, 65, 64, 0)
    assert blocks_share(cfg, args.seq_len) >= 0.95
    cost_main(["--split", "--n-embd", str(cfg.n_embd), "--vocab", "65",
               "--seq-len", str(args.seq_len)])
    assert capsys.readouterr().out.endswith(f"blocks {blocks_share(cfg, args.seq_len):.1%}\n")


# ----------------------------------------------------------------------------------------------
# Incremental training (Li, Fung & Huang): stages, phase 1, stage entry, DDP, resume


@pytest.mark.parametrize("S,sizes", [(4, [3, 3, 3, 3]), (8, [2, 1, 2, 1, 2, 1, 2, 1]),
                                     (12, [1] * 12)])
def test_incremental_plan_on_12_layers(S, sizes):
    stages = grow.incremental_stages(12, S, 10000)
    schedule = grow.Schedule(tuple(stages), 12)
    active = [s.layers for s in stages[:-1]]
    assert np.diff([0] + active).tolist() == sizes
    assert [s.start for s in stages] == [i * 10000 // S for i in range(S)] + [10000]
    assert stages[-1] == grow.Stage(10000, 12, 0)  # continual training, all layers
    for i, st in enumerate(stages[:-1]):
        end = stages[i + 1].start
        assert st.phase1 == round((end - st.start) / 2)
        p1, p2 = schedule.step_plan(st.start), schedule.step_plan(end - 1)
        assert (p1.stage, p1.phase, p2.phase) == (i + 1, 1, 2)
        prev = active[i - 1] if i else 0
        assert (p1.trainable == tuple(range(prev, st.layers))
                and p2.trainable == tuple(range(st.layers)))
        assert schedule.step_plan(st.start + st.phase1).phase == 2
        assert schedule.step_plan(st.start + st.phase1 - 1).phase == 1
    last = schedule.step_plan(10000)
    assert last.trainable == tuple(range(12)) and last.stage == S + 1
    assert grow.incremental_stages(12, S, 10000, freeze="none")[0].phase1 == 0


def phase1_step(mode):
    """One phase-1 step of stage 2 (blocks 0-1 old, 2-3 new), as train.py takes it."""
    model = small_model()
    sp = incremental_schedule(4, 2, 100, mode).step_plan(50)
    assert sp.phase == 1 and sp.trainable == (2, 3)
    grow.set_trainable(model, sp)
    opt = model.configure_optimizer(1e-2, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens(0, 32)
    _, loss = model(x, x, plan=Plan((0, 1, 2, 3), sp.isolate))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.step()
    return model, before, grads, sp


@pytest.mark.parametrize("mode", ["freeze", "isolate"])
def test_incremental_phase1_trains_only_new_blocks(mode):
    model, before, grads, sp = phase1_step(mode)
    after = model.state_dict()
    for k in before:
        if k.startswith(("transformer.h.0.", "transformer.h.1.")):
            assert torch.equal(before[k], after[k]), k
            assert grads[k] is None
        if k.startswith(("transformer.h.2.", "transformer.h.3.")) and k.endswith("weight"):
            assert not torch.equal(before[k], after[k]), k
    # the tied head trains
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    # freeze passes gradients through the old blocks to wpe; isolate stops above them
    assert (grads["transformer.wpe.weight"] is None) == (mode == "isolate")


def test_incremental_isolate_cuts_backward_flops():
    counted = {}
    for mode in ("freeze", "isolate"):
        model = small_model()
        sp = incremental_schedule(4, 2, 100, mode).step_plan(50)
        grow.set_trainable(model, sp)
        x = tokens(0, 32)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            _, loss = model(x, x, plan=Plan((0, 1, 2, 3), sp.isolate))
            loss.backward()
        counted[mode] = fc.get_total_flops()
        assert counted[mode] == step_flops(SMALL, Plan((0, 1, 2, 3), sp.isolate), sp.trainable,
                                           x.numel(), 32)
    assert counted["isolate"] < counted["freeze"]


def test_incremental_enter_stage_grows_resets_and_sets_what_trains():
    """train.enter_stage alone, no DDP, no subprocess: stage 2 of 2 on 4 layers adds blocks 2-3."""
    schedule = incremental_schedule(4, 2, 8, grow_op="copy-top", continual_optimizer="fresh")
    model = small_model()
    opt = model.configure_optimizer(1e-3, 0.1)
    fresh = []
    run = SimpleNamespace(schedule=schedule, model=model, loss_model=model, world=1,
                          device=torch.device("cpu"),
                          new_optimizer=lambda: fresh.append(model.configure_optimizer(1e-3, 0.1))
                          or fresh[-1])
    state = runfolder.RunState()
    sp = schedule.step_plan(0)
    opt, wrapped, trains = enter_stage_and_check(run, opt, state, sp, None)
    assert wrapped is model and trains == (sp.trainable, 0) and not fresh
    assert train.enter_stage(run, opt, state, schedule.step_plan(1), trains) is None  # no change
    sp = schedule.step_plan(4)  # stage 2, phase 1: only the new blocks train
    assert (sp.stage, sp.phase, sp.trainable) == (2, 1, (2, 3))
    block1 = {k: v.clone() for k, v in model.transformer.h[1].state_dict().items()}
    opt2, out, trains = enter_stage_and_check(run, opt, state, sp, trains)
    assert opt2 is opt and not fresh and out is model and state.entered == 2  # growth keeps AdamW
    for k, v in model.transformer.h[3].state_dict().items():  # copy-top: block 3 copies block 1
        assert torch.equal(v, block1[k])
    assert ([b.c_attn.weight.requires_grad for b in (h.attn for h in model.transformer.h)]
            == [False, False, True, True])
    sp = schedule.step_plan(8)  # continual training: every block, a fresh AdamW as asked
    assert (sp.stage, sp.trainable) == (3, (0, 1, 2, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt3, _, _ = enter_stage_and_check(run, opt2, state, sp, trains)
    assert opt3 is fresh[0] and state.entered == 3
    # 4 -> 4 blocks: no growth
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def enter_stage_and_check(run, opt, state, sp, trains):
    entered = train.enter_stage(run, opt, state, sp, trains)
    model = run.model
    trainable = {i for i, b in enumerate(model.transformer.h)
                 if all(p.requires_grad for p in b.parameters())}
    assert trainable == set(sp.trainable)
    return entered


def test_incremental_startup_summary_matches_the_run(tmp_path, data, capsys):
    steps, _ = run_train(tmp_path, data, "--stages", "2", "--inc-steps", "8", "--max-steps", "10")
    out = capsys.readouterr().out
    assert "gradient accumulation 2, 256 tokens a step" in out and "4 layers x" in out
    starts = [int(s) for s in re.findall(r"from step +(\d+): stage", out)]
    changed = [r["step"] - 1 for i, r in enumerate(steps)
               if i == 0 or (r["stage"], r["phase"]) != (steps[i - 1]["stage"],
                                                         steps[i - 1]["phase"])]
    assert starts == changed == [0, 2, 4, 6, 8]


def test_incremental_the_authors_exact_recipe_is_what_the_run_records(tmp_path, data):
    """README's command for the released code's settings: constant LR, no clipping, fp32, fresh
    AdamW for continual training."""
    recipe = ["--schedule", "constant", "--warmup", "0", "--grad-clip", "0", "--precision", "fp32",
              "--continual-optimizer", "fresh"]
    steps, _ = run_train(tmp_path, data, "--stages", "2", "--inc-steps", "8", "--max-steps", "10",
                         *recipe)
    # TOY's --lr, from the first step: no warmup, no decay
    assert {r["lr"] for r in steps} == {3e-3}
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert ((config["grad_clip"], config["precision"], config["continual_optimizer"])
            == (0, "fp32", "fresh"))
    assert (incremental_schedule(4, 2, 8, continual_optimizer="fresh").stages[-1].optimizer
            == "fresh")


@pytest.mark.slow
def test_incremental_ddp_matches_one_process_across_phase_and_stage_boundaries(tmp_path, data):
    flags = ["--stages", "2", "--inc-steps", "8", "--max-steps", "10", "--phase1-mode", "isolate"]
    one, _ = run_train(tmp_path / "one", data, *flags)
    two, _ = torchrun(tmp_path / "two", data, *flags)
    assert [(r["stage"], r["phase"]) for r in one] == [(1, 1)] * 2 + [(1, 2)] * 2 + [(2, 1)] * 2 + \
        [(2, 2)] * 2 + [(3, 2)] * 2
    assert np.allclose([r["loss"] for r in one], [r["loss"] for r in two], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_incremental_resume_across_stage_and_continual_boundaries(tmp_path, data):
    flags = ["--stages", "2", "--inc-steps", "8", "--max-steps", "12", "--grow-op", "copy-top",
             "--continual-optimizer", "fresh"]
    full, _ = run_train(tmp_path / "a", data, *flags)
    out = tmp_path / "b"
    assert killed_run(out, data, 2, *flags) <= 4  # stage 2 starts at step 4
    resumed, _ = run_train(out, data, *flags, "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["stage"] for r in resumed] == [1] * 4 + [2] * 4 + [3] * 4


# ----------------------------------------------------------------------------------------------
# Apollo (Pan et al.): LVPS, weight sharing, interpolation, its FLOPs


@pytest.mark.parametrize("u,p_u,mean", [(1, 0.736, 1.77), (3, 0.637, 4.23), (6, 0.648, 7.14)])
def test_apollo_lvps_matches_its_closed_form(u, p_u, mean):
    x = np.random.default_rng(0).uniform(grow.X_MIN, 1.0, 200_000)
    d = grow.lvps_depth(x, u, 12)
    assert d.min() >= u and d.max() <= 12
    probs = grow.lvps_probs(u, 12)
    assert sorted(probs) == list(range(u, 13)) and sum(probs.values()) == pytest.approx(1.0)
    emp = np.bincount(d, minlength=13)[u:] / len(d)
    assert np.abs(emp - [probs[k] for k in range(u, 13)]).max() < 0.005  # ~4 standard errors
    assert probs[u] == pytest.approx(p_u, abs=0.001) and emp[0] == pytest.approx(p_u, abs=0.005)
    assert sum(k * p for k, p in probs.items()) == pytest.approx(mean, abs=0.005)
    assert d.mean() == pytest.approx(mean, abs=0.02)
    # the hyperbola's closed form for u < k < L: P(d = k) = m·u·(1/k − 1/(k+1)) / (1 − x_min)
    k = u + 2
    b = 12 / u + 0.4
    n = (b * grow.X_MIN - 0.6) / (0.6 - b)
    assert probs[k] == pytest.approx(0.6 * (n + 1) * u * (1 / k - 1 / (k + 1)) / (1 - grow.X_MIN))


def test_apollo_depth_samplers_are_pure_and_in_range():
    assert (grow.lvps_depth(np.random.default_rng(1).uniform(size=1000), 12, 12).tolist()
            == [12] * 1000)
    draws = [grow.sample_depth("lvps", 3, 12, 7, s, m) for s in range(50) for m in range(4)]
    assert draws == [grow.sample_depth("lvps", 3, 12, 7, s, m) for s in range(50) for m in range(4)]
    assert set(draws) > {3} and set(draws) <= set(range(3, 13))
    uni = [grow.sample_depth("uniform", 3, 12, 7, s, 0) for s in range(400)]
    assert set(uni) == set(range(3, 13))
    assert (grow.sample_depth("full", 3, 12, 7, 0, 0) == 12
            and grow.sample_depth("unique", 3, 12, 7, 0, 0) == 3)


def test_apollo_sharing_and_growth_maps():
    assert grow.layer_plan(12, 3) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert grow.layer_plan(4, 3) == [0, 0, 1, 2]
    assert grow.layer_plan(6, 3, "cyclic") == [0, 1, 2, 0, 1, 2]
    assert all(grow.layer_plan(d, u) == [t * u // d for t in range(d)]
               for d in range(1, 40) for u in range(1, d + 1))
    assert grow.growth_map(1, 3, "interp") == [0, 0, 0]
    assert grow.growth_map(3, 6, "interp") == [0, 0, 1, 1, 2, 2]
    assert grow.growth_map(6, 12, "interp") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert grow.growth_map(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert grow.growth_map(3, 12, "stack") == [0, 1, 2] * 4  # G_stack, g = 4
    assert grow.growth_map(3, 5, "copy-top") == [0, 1, 2, 1, 2]
    assert grow.growth_map(2, 4, "zero") == [0, 1, None, None]


def test_apollo_interpolation_preserves_the_function_only_at_integer_ratios():
    cfg = GPTConfig(block_size=32, vocab_size=512, n_layer=12, n_head=2, n_embd=32)
    x = tokens(0, 16)
    for u, u2, same in [(1, 3, True), (3, 6, True), (6, 12, True), (4, 6, False)]:
        model = small_model(cfg=cfg).eval()
        with torch.no_grad():
            before = {d: model(x, plan=Plan(tuple(grow.layer_plan(d, u))))[0]
                      for d in range(u2, 13)}
            grow.grow(model.transformer.h, u, u2, "interp")
            kept = [torch.allclose(logits, model(x, plan=Plan(tuple(grow.layer_plan(d, u2))))[0],
                                   atol=1e-5)
                    for d, logits in before.items()]
        # 4 -> 6 happens to keep depth 6 ([0,0,1,2,2,3] either way) but not the others
        assert all(kept) if same else not all(kept), (u, u2, kept)


def test_apollo_flops_column_is_the_sum_of_sampled_depth_costs(tmp_path, data):
    steps, _ = run_train(tmp_path, data, "--regime", "apollo", "--max-steps", "20",
                         "--grow-layers", "1,2,4", "--grow-at", "0.25,0.5")
    cfg = GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=32)
    total, seen = 0, set()
    for r in steps:
        u = r["unique_layers"]
        # 2 micro-batches a step
        assert len(r["depth"]) == 2 and all(u <= d <= 4 for d in r["depth"])
        for d in r["depth"]:
            total += step_flops(cfg, Plan(tuple(grow.layer_plan(d, u))), range(u), 128, 32)
            seen.add((u, d))
        assert r["flops"] == total
    assert [r["unique_layers"] for r in steps] == [1] * 5 + [2] * 5 + [4] * 10
    assert len({d for u, d in seen if u == 1}) > 1  # LVPS really varies the depth
    model, plan = load_model(tmp_path / "ckpt.pt")  # the end product is a plain 4-layer GPT
    assert plan == Plan((0, 1, 2, 3))


@pytest.mark.slow
def test_apollo_same_tokens_meet_the_same_depth_on_one_process_or_two_ranks(tmp_path, data):
    """Depths are keyed by the global micro-batch index: 2 gloo ranks at accumulation 1 read and
    run what 1 process runs at accumulation 2, so Apollo's numbers do not depend on the GPU
    count."""
    flags = ["--regime", "apollo", "--max-steps", "8", "--grow-layers", "1,2,4",
             "--grow-at", "0.25,0.5", "--total-batch", "256",
             "--depth", "uniform"]  # uniform: depths differ more often than LVPS's
    one, _ = run_train(tmp_path / "one", data, *flags)  # batch 4 x 32: 2 micro-batches a step
    two, _ = torchrun(tmp_path / "two", data, *flags)  # 1 micro-batch a step on each rank
    assert [r["depth"] for r in one] == [r["depth"] for r in two]
    # the ranks really ran different depths in a step
    assert any(len(set(r["depth"])) > 1 for r in two)
    assert np.allclose([r["loss"] for r in one], [r["loss"] for r in two], atol=1e-5, rtol=0)
    assert [r["flops"] for r in one] == [r["flops"] for r in two]  # every rank's depths counted


def test_apollo_slowest_rank_sets_the_pace():
    """cost.py's expected FLOPs of the slowest of N ranks: the mean for one rank or fixed depths,
    above it for several ranks with random depths, and exact on a case worked by hand."""
    from cost import slowest_rank_step_flops
    cfg = GPTConfig(n_layer=12)
    lvps = grow.Schedule((grow.Stage(0, 3),), 12, depth="lvps")
    sp = lvps.step_plan(0)
    mean = float(grow.expected_step_flops(cfg, lvps, sp, grow.depth_probs("lvps", 3, 12),
                                          1024, 1024))
    assert (slowest_rank_step_flops(cfg, lvps, sp, 1, 1, 1024, 1024)
            == pytest.approx(mean, rel=1e-12))
    assert slowest_rank_step_flops(cfg, lvps, sp, 8, 1, 1024, 1024) > 8 * mean * 1.2
    fixed = grow.Schedule((grow.Stage(0, 3),), 12)
    sp_fixed = fixed.step_plan(0)
    one = step_flops(cfg, Plan((0, 1, 2)), sp_fixed.trainable, 1024, 1024)
    assert (slowest_rank_step_flops(cfg, fixed, sp_fixed, 8, 2, 1024, 1024)
            == pytest.approx(16 * one))
    # uniform over depths 11 and 12 on 2 ranks: the slower is 12 unless both draw 11 (p = 1/4)
    two = grow.Schedule((grow.Stage(0, 11),), 12, depth="uniform")
    sp2 = two.step_plan(0)
    cost = {d: step_flops(cfg, Plan(tuple(grow.layer_plan(d, 11))), sp2.trainable, 1024, 1024)
            for d in (11, 12)}
    want = 2 * (cost[11] / 4 + cost[12] * 3 / 4)
    assert (slowest_rank_step_flops(cfg, two, sp2, 2, 1, 1024, 1024)
            == pytest.approx(want, rel=1e-12))


def test_apollo_expectation_matches_the_sampler():
    """E[FLOPs] from depth_probs against the average over the depths train.py actually draws."""
    L = 12
    cfg = GPTConfig(n_layer=L)
    for u in (1, 3, 6):
        schedule = grow.Schedule((grow.Stage(0, u),), L, depth="lvps")
        sp = schedule.step_plan(0)
        probs = grow.depth_probs("lvps", u, L)
        expected = float(grow.expected_step_flops(cfg, schedule, sp, probs, 1, 1024))
        per_depth = {d: step_flops(cfg, Plan(tuple(grow.layer_plan(d, u))), sp.trainable, 1, 1024)
                     for d in range(u, L + 1)}
        drawn = np.array([per_depth[grow.sample_depth("lvps", u, L, 1337, step, 0)]
                          for step in range(20_000)])
        assert abs(drawn.mean() - expected) < 4 * drawn.std() / len(drawn) ** 0.5
        # and without sampling error: the sampler's inverse over a fine grid of uniform draws
        grid = (np.arange(2_000_000) + 0.5) / 2_000_000
        depths = grow.lvps_depth(grow.X_MIN + grid * (1 - grow.X_MIN), u, L)
        assert np.vectorize(per_depth.get)(depths).mean() == pytest.approx(expected, rel=1e-5)


def test_apollo_report_saves_less_than_reported(capsys):
    cost_main(["--regime", "apollo", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert {"regime", "steps", "flops", "baseline_flops", "saved"} <= r.keys()
    assert [s["layers"] for s in r["stages"]] == [1, 3, 6, 12]
    assert r["flops"] == pytest.approx(sum(s["steps"] * s["step_flops"] for s in r["stages"]))
    assert 0 < r["saved"] < r["saved_blocks_only"] < 25 < r["reported_saved"]["paper"]


# ----------------------------------------------------------------------------------------------
# Growth operators and regimes: stack, G_stack, MSG, zero-init, copy-top


@pytest.mark.parametrize("op,same", [("zero", True), ("msg", True), ("random", False),
                                     ("stack", False), ("copy-top", False)])
def test_growth_ops_that_preserve_the_function(op, same):
    model = small_model().eval()
    x = tokens(0, 16)
    with torch.no_grad():
        before = model(x, plan=Plan((0, 1)))[0]
        grow.grow(model.transformer.h, 2, 4, op)
        gates = (1.0, 1.0, 0.0, 0.0) if op == "msg" else None  # MSG's new blocks enter at μ = 0
        after = model(x, plan=Plan((0, 1, 2, 3), gates=gates))[0]
    assert torch.allclose(before, after, atol=1e-5) == same


def test_late_expansion_zero_blocks_forward_and_flops():
    """A model of 0 blocks: embeddings, final norm and head; its FLOPs are the head's alone."""
    model = small_model()
    x = tokens(0, 16)
    h = model.transformer
    with torch.no_grad():
        by_hand = model.lm_head(h.ln_f(h.wte(x) + h.wpe(torch.arange(16))))
        assert torch.allclose(model(x, plan=Plan(()))[0], by_hand, atol=1e-6)
    _, loss = model(x, x, plan=Plan(()))
    loss.backward()
    assert all(p.grad is None for p in h.h.parameters()) and h.wpe.weight.grad is not None
    # 2·d·V forward, twice that back
    assert step_flops(SMALL, Plan(()), (), 100, 32) == 100 * 3 * 2 * 32 * 512


def test_late_expansion_boundary_and_flops_column_match_the_cost_model(tmp_path, data):
    late = growth_schedule("late", L=4, steps=10)
    assert ([(s.start, s.layers, s.grow_op) for s in late.stages]
            == [(0, 0, "random"), (8, 4, "copy-top")])  # from 0 blocks copy-top has nothing to copy
    steps, _ = run_train(tmp_path, data, "--regime", "late", "--max-steps", "10", "--warmup", "2")
    assert [r["unique_layers"] for r in steps] == [0] * 8 + [4] * 2
    assert all(r["depth"] == [r["unique_layers"]] * 2 for r in steps)
    cfg = GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=32)
    expected = sum(r["steps"] * r["step_flops"]
                   for r in grow.schedule_phases(cfg, late, 10, 256, 32))
    assert steps[-1]["flops"] == expected
    assert "--grow-op stack builds the model from its blocks" in str(
        pytest.raises(ValueError, growth_schedule, "late", grow_op="stack").value)
    assert [s.layers for s in growth_schedule("late", L=24).stages] == [0, 24]


def test_late_expansion_is_bus_recipe_at_known_steps():
    """Bu 2025 by default: WSD decaying to 0 over the last 10%, the expansion at 0.8 T inside the
    stable phase, so the new blocks train at the peak LR before the decay."""
    flags = config.resolve({"regime": "late", "preset": "char"})
    assert (flags.schedule, flags.decay_frac, flags.min_lr, flags.grow_at) == ("wsd", 0.1, 0.0,
                                                                               "0.8")
    T = 1000
    expansion = flags.build_schedule(T).stages[1].start
    lr = [train.get_lr(s, flags.lr, flags.min_lr, flags.warmup, T, flags.schedule,
                       flags.decay_frac, flags.decay_shape) for s in range(T + 1)]
    last_peak = max(s for s in range(T) if lr[s] == flags.lr)  # the decay starts after it
    assert (expansion, last_peak) == (800, 900)  # expansion before the decay
    assert set(lr[expansion:last_peak + 1]) == {flags.lr}  # the peak LR between them
    assert lr[flags.warmup - 1] == flags.lr and lr[0] < flags.lr  # a short warmup (50 of 1000)
    assert lr[T] == 0.0 and 0 < lr[T - 1] < lr[last_peak + 1] < flags.lr  # down to 0 at the end
    # the WSD baseline it is compared with: every flag the same, but no expansion
    base = config.resolve({**dict(zip(["regime", "grow_layers", "grow_at"],
                                      ["late", "12", ""])), "preset": "char"})
    differ = {k for k, v in dataclasses.asdict(base).items() if getattr(flags, k) != v}
    assert differ == {"grow_layers", "grow_at"}
    assert [s.layers for s in base.build_schedule(T).stages] == [12]
    assert sweep.REGIMES["baseline-wsd"] == ["--regime", "late", "--grow-layers", "12",
                                              "--grow-at", ""]


def test_late_expansion_from_one_block_copies_it():
    schedule = growth_schedule("late", L=4, grow_layers="1,4")
    assert [(s.layers, s.grow_op) for s in schedule.stages] == [(1, "random"), (4, "copy-top")]
    model = small_model()
    block0 = {k: v.clone() for k, v in model.transformer.h[0].state_dict().items()}
    grow.grow(model.transformer.h, 1, 4, schedule.stages[1].grow_op)
    for j in range(4):
        for k, v in model.transformer.h[j].state_dict().items():
            assert torch.equal(v, block0[k]), (j, k)
    random = growth_schedule("late", L=4, grow_layers="1,4", grow_op="random")
    assert random.stages[1].grow_op == "random"


def test_growth_regimes_are_data_and_stages_carry_their_boundary_actions():
    """Each regime is one entry of grow.REGIMES; its Schedule's stages say what entering them
    does."""
    stack = growth_schedule("stack")
    assert [(s.start, s.layers) for s in stack.stages] == [(0, 3), (10, 6), (25, 12)]
    assert ({(s.grow_op, s.optimizer, s.rewarm, s.ramp) for s in stack.stages[1:]}
            == {("stack", "keep", 0, 0)})
    gstack = growth_schedule("gstack")
    assert ([(s.start, s.layers, s.optimizer, s.rewarm) for s in gstack.stages[1:]]
            == [(25, 12, "fresh", 10)])
    msg = growth_schedule("msg")  # the gates ramp as long as the warmup unless --msg-ramp says
    assert [s.ramp for s in msg.stages] == [0, 10, 10]
    assert [s.ramp for s in growth_schedule("msg", msg_ramp=4).stages] == [0, 4, 4]
    apollo = growth_schedule("apollo", L=24)  # layer lists written for 12 layers scale
    assert [s.layers for s in apollo.stages] == [2, 6, 12, 24] and apollo.depth == "lvps"
    assert [s.layers for s in growth_schedule("apollo", L=4).stages] == [1, 2, 4]  # 1,1,2,4 merged
    inc = incremental_schedule(12, 4, 100, growth_optimizer="fresh")
    assert [s.optimizer for s in inc.stages] == ["keep", "fresh", "fresh", "fresh",
                                                 "keep"]  # continual: keep


def test_msg_gates_ramp_and_reach_every_evaluation(tmp_path, data):
    """MSG's gates open linearly over the ramp; evaluation and the checkpoint's eval plan use
    them."""
    msg = growth_schedule("msg", L=4, steps=20, grow_layers="1,2,4", grow_at="0.25,0.5", msg_ramp=8)
    sp = msg.step_plan(12)  # 2 steps into stage 3, where blocks 2 and 3 were added
    assert msg.plan(sp, 12, 0) == Plan((0, 1, 2, 3), 0, (1.0, 1.0, 0.25, 0.25))
    assert msg.eval_plan(3, 12) == Plan((0, 1, 2, 3), 0, (1.0, 1.0, 0.25, 0.25))
    assert msg.plan(msg.step_plan(18), 18, 0).gates is None  # fully open: no gating at all
    steps, evals = run_train(tmp_path, data, "--regime", "msg", "--max-steps", "12",
                             "--grow-layers", "1,2,4", "--grow-at", "0.25,0.5", "--msg-ramp", "8",
                             "--ckpt-every", "6")
    # saved at step 12, mid-ramp: the gates come along
    model, plan = load_model(tmp_path / "ckpt.pt")
    assert plan == Plan((0, 1, 2, 3), 0, (1.0, 1.0, 0.75, 0.75))
    val = data_mod.ValSet(sorted(data.glob("*val*")), 256, 4, 32)
    assert train.val_loss(model, val, plan, 0, 1, torch.device("cpu")) == evals[-1]["val_loss"]


@pytest.mark.parametrize("regime", ["stack", "gstack", "msg", "zero"])
def test_growth_regimes_run_and_grow(tmp_path, data, regime):
    steps, evals = run_train(tmp_path, data, "--regime", regime, "--max-steps", "8",
                             "--grow-layers", "1,2,4" if regime != "gstack" else "1,4",
                             "--grow-at", "0.25,0.5" if regime != "gstack" else "0.5")
    assert steps[-1]["unique_layers"] == 4 and steps[0]["unique_layers"] == 1
    assert all(r["depth"] == [r["unique_layers"]] * 2 for r in steps)
    assert math.isfinite(evals[-1]["val_loss"])
    if regime == "gstack":  # LR rewarms from the boundary
        assert steps[4]["lr"] < steps[3]["lr"] / 1.5


# ----------------------------------------------------------------------------------------------
# cost.py: the paper's derivation of incremental training's cost, and the exact count


L, T = 12, 10_000  # GPT-2's depth; the paper's T_inc


@pytest.mark.parametrize("S, step", [(4, 14_688), (8, 15_469), (12, 15_729)])
def test_cost_incremental_paper_equal_cost_steps(S, step, capsys):
    cost_main(["--stages", str(S), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["stages"] == S and r["steps"] == T and r["cost_model"] == "paper"
    assert r["equal_cost_step"] == r["paper"]["equal_cost_step"] == step
    assert r["t_cont_steps"] == float(Fraction(5, 8) * (1 - Fraction(1, S)) * T)
    cost_main(["--stages", str(S)])  # the text shows it too, beside the exact figure
    text = capsys.readouterr().out
    assert f"{step:,}" in text and f"{r['exact']['equal_cost_step']:,}" in text


@pytest.mark.parametrize("S", range(1, L + 1))
def test_cost_incremental_closed_form_equals_stage_sum(S):
    # the closed form assumes m = L/S new layers per stage, a fraction when S does not divide L
    equal = per_layer_phases([Fraction(i * L, S) for i in range(1, S + 1)], T)
    assert sum(p1 + p2 for _, _, p1, p2 in equal) == paper_closed_form(L, S, T)
    if L % S == 0:  # then the real stages are the equal ones
        assert per_layer_phases(grow.stage_layers(L, S), T) == equal


@pytest.mark.parametrize("mode", ["freeze", "isolate"])
@pytest.mark.parametrize("S", range(1, L + 1))
def test_cost_incremental_exact_model_covers_every_layer(S, mode):
    phases = incremental_report("gpt2", S, T, mode, "exact", 1024, 524288, 0.4)["exact"]["phases"]
    assert sum(p["steps"] for p in phases) == T
    assert phases[-1]["layers"] == L
    # each layer is new once; S = 1 is the baseline, every layer trained from the start
    assert sum(p["trained"] for p in phases if p["phase"] == 1) == (L if S > 1 else 0)


@pytest.mark.parametrize("mode", ["freeze", "isolate"])
def test_cost_incremental_phase_sums_equal_step_by_step_sums(mode):
    """Summing per phase gives what train.py's loop adds up step by step."""
    cfg = GPTConfig(n_layer=L)
    # 200 incremental steps, then 30 continual ones
    schedule = incremental_schedule(L, 5, 200, mode)
    per_step = 0
    for step in range(230):
        sp = schedule.step_plan(step)
        per_step += step_flops(cfg, schedule.plan(sp, step, 0), sp.trainable, 4096, 1024)
    phases = grow.schedule_phases(cfg, schedule, 230, 4096, 1024)
    assert sum(p["steps"] * p["step_flops"] for p in phases) == per_step


@pytest.mark.parametrize("argv", [
    ["--stages", "0"], ["--stages", "13"], ["--stages", "25", "--model", "gpt2-medium"],
    ["--steps", "0"], ["--steps", "-5"],
    ["--steps", "10", "--stages", "12"],  # fewer steps than phases
    ["--regime", "apollo", "--steps", "10"],  # stages would start at the same step
    ["--seq-len", "0"], ["--batch-tokens", "-1"], ["--mfu", "0"], ["--mfu", "2"], ["--mfu", "nan"],
    ["--steps", "x"],
    # ignored flags
    ["--regime", "apollo", "--stages", "3"], ["--measure", "--steps", "5"], ["--device", "cpu"],
    # past any plan: a typo
    ["--steps", str(10**20)], ["--split", "--n-layer", str(10**20), "--n-embd", "64"],
])
def test_cost_bad_input_is_one_line_exit_2(argv, capsys):
    assert "error: " in one_line_error(cost_main, argv, capsys)


# ----------------------------------------------------------------------------------------------
# Data (prepare_fineweb.py): shards, downloads against a fake hub on 127.0.0.1, tokenizing


SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"


def entry(path, body):
    return {"type": "file", "path": path, "size": len(body),
            "lfs": {"oid": hashlib.sha256(body).hexdigest(), "size": len(body)}}


def serve_repo(hub, repo, revision, folder, files, page_size=2):
    """Serve files {path: bytes} under the resolve URL, and their listing in pages linked by
    `Link`."""
    for path, body in files.items():
        hub.routes[f"/datasets/{repo}/resolve/{revision}/{path}"] = (body, {})
    listing = [{"type": "directory", "path": "sub"}] + [entry(p, b) for p, b in files.items()]
    base = f"/api/datasets/{repo}/tree/{revision}" + (f"/{folder.replace('/', '%2F')}"
                                                      if folder else "")
    pages = [listing[i:i + page_size] for i in range(0, len(listing), page_size)]
    for i, page in enumerate(pages):
        headers = ({"Link": f'<{hub.url}{base}?cursor={i + 1}>; rel="next"'}
                   if i + 1 < len(pages) else {})
        hub.routes[base + (f"?cursor={i}" if i else "")] = (json.dumps(page).encode(), headers)


def shard_bytes(tmp_path, tokens):
    data_mod.write_shard(tmp_path / "x.bin", tokens)
    return (tmp_path / "x.bin").read_bytes()


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.suffix in (".part", ".tmp")]


def test_data_shard_roundtrip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535], dtype=np.int64)
    data_mod.write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * 4
    assert np.array_equal(data_mod.read_shard(tmp_path / "a.bin"), tokens)
    data_mod.write_shard(tmp_path / "empty.bin", [])
    assert len(data_mod.read_shard(tmp_path / "empty.bin")) == 0
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        data_mod.write_shard(tmp_path / "b.bin", [65536])


@pytest.mark.parametrize("damage, message", [
    (lambda b: np.int32(123).tobytes() + b[4:], "bad magic 123"),
    (lambda b: b[:4] + np.int32(7).tobytes() + b[8:], "version 7"),
    (lambda b: b[:-10], "header says 100 tokens"),
    (lambda b: b[:500], "shorter than the 1024-byte header"),
])
def test_data_read_shard_errors(tmp_path, damage, message):
    good = shard_bytes(tmp_path, np.arange(100))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(good))
    with pytest.raises(ValueError) as e:
        data_mod.read_shard(bad)
    msg = str(e.value)
    assert (message in msg and str(bad) in msg and "re-run prepare_fineweb.py" in msg
            and "\n" not in msg)


def test_data_download_retries_and_resumes(hub, tmp_path):
    body = os.urandom(300_000)
    hub.routes["/f.bin"] = (body, {})
    hub.errors, hub.drops = [503], 2
    dest = pf.download(f"{hub.url}/f.bin", tmp_path / "f.bin",
                       sha256=hashlib.sha256(body).hexdigest(), size=len(body), **FAST)
    assert dest.read_bytes() == body and leftovers(tmp_path) == []
    ranges = [r for _, r in hub.log]
    assert len(ranges) == 4 and ranges[:2] == [None, None]
    assert all(r.startswith("bytes=") and r != "bytes=0-" for r in ranges[2:])  # resumed, twice
    # a verified file is not fetched again
    pf.download(f"{hub.url}/f.bin", dest, sha256=hashlib.sha256(body).hexdigest(), size=len(body),
                **FAST)
    assert len(hub.log) == 4


def test_data_download_restarts_when_range_is_ignored(hub, tmp_path):
    body = os.urandom(200_000)
    hub.routes["/f.bin"] = (body, {})
    hub.drops, hub.ignore_range = 1, True
    dest = pf.download(f"{hub.url}/f.bin", tmp_path / "f.bin",
                       sha256=hashlib.sha256(body).hexdigest(), size=len(body), **FAST)
    assert dest.read_bytes() == body and leftovers(tmp_path) == []
    assert hub.log[1][1] is not None  # it did ask to resume, and coped with a 200


def test_data_download_sha256_mismatch(hub, tmp_path):
    body = os.urandom(50_000)
    hub.routes["/f.bin"] = (body[:-1] + bytes([body[-1] ^ 1]), {})
    with pytest.raises(DownloadError) as e:
        pf.download(f"{hub.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(body).hexdigest(),
                    size=len(body), **FAST)
    assert "f.bin" in str(e.value) and "sha256" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_data_download_404_and_dead_server(hub, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        pf.download(f"{hub.url}/missing.bin", tmp_path / "m.bin", **FAST)
    assert len(hub.log) == 1  # a 404 is not retried
    with pytest.raises(DownloadError, match="failed after 4 attempts"):
        pf.download(dead_url(), tmp_path / "m.bin", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_data_tokens_source(hub, tmp_path, monkeypatch, capsys):
    files = {data_mod.shard_name("finewebedu", i):
             shard_bytes(tmp_path, np.arange(100 * i, 100 * i + 50 + i))
             for i in range(4)}
    files[".gitattributes"] = b"*.bin filter=lfs\n"
    serve_repo(hub, pf.TOKENS_REPO, "main", "", files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = tmp_path / "out"
    assert pf.main(["--source", "tokens", "--shards", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(data_mod.shard_name("finewebedu", i) for i in range(3))
    for i in range(3):
        assert np.array_equal(data_mod.read_shard(out / data_mod.shard_name("finewebedu", i)),
                              np.arange(100 * i, 100 * i + 50 + i))
    # a re-run only reads the listing
    n = len(hub.log)
    assert pf.main(["--source", "tokens", "--shards", "2", "--out", str(out)]) == 0
    assert all("/api/" in path for path, _ in hub.log[n:])
    # asking for more shards than the hub has is one clear error
    assert pf.main(["--source", "tokens", "--shards", "9", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "finewebedu_train_000004.bin" in err and err.count("\n") == 1


def test_data_fineweb_not_to_be_had_says_how_to_do_without_the_hub(hub, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # it serves nothing: the listing is a 404
    assert pf.main(["--source", "tokens", "--shards", "1", "--out", str(tmp_path / "fw")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404" in err
    assert (f"offline, set HF_ENDPOINT to a mirror, or copy the shards into {tmp_path / 'fw'} and "
            "skip this step") in err


def test_cost_split_takes_any_sequence_length(capsys):
    """--split reports a token's FLOPs: no batch size to divide (it used to ask for one, then
    refuse --batch-tokens with --split)."""
    cost_main(["--split", "--seq-len", "3000"])
    assert "sequence 3000" in capsys.readouterr().out


def test_data_disk_too_small(hub, tmp_path, monkeypatch, capsys):
    serve_repo(hub, pf.TOKENS_REPO, "main", "",
               {data_mod.shard_name("finewebedu", 0): shard_bytes(tmp_path, range(5000))})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    assert pf.main(["--shards", "0", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert ("not enough disk space" in err and "11,024 bytes" in err and "100 bytes" in err
            and err.count("\n") == 1)


def make_parquet(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    enc = tiktoken.get_encoding("gpt2")
    table = pa.table({"id": [f"doc{i}" for i in range(len(texts))], "text": texts,
                      "token_count": [len(enc.encode_ordinary(t)) for t in texts]})
    pq.write_table(table, path, row_group_size=3)
    return path.read_bytes()


def test_data_parquet_source(hub, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["the", "grow", "layer", "café", "\n", "GPT-2", "<|endoftext|>", "tokens", "😀", "data"]
    docs = [" ".join(rng.choice(words, size=rng.integers(1, 120))) for _ in range(30)]
    files = {f"sample/10BT/{i:03d}_00000.parquet":
             make_parquet(tmp_path / f"{i}.parquet", docs[i * 10:(i + 1) * 10])
             for i in range(3)}
    serve_repo(hub, pf.PARQUET_REPO, pf.PARQUET_REVISION, "sample/10BT", files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = tmp_path / "out"
    argv = ["--source", "parquet", "--shard-size", "256", "--workers", "2", "--out", str(out)]
    assert pf.main(argv) == 0

    enc = tiktoken.get_encoding("gpt2")
    expected = np.concatenate([[data_mod.EOT] + enc.encode_ordinary(d) for d in docs])
    shards = sorted(out.glob("*.bin"), key=lambda p: p.name.split("_")[-1])
    assert shards[0].name == "finewebedu_val_000000.bin"
    assert [p.name for p in shards[1:]] == [data_mod.shard_name("finewebedu", i)
                                            for i in range(1, len(shards))]
    lengths = [len(data_mod.read_shard(p)) for p in shards]
    assert sum(lengths) == len(expected) == sum(1 + len(enc.encode_ordinary(d)) for d in docs)
    assert set(lengths[:-1]) == {256} and 0 < lengths[-1] <= 256
    assert np.array_equal(np.concatenate([data_mod.read_shard(p) for p in shards]), expected)
    assert sorted(p.name for p in (out / "parquet").iterdir()) == [
        "000_00000.parquet", "001_00000.parquet", "002_00000.parquet"]

    # a re-run with the same settings makes no request and rewrites nothing
    n, mtimes = len(hub.log), [p.stat().st_mtime_ns for p in shards]
    assert pf.main(argv) == 0
    assert len(hub.log) == n and [p.stat().st_mtime_ns for p in shards] == mtimes

    # another shard size re-tokenizes from the downloaded parquet and leaves no stale shards behind
    assert pf.main(argv[:2] + ["--shard-size", "100000"] + argv[4:]) == 0
    assert [p.name for p in out.glob("*.bin")] == ["finewebedu_val_000000.bin"]
    assert len(hub.log) == n + 2  # the listing only


def test_data_parquet_needs_pyarrow(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert pf.main(["--source", "parquet", "--out", str(tmp_path)]) == 1
    assert "pip install pyarrow" in capsys.readouterr().err


def test_data_text_source(tmp_path):
    assert pf.main(["--text", str(SHAKESPEARE), "--name", "shakes", "--out", str(tmp_path)]) == 0
    val = data_mod.read_shard(tmp_path / "shakes_val_000000.bin")
    train = data_mod.read_shard(tmp_path / "shakes_train_000001.bin")
    assert len(train) + len(val) == 338_026 and train[0] == data_mod.EOT
    assert abs(len(val) - 33_803) <= 1
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode(val[-20:].tolist()) in SHAKESPEARE.read_text(encoding="utf-8")[-200:]


def test_data_text_too_short_for_both_splits_is_refused_and_writes_nothing(tmp_path, capsys):
    """Two tokens (the document's start and "hi") cannot make a train and a validation split:
    refused in one line, no folder; a longer text, as advised, makes both."""
    (tmp_path / "two.txt").write_text("hi")
    assert pf.main(["--text", str(tmp_path / "two.txt"), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"{tmp_path / 'two.txt'} makes 2 tokens: 1 to train on and "
                                     "1 to validate on (--val-frac 0.1), where each needs 2 or "
                                     "more") in err
    assert not (tmp_path / "d").exists()
    (tmp_path / "two.txt").write_text("hi there, " * 10)
    assert pf.main(["--text", str(tmp_path / "two.txt"), "--out", str(tmp_path / "d")]) == 0
    assert all(len(data_mod.read_shard(f)) >= 2 for f in (tmp_path / "d").glob("*.bin"))


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_data_text_tokenized_in_pieces_as_a_whole_with_a_progress_bar(tmp_path, monkeypatch):
    enc = tiktoken.get_encoding("gpt2")
    rng = np.random.default_rng(0)
    # whitespace runs are where a careless cut changes the tokens ("\n\n" is one token, "\n" "\n"
    # two)
    words = ["the", "king", "'s", "\n", "\n\n\n", " \n", "\t", "\u00a0", "  ", "42", "😀", "!", "é"]
    for size in (1, 7, 50):
        text = "".join(rng.choice(words, size=2000))
        pieces = [t for part in pf.text_pieces(text, size) for t in enc.encode_ordinary(part)]
        assert pieces == enc.encode_ordinary(text)
    assert len(list(pf.text_pieces(text, 50))) > 10  # it does cut
    err = FakeTTY()  # tqdm draws its bar only on a terminal
    monkeypatch.setattr(sys, "stderr", err)
    pf.tokenize_text(SHAKESPEARE, tmp_path, "shakes", piece=10_000)
    shards = [data_mod.read_shard(tmp_path / data_mod.shard_name("shakes", i)) for i in (1, 0)]
    whole = [data_mod.EOT] + enc.encode_ordinary(SHAKESPEARE.read_text(encoding="utf-8"))
    assert np.concatenate(shards).tolist() == whole
    bar = err.getvalue().split("\r")[-1]
    assert "tokenizing input.txt: 100%" in bar and "char/s" in bar and "338,026 tokens" in bar


def test_data_tinyshakespeare_local_file(tmp_path):
    shutil.copy(SHAKESPEARE, tmp_path / "input.txt")
    assert pf.prepare_tinyshakespeare(tmp_path, url=dead_url(), retries=0) == tmp_path
    total = sum(len(data_mod.read_shard(tmp_path / f))
                for f in ["tinyshakespeare_val_000000.bin", "tinyshakespeare_train_000001.bin"])
    assert total == 338_026
    (tmp_path / "input.txt").unlink()
    # shards are enough
    assert pf.prepare_tinyshakespeare(tmp_path, url=dead_url(), retries=0) == tmp_path


def test_data_tinyshakespeare_download(hub, tmp_path):
    hub.routes["/input.txt"] = (SHAKESPEARE.read_bytes(), {})
    data_dir = tmp_path / "ts"
    assert pf.prepare_tinyshakespeare(data_dir, url=f"{hub.url}/input.txt") == data_dir
    assert (data_dir / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()
    assert len(data_mod.read_shard(data_dir / "tinyshakespeare_train_000001.bin")) > 300_000


def test_data_tinyshakespeare_offline(tmp_path):
    with pytest.raises(DownloadError) as e:
        pf.prepare_tinyshakespeare(tmp_path / "ts", url=dead_url(), retries=0)
    assert str(tmp_path / "ts" / "input.txt") in str(e.value) and "\n" not in str(e.value)


def test_data_preset_folder_holding_other_shards_says_so_before_any_download(tmp_path, data):
    """Other shards in a preset's Tiny Shakespeare folder: said first, in train.py's terms (not
    "save input.txt", then prepare_fineweb.py's --name); moved out as advised, the folder is made
    and the shards train with --data-dir."""
    folder = tmp_path / "ts"
    shutil.copytree(data, folder)
    with pytest.raises(DataError) as e:
        pf.prepare_tinyshakespeare(folder, url=dead_url(), retries=0)
    assert ("a preset's folder for Tiny Shakespeare, holds other shards (toy_train_000001.bin, "
            "toy_train_000002.bin, toy_val_000000.bin): move them, with its meta.json (their "
            "tokenizer), to a folder of their own and train on them with --data-dir"
            ) in str(e.value)
    (tmp_path / "own").mkdir()
    for shard in folder.glob("*.bin"):
        shard.rename(tmp_path / "own" / shard.name)
    shutil.copy(SHAKESPEARE, folder / "input.txt")
    pf.prepare_tinyshakespeare(folder, url=dead_url(), retries=0)
    assert data_mod.list_shards(tmp_path / "own")[0]  # and the moved shards still read
    # its own shards under another tokenizer record (meta.json moved away, or another's): they
    # are made again from its input.txt, not refused
    (folder / "meta.json").unlink()
    pf.prepare_tinyshakespeare(folder, url=dead_url(), retries=0, tokenizer_name="char")
    assert data_mod.read_meta(folder)["tokenizer"] == "char"


def test_data_byte_and_char_tokenizers_round_trip_text(tmp_path, capsys):
    text = "ROMEO: héllo, wörld 😀\nJULIET: 'tis\n"
    byte = data_mod.tokenizer(data_mod.text_meta("byte", text))
    assert byte.vocab_size == 256 and byte.eot is None and max(byte.encode(text)) < 256
    assert byte.decode(byte.encode(text)) == text and len(byte.encode("😀")) == 4
    char = data_mod.tokenizer(data_mod.text_meta("char", text))
    assert (char.chars == "".join(sorted(set(text))) and char.vocab_size == len(set(text))
            and char.eot is None)
    assert (char.decode(char.encode(text)) == text
            and char.encode(char.chars) == list(range(char.vocab_size)))
    with pytest.raises(ValueError, match="character 'z' is not in"):
        char.encode("z")
    # --text --tokenizer: no end-of-text token (one document), meta.json beside the shards
    src = tmp_path / "in.txt"
    src.write_text(text * 50, encoding="utf-8")
    for name in ("byte", "char"):
        out = tmp_path / name
        assert pf.main(["--text", str(src), "--tokenizer", name, "--out", str(out)]) == 0
        meta = data_mod.read_meta(out)
        assert meta == data_mod.text_meta(name, text)
        # no .tmp left
        assert sorted(p.name for p in out.iterdir() if p.suffix != ".bin") == ["meta.json"]
        shards = [data_mod.read_shard(out / data_mod.shard_name("in", i)).tolist() for i in (1, 0)]
        assert data_mod.tokenizer(meta).decode(shards[0] + shards[1]) == text * 50
    with pytest.raises(SystemExit) as e:
        pf.main(["--source", "tokens", "--tokenizer", "char"])
    assert (e.value.code == 2
            and "--tokenizer cannot go with --source tokens" in capsys.readouterr().err)


def test_data_folder_without_meta_is_gpt2(tmp_path, data, capsys):
    assert (data_mod.read_meta(data) == data_mod.GPT2_META
            == {"tokenizer": "gpt2", "vocab_size": 50257})
    run_train(tmp_path / "run", data, "--max-steps", "1")  # llm.c-style shards: GPT-2 as before
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == data_mod.GPT2_META and ckpt["model_config"]["vocab_size"] == 50304
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text('{"tokenizer": "char", "vocab_size": 3}')
    with pytest.raises(DataError) as e:
        data_mod.read_meta(tmp_path / "bad")
    assert "meta.json is not a tokenizer record" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A few steps on the first 20,000 characters of Tiny Shakespeare, one token a character."""
    tmp = tmp_path_factory.mktemp("char")
    (tmp / "in.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    pf.tokenize_text(tmp / "in.txt", tmp / "data", "in", tokenizer_name="char")
    run_train(tmp / "out", tmp / "data", "--max-steps", "2")
    return tmp


def test_data_char_vocabulary_reaches_the_model_checkpoint_and_samples(char_run, capsys):
    meta = data_mod.read_meta(char_run / "data")
    ckpt = torch.load(char_run / "out" / "ckpt.pt", weights_only=True)
    assert (ckpt["tokenizer"] == meta
            and ckpt["model_config"]["vocab_size"] == meta["vocab_size"] == 58)
    assert ckpt["model"]["lm_head.weight"].shape[0] == 58
    sample_main(["--checkpoint", str(char_run / "out" / "ckpt.pt"), "--prompt", "ROMEO:",
                 "--num-samples", "2", "--max-new-tokens", "20", "--device", "cpu"])
    printed = capsys.readouterr().out  # characters, the newlines among them
    assert printed.startswith("sample 0: ROMEO:") and "\nsample 1: ROMEO:" in printed
    assert len(printed) == 2 * len("sample 0: ROMEO:\n") + 2 * 20
    with pytest.raises(SystemExit) as e:  # no end-of-text token to start a document with
        sample_main(["--checkpoint", str(char_run / "out" / "ckpt.pt"), "--prompt", "",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no end-of-text token" in err


def test_data_hellaswag_refused_in_one_line_for_a_char_run(char_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "hs", char_run / "data", "--max-steps", "1", "--hellaswag-every", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "HellaSwag needs GPT-2's tokenizer" in err
    with pytest.raises(SystemExit) as e:
        hs_main(["--checkpoint", str(char_run / "out" / "ckpt.pt"), "--data-file", "nowhere.jsonl"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "trained with the char tokenizer" in err


def test_data_export_of_a_char_checkpoint_records_its_tokenizer(char_run, tmp_path, capsys):
    export_main(["--checkpoint", str(char_run / "out" / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert "its char tokenizer (58 tokens)" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vocab_size"] == 58 and config["bos_token_id"] is None
            and config["eos_token_id"] is None)
    assert (json.loads((tmp_path / "hf" / "nanogrow_tokenizer.json").read_text())
            == data_mod.read_meta(char_run / "data"))


def test_data_token_ids_outside_the_vocabulary_name_the_shard(tmp_path, data, capsys):
    bad = make_shards(tmp_path / "bad")
    data_mod.write_shard(bad / "toy_train_000002.bin",
                         np.r_[np.arange(4000), 60_000, np.arange(96)])
    err = train_error(tmp_path, data, capsys, "--max-steps", "40", data_dir=bad)
    assert "toy_train_000002.bin holds token id 60000 (first at position 4000)" in err
    assert "outside its tokenizer's vocabulary of 50257" in err
    # an id of the padded embedding's rows, past GPT-2's 50,257 tokens: no word, refused too
    data_mod.write_shard(bad / "toy_train_000002.bin", np.r_[np.arange(4000), 50_300])
    err = train_error(tmp_path, data, capsys, "--max-steps", "40", data_dir=bad, out="y")
    assert "holds token id 50300" in err and "vocabulary of 50257" in err


def prepare_error(capsys, *argv):
    """prepare_fineweb.py's one-line error: exit 2 for a bad flag, 1 for data it cannot use."""
    try:
        code = pf.main(list(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_data_bad_text_and_flags_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    run = lambda *argv: prepare_error(capsys, *argv)  # noqa: E731
    assert "empty.txt is empty" in run("--text", str(tmp_path / "empty.txt"),
                                       "--out", str(tmp_path / "o"))
    assert "latin1.txt is not UTF-8 text (byte 3" in run("--text", str(tmp_path / "latin1.txt"),
                                                         "--out", str(tmp_path / "o"))
    assert "not a path" in run("--text", str(SHAKESPEARE), "--name", "../../x")
    assert "--shards cannot go with --text" in run("--text", str(SHAKESPEARE), "--shards", "3")
    assert "--workers cannot go with --source tokens" in run("--workers", "2")
    for flag, value in [("--shards", "-1"), ("--shards", "100"), ("--shard-size", "0"),
                        ("--workers", "0"), ("--val-frac", "0"), ("--val-frac", "1"),
                        ("--val-frac", "nan"), ("--shards", "x")]:
        assert flag in run(flag, value)
    assert not (tmp_path / "o").exists()


def test_data_offline_tokenizer_says_which_files_and_where(tmp_path, capsys, monkeypatch):
    import requests

    def offline(name):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(data_mod.tiktoken, "get_encoding", offline)
    err = prepare_error(capsys, "--text", str(SHAKESPEARE), "--out", str(tmp_path))
    assert "vocab.bpe, encoder.json" in err and "TIKTOKEN_CACHE_DIR" in err


# ----------------------------------------------------------------------------------------------
# HellaSwag (hellaswag.py): completion scoring, batching, data, DDP, inside training


VAL = SHARED / "hellaswag" / "hellaswag_val.jsonl"


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))


def save_plain_checkpoint(model, path):
    return save_checkpoint_with_plan(model, Plan(tuple(range(model.config.n_layer))), path)


def test_hellaswag_render_format():
    enc = tiktoken.get_encoding("gpt2")
    ex = dict(ctx="A man is sitting on a roof. he",
              endings=["is", "starts pulling up roofing.", "x", "ok then"], label=1)
    ctx = enc.encode("A man is sitting on a roof. he")
    rows, masks = render(ex, enc)
    for row, mask, ending in zip(rows, masks, ex["endings"]):
        end = enc.encode(" " + ending)
        assert row == ctx + end
        assert mask == [0] * len(ctx) + [1] * len(end)
    # too long for the model: the context loses its oldest tokens, the ending stays whole
    rows, masks = render(ex, enc, block_size=8)
    for row, mask, ending in zip(rows, masks, ex["endings"]):
        end = enc.encode(" " + ending)
        assert row == (ctx + end)[-8:] and mask == [0] * (8 - len(end)) + [1] * len(end)


class FixedLM(nn.Module):
    """Predicts the same distribution at every position, so a token's loss is -log probs[token]:
    its hidden state is the constant 1 and its head maps that to the log-probabilities."""

    def __init__(self, probs, rest):
        super().__init__()
        self.config = GPTConfig(block_size=64)
        logp = torch.full((self.config.vocab_size,),
                          math.log(rest / (self.config.vocab_size - len(probs))))
        for token, p in probs.items():
            logp[token] = math.log(p)
        self.lm_head = nn.Linear(1, self.config.vocab_size, bias=False)
        self.lm_head.weight.data = logp.view(-1, 1)  # (V, 1)

    def hidden(self, idx, plan=None):
        return torch.ones(*idx.shape, 1)  # (B, T, 1)


def test_hellaswag_acc_and_acc_norm_pick_the_right_ending():
    enc = tiktoken.get_encoding("gpt2")
    cheap = enc.encode(" a b c d")  # 4 tokens at loss ln 5 each: larger sum, smaller mean
    mid = enc.encode(" x")  # 1 token at loss ln 10
    assert len(cheap) == 4 and len(mid) == 1
    model = FixedLM({**{t: 0.2 for t in cheap}, mid[0]: 0.1}, rest=0.1)
    rare = -math.log(0.1 / (model.config.vocab_size - 5))  # every other token
    ex = dict(ctx="Letters", endings=["a b c d", "x", "the dog", "zebra"], label=1)
    rendered = [render(ex, enc, model.config.block_size)]

    sum_loss, mean_loss = score_batch(model, rendered, "cpu")
    expected = torch.tensor([4 * math.log(5), math.log(10), 2 * rare, 2 * rare])
    # float32 log-softmax over 50304 logits is good to about 1e-4
    torch.testing.assert_close(sum_loss[0], expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(mean_loss[0], expected / torch.tensor([4, 1, 2, 2]), rtol=0,
                               atol=1e-3)
    assert predict(model, [ex], "cpu") == ([1], [0])
    assert evaluate(model, [ex], "cpu") == dict(acc=1.0, acc_norm=0.0, n=1)


def test_hellaswag_batched_equals_one_at_a_time():
    model = tiny_gpt()
    enc = tiktoken.get_encoding("gpt2")
    # the first rows over 128 tokens come after 3,250
    pool = load_examples(data_file=VAL, limit=3600)
    # 8 with rows over block_size, so left truncation is covered too
    too_long = [ex for ex in pool if max(map(len, render(ex, enc)[0])) > 128][:8]
    examples = pool[:32] + too_long
    assert len(too_long) == 8

    assert (predict(model, examples, "cpu", batch_size=16)
            == predict(model, examples, "cpu", batch_size=1))
    assert (evaluate(model, examples, "cpu", batch_size=16)
            == evaluate(model, examples, "cpu", batch_size=1))

    # the padded batch scores each ending as a plain forward pass over its row alone would
    rendered = [render(ex, enc, 128) for ex in examples[:8]]
    sum_loss, _ = score_batch(model.eval(), rendered, "cpu")
    for i, (rows, masks) in enumerate(rendered):
        for j, (row, mask) in enumerate(zip(rows, masks)):
            with torch.no_grad():
                logits, _ = model(torch.tensor([row]))
            nll = F.cross_entropy(logits[0, :-1], torch.tensor(row[1:]), reduction="none")
            torch.testing.assert_close(sum_loss[i, j], nll[mask.index(1) - 1:].sum())


def test_hellaswag_evaluate_restores_training_mode():
    model = tiny_gpt().train()
    evaluate(model, load_examples(data_file=VAL, limit=2), "cpu")
    assert model.training


def test_hellaswag_real_val_file_parses(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(VAL.parent))
    examples = load_examples("val")
    assert len(examples) == 10042
    assert all(len(ex["endings"]) == 4 for ex in examples)
    assert {ex["label"] for ex in examples} == {0, 1, 2, 3}
    assert load_examples("val", limit=5) == examples[:5]


def test_hellaswag_malformed_line_names_file_and_line(tmp_path):
    good = VAL.open("rb").readline()
    for bad in [b'{"ctx": "x", "endings": ["a", "b"',
                b'{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}',
                b'{"ctx": "\xff"}']:
        path = tmp_path / "bad.jsonl"
        path.write_bytes(good + good + bad + b"\n")
        with pytest.raises(DataError, match=f"^{path}:3: "):
            load_examples(data_file=path)


def test_hellaswag_cli_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    cases = [
        ([], "exactly one of --checkpoint"),
        (["--checkpoint", str(ckpt), "--model", "gpt2"], "exactly one of --checkpoint"),
        (["--checkpoint", str(ckpt)], "no checkpoint at"),
        (["--checkpoint", str(tmp_path)], "is a folder, not a checkpoint"),
        (["--checkpoint", str(ckpt), "--data-file", str(bad), "--split", "train"],
         "--split picks the file to download; --data-file gives the file: one of them"),
    ]
    for argv, message in cases:
        assert message in one_line_error(hs_main, argv, capsys)
    save_plain_checkpoint(tiny_gpt(), ckpt)
    for argv, message in [(["--data-file", str(bad)], f"{bad}:1: "),
                          (["--data-file", str(tmp_path / "no")], "no such"),
                          (["--limit", "0"], "--limit 0: must be 1 or more"),
                          (["--limit", "-2"], "--limit -2: must be 1 or more"),
                          (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
                          (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
                          (["--data-file", str(tmp_path / "empty.jsonl")], "no examples to score")]:
        (tmp_path / "empty.jsonl").write_text("")
        assert message in one_line_error(hs_main, ["--checkpoint", str(ckpt), *argv], capsys)


def test_hellaswag_cli_json(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_plain_checkpoint(tiny_gpt(), ckpt)
    cmd = [sys.executable, "hellaswag.py", "--checkpoint", str(ckpt), "--data-file", str(VAL),
           "--limit", "8", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out)
    assert result["n"] == 8 and result["scoring"] == SCORING_TAG
    assert set(result) == {"acc", "acc_norm", "n", "examples_per_s", "scoring", "split"}
    assert result["split"] == "val"  # what the data says, not only the flag


def test_hellaswag_a_file_whose_examples_name_no_split_is_labelled_by_its_name(tmp_path, capsys):
    lines = VAL.read_text().splitlines()[:2]
    (tmp_path / "mine.jsonl").write_text("".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "split"}) + "\n"
        for line in lines))
    save_plain_checkpoint(tiny_gpt(), tmp_path / "ckpt.pt")
    hs_main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data-file",
             str(tmp_path / "mine.jsonl"), "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["split"] == "mine.jsonl"  # not a guessed "val"


def test_a_reader_gone_from_the_pipe_ends_a_script_quietly():
    """`python cost.py ... | head -1`: the reader closes the pipe; the script stops as a Unix tool
    does (exit 141, SIGPIPE's), with no traceback or error line."""
    proc = subprocess.Popen([sys.executable, str(HERE / "cost.py"), "--regime", "apollo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it prints: its first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err


def hellaswag_url(hub, body=None):
    hub.routes["/hellaswag_val.jsonl"] = (VAL.read_bytes() if body is None else body, {})
    return hub.url + "/hellaswag_{split}.jsonl"


def test_hellaswag_download(tmp_path, hub):
    cache = tmp_path / "cache"
    path = download_split("val", cache, base_url=hellaswag_url(hub))
    assert path == cache / "hellaswag_val.jsonl" and path.read_bytes() == VAL.read_bytes()
    assert len(load_examples(data_file=path)) == 10042


def test_hellaswag_download_refuses_corrupt_file(tmp_path, hub):
    cache = tmp_path / "cache"
    first_line = VAL.open("rb").readline()  # not the file the sha256 names
    with pytest.raises(DownloadError, match="sha256"):
        download_split("val", cache, base_url=hellaswag_url(hub, first_line))
    assert not cache.exists() or not any(cache.iterdir())


def test_hellaswag_download_404(tmp_path, hub):
    with pytest.raises(DownloadError, match="404"):
        download_split("train", tmp_path / "cache", base_url=hellaswag_url(hub))


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = evaluate(tiny_gpt(), load_examples(data_file=VAL, limit=20), "cpu")
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_hellaswag_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = evaluate(tiny_gpt(), load_examples(data_file=VAL, limit=20), "cpu")
    assert single["n"] == 20
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == single


def test_hellaswag_logged_by_train_on_its_cadence(tmp_path, data, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(VAL.parent))
    _, evals = run_train(tmp_path, data, "--max-steps", "4", "--eval-every", "2",
                         "--hellaswag-every", "3", "--hellaswag-limit", "8", "--n-layer", "2")
    hs = [r["step"] for r in evals if "hellaswag_acc" in r]
    assert hs == [0, 3, 4] and all(r["hellaswag_n"] == 8 for r in evals if "hellaswag_n" in r)
    assert [r["step"] for r in evals] == [0, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# plot.py and sweep.py: figures and the results tables from real and hand-written logs


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def step_rec(s, flops, loss=5.0, dt=0.5):
    return {"step": s, "loss": loss, "lr": 1e-3, "tokens": 128 * s, "flops": flops, "dt": dt}


@pytest.fixture(scope="module")
def real_runs(data, tmp_path_factory):
    """A full-depth baseline and a 2-stage incremental run, 6 steps each, on random tokens."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in [("baseline", []), ("inc2", ["--stages", "2"])]:
        run_train(root / name, data, "--n-layer", "2", "--total-batch", "128",
                  "--val-tokens", "128", "--eval-every", "2", "--max-steps", "6",
                  "--inc-steps", "4", *extra)
    return [root / "baseline", root / "inc2"]


@pytest.fixture
def hand_runs(tmp_path):
    """baseline: equal cost at step 2 (20 FLOPs), final val 4.0. inc: cheaper steps, no equal-cost
    mark, reaches 3.9 at 24 FLOPs. slow: never gets below 8."""
    hs = {"hellaswag_acc": 0.3, "hellaswag_n": 100}
    base = write_log(tmp_path / "baseline" / "log.jsonl", [
        {"step": 0, "val_loss": 10.0, "hellaswag_acc_norm": 0.25, **hs},
        *[step_rec(s, 10 * s) for s in (1, 2)],
        {"step": 2, "val_loss": 6.0, "hellaswag_acc_norm": 0.30, "equal_cost": True, **hs},
        *[step_rec(s, 10 * s) for s in (3, 4)],
        {"step": 4, "val_loss": 4.0, "hellaswag_acc_norm": 0.35, **hs}])
    inc = write_log(tmp_path / "inc" / "log.jsonl", [
        *[step_rec(s, 6 * s, dt=0.25) for s in (1, 2, 3, 4)],
        {"step": 2, "val_loss": 7.0}, {"step": 3, "val_loss": 5.0}, {"step": 4, "val_loss": 3.9}])
    slow = write_log(tmp_path / "slow.jsonl", [step_rec(1, 10), step_rec(2, 20),
                                               {"step": 2, "val_loss": 8.0}])
    return [base, inc.parent, slow]


def test_plot_figure_from_real_logs(real_runs, tmp_path):
    png = tmp_path / "figs" / "runs.png"
    plot.main([str(real_runs[0]), str(real_runs[1] / "log.jsonl"), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(png.parent.iterdir()) == [png]  # the temp file was renamed, not left behind

    runs = [plot.read_log(p) for p in real_runs]
    labels = [plot.run_label(p) for p in real_runs]
    assert labels == ["baseline", "inc2"]
    fig = plot.make_figure(runs, labels)
    train_ax, val_ax, hs_ax = fig.axes
    for ax in (train_ax, val_ax):
        assert [line.get_label() for line in ax.lines] == labels
        assert [line.get_color() for line in ax.lines] == ["C0", "C1"]
    assert list(train_ax.lines[0].get_xdata()) == [r["flops"] for r in runs[0]["steps"]]
    for run, line in zip(runs, val_ax.lines):
        flops = {0: 0, **{r["step"]: r["flops"] for r in run["steps"]}}
        assert list(line.get_xdata()) == [flops[e["step"]] for e in run["evals"]]
    # one big marker per run that reached the baseline's budget, at that evaluation's FLOPs
    marked = [[[e["flops"], e["val_loss"]] for e in run["evals"] if e.get("equal_cost")]
              for run in runs]
    assert marked[0] and [e["step"] for e in runs[0]["evals"] if e.get("equal_cost")] == [4]
    points = [c.get_offsets().tolist() for c in val_ax.collections]
    assert points == [m for m in marked if m]
    assert not hs_ax.lines and not hs_ax.collections
    assert [t.get_text() for t in hs_ax.texts] == ["no HellaSwag evaluations"]
    assert "FLOPs" in train_ax.get_xlabel() and "EMA" in train_ax.get_ylabel()


def test_plot_x_step(real_runs):
    runs = [plot.read_log(p) for p in real_runs]
    fig = plot.make_figure(runs, ["a", "b"], x="step")
    train_ax, val_ax, _ = fig.axes
    assert list(train_ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(val_ax.lines[0].get_xdata()) == [0, 2, 4, 6]
    assert val_ax.collections[0].get_offsets()[0][0] == 4
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)


def test_plot_read_log_last_record_wins(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [
        step_rec(1, 10), step_rec(2, 20, loss=9.0), {"step": 2, "val_loss": 9.5}, step_rec(3, 30),
        {"step": 1, "resumed": True},  # resumed from step 1: steps 2 and 3 come again
        step_rec(2, 22, loss=4.0), {"step": 2, "val_loss": 4.5}, step_rec(3, 33)])
    log.write_text(log.read_text() + "\n")  # a blank line is skipped
    run = plot.read_log(tmp_path)
    assert [(r["step"], r["flops"]) for r in run["steps"]] == [(1, 10), (2, 22), (3, 33)]
    assert run["steps"][1]["loss"] == 4.0
    assert run["evals"] == [{"step": 2, "val_loss": 4.5, "flops": 22}]


def test_plot_hellaswag_panel_and_summary(hand_runs, capsys):
    runs = [plot.read_log(p) for p in hand_runs]
    labels = [plot.run_label(p) for p in hand_runs]
    assert labels == ["baseline", "inc", "slow"]
    _, val_ax, hs_ax = plot.make_figure(runs, labels).axes
    assert [line.get_label() for line in hs_ax.lines] == ["baseline"]
    assert [c.get_offsets().tolist() for c in hs_ax.collections] == [[[20, 0.30]]]
    assert [c.get_offsets().tolist() for c in val_ax.collections] == [[[20, 6.0]]]
    assert hs_ax.get_ylabel() == "HellaSwag acc_norm (n=100)" and not hs_ax.texts

    rows = plot.summarize(runs, labels)
    assert rows == [
        dict(run="baseline", final_val_loss=4.0, stopped=None, last_eval=(4, 4.0),
             budget_val_loss=6.0, flops_to_baseline=40, flops_to_stay=40, total_flops=40,
             train_seconds=2.0),
        dict(run="inc", final_val_loss=3.9, stopped=None, last_eval=(4, 3.9),
             budget_val_loss=5.0, flops_to_baseline=24, flops_to_stay=24, total_flops=24,
             train_seconds=1.0),
        dict(run="slow", final_val_loss=8.0, stopped=None, last_eval=(2, 8.0),
             budget_val_loss=8.0, flops_to_baseline=None, flops_to_stay=None, total_flops=20,
             train_seconds=1.0)]
    plot.main([str(p) for p in hand_runs] + ["--table"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| run | final val loss |")
    assert lines[3] == "| inc | 3.9000 | 5.0000 | 2.400e+01 | 2.400e+01 | 1.0 s |"
    assert "| not reached |" in lines[4]
    # no run labelled baseline: only the runs' own equal-cost marks count
    rows = plot.summarize(runs, ["a", "b", "c"])
    assert [(r["budget_val_loss"], r["flops_to_baseline"]) for r in rows] == [
        (6.0, None), (None, None), (None, None)]
    assert "not reached" not in plot.table(rows)


BLOCK_MATPLOTLIB = """
import sys
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoMatplotlib())
import plot
plot.main()
"""


@pytest.mark.slow
def test_plot_missing_matplotlib(hand_runs, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, str(hand_runs[0]), *args],
                              cwd=HERE, capture_output=True, text=True, timeout=60)

    r = cli("--out", str(tmp_path / "fig.png"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: plot.py needs matplotlib for the figure: pip install matplotlib"]
    assert cli("--table").returncode == 0  # the table needs no matplotlib


@pytest.mark.parametrize("content", [None, "", json.dumps({"step": 0, "val_loss": 10.0}) + "\n",
                                     "{oops\n",
                                     # no flops
                                     json.dumps({"step": 1, "loss": 3.0, "dt": 0.1}) + "\n",
                                     "[1, 2]\n",
                                     # a field of the wrong type: its line is named
                                     json.dumps({"step": "1", "loss": 3.0, "flops": 1, "dt": 0.1})
                                     + "\n",
                                     json.dumps({"step": 1, "loss": 3.0, "flops": 1, "dt": 0.1})
                                     + "\n" + json.dumps({"step": 1, "val_loss": "low"}) + "\n"])
def test_plot_bad_input(tmp_path, capsys, content):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(log), "--out", str(tmp_path / "fig.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(log) in err[0]
    assert "not a" not in err[0] or re.search(r"log\.jsonl:\d+: ", err[0])  # the line, named
    assert not (tmp_path / "fig.png").exists()


def evals_at(*points, equal_cost_at=None):
    """Evaluation records {step, val_loss}; the one at step equal_cost_at is marked equal_cost."""
    return [{"step": s, "val_loss": v, **({"equal_cost": True} if s == equal_cost_at else {})}
            for s, v in points]


@pytest.fixture
def study(tmp_path):
    """A study folder, REGIME/seedN. baseline: 10 FLOPs a step, equal cost at step 2 (20 FLOPs),
    final val 4.0 and 4.2, so the target is 4.1 and the baseline's mean FLOPs 40. inc: 8 FLOPs a
    step, equal cost at step 3; seed 1 reaches 4.1 at 32 FLOPs (0.8 of the baseline's), seed 2 at
    40 (1.0), seed 10 never. slow: one seed, never below 8."""
    def run(regime, seed, flops_per_step, n_steps, dt, evals):
        write_log(tmp_path / regime / f"seed{seed}" / "log.jsonl",
                  [*[step_rec(s, flops_per_step * s, dt=dt) for s in range(1, n_steps + 1)],
                   *evals])

    run("baseline", 1, 10, 4, 0.5, evals_at((0, 10.0), (2, 6.0), (4, 4.0), equal_cost_at=2))
    run("baseline", 2, 10, 4, 1.0, evals_at((0, 10.0), (2, 6.2), (4, 4.2), equal_cost_at=2))
    run("inc", 1, 8, 5, 0.2, evals_at((3, 4.5), (4, 4.0), (5, 3.8), equal_cost_at=3))
    run("inc", 2, 8, 5, 0.4, evals_at((3, 4.7), (4, 4.3), (5, 4.05), equal_cost_at=3))
    run("inc", 10, 8, 5, 0.6, evals_at((3, 4.9), (5, 4.2), equal_cost_at=3))
    run("slow", 1, 10, 2, 0.5, evals_at((2, 8.0)))
    (tmp_path / "inc" / "seed3").mkdir()  # a run that never started: no log, left out
    return tmp_path


def test_plot_study_means_deviations_and_not_reached_counts(study):
    runs, labels = plot.study_runs(study)
    assert labels == ["baseline", "baseline", "inc", "inc", "inc", "slow"]
    assert [e["val_loss"] for e in runs[4]["evals"]] == [4.9, 4.2]  # seed10 after seed2
    assert plot.mean_sd([1.0]) == (1.0, None) and plot.mean_sd([]) == (None, None)
    summary = plot.study_summary(runs, labels)
    assert summary["target"] == pytest.approx(4.1)
    assert (summary["baseline_flops"], summary["budget"]) == (40, 20)
    # no evaluation in (2, 3.2], past half and within 80% of 4 steps
    assert summary["last_fifth"] is None
    base = [{"evals": [{"step": s, "val_loss": v, "flops": s} for s, v in points],
             "steps": [step_rec(10, 10)]}
            for points in ([(0, 9.0), (4, 5.0), (8, 4.4), (10, 4.0)],
                           [(0, 9.0), (4, 5.0), (8, 4.6), (10, 4.2)])]
    assert plot.study_summary(base, ["baseline"] * 2)["last_fifth"] == (8, pytest.approx(4.5))
    base[1]["evals"][2]["step"] = 7  # the seeds' points differ: no one step to report
    assert plot.study_summary(base, ["baseline"] * 2)["last_fifth"] is None
    # two values 0.1 either side of their mean: sum of squares 0.02, over n − 1 = 1
    sd2 = math.sqrt(0.02)
    expected = [  # (regime, n, val loss at budget, FLOPs ratio, not reached, training seconds)
        # seed 2 ends at 4.2 > 4.1
        ("baseline", 2, (6.1, sd2), (1.0, None), 1, (3.0, math.sqrt(2))),
        ("inc", 3, (4.7, 0.2), (0.9, sd2), 1, (2.0, 1.0)),
        # no mark: its last eval within 20 FLOPs
        ("slow", 1, (8.0, None), (None, None), 1, (1.0, None))]
    for r, (regime, n, budget, ratio, missed, seconds) in zip(summary["regimes"], expected,
                                                              strict=True):
        assert (r["regime"], r["n"], r["not_reached"]) == (regime, n, missed)
        for key, want in (("budget_val_loss", budget), ("flops_ratio", ratio),
                          ("train_seconds", seconds)):
            assert r[key] == pytest.approx(want), (regime, key)

    lines = plot.study_table(summary).splitlines()
    assert lines[0].startswith("| regime | n | val loss at baseline budget |")
    assert lines[2] == ("| baseline | 2 | 6.1000 ± 0.1414 | 4.1000 ± 0.1414 | +0.00% ± 3.45% "
                        "| 1.000 ± 0.000 | 1.000; 1 of 2 never | 1.000; 1 of 2 never "
                        "| 3.0 s ± 1.4 s |")
    assert lines[3] == ("| inc | 3 | 4.7000 ± 0.2000 | 4.0167 ± 0.2021 | -2.03% ± 4.93% "
                        "| 1.000 ± 0.000 | 0.900 ± 0.141; 1 of 3 never "
                        "| 0.900 ± 0.141; 1 of 3 never | 2.0 s ± 1.0 s |")
    assert lines[4] == ("| slow | 1 | 8.0000 | 8.0000 | +95.12% | 0.500 | 1 of 1 never "
                        "| 1 of 1 never | 1.0 s |")
    assert "sample standard deviation (n − 1)" in lines[-1] and "4.1000" in lines[-1]
    assert "last fifth" not in lines[-1]
    lines = plot.study_table({**summary, "last_fifth": (3, 5.0)}).splitlines()
    assert lines[-1].endswith("the baseline's mean val loss went from 5.0000 (step 3) to 4.1000, "
                              "-18.0%.")


def test_plot_study_curves_bands_and_equal_cost_marks(study):
    runs, labels = plot.study_runs(study)
    flops, mean, sd = plot.regime_curve(runs[:2])  # the baselines share their evaluations' FLOPs
    assert flops.tolist() == [0, 20, 40] and mean == pytest.approx([10.0, 6.1, 4.1])
    assert sd == pytest.approx([0, math.sqrt(0.02), math.sqrt(0.02)])
    # different FLOPs: each run interpolated onto the union of points both cover (5..20)
    a = {"evals": [{"flops": f, "val_loss": v} for f, v in [(0, 10.0), (10, 6.0), (20, 4.0)]]}
    b = {"evals": [{"flops": f, "val_loss": v} for f, v in [(5, 9.0), (15, 5.0), (25, 3.0)]]}
    flops, mean, sd = plot.regime_curve([a, b])
    assert flops.tolist() == [5, 10, 15, 20] and mean == pytest.approx([8.5, 6.5, 5.0, 4.0])
    assert plot.regime_curve([a])[2].tolist() == [0, 0, 0]

    # a panel a family, the baseline in each
    family, other = plot.make_study_figure(runs, labels).axes
    assert [line.get_label() for line in family.lines] == ["baseline (n=2)", "inc (n=3)"]
    assert [line.get_label() for line in other.lines] == ["baseline (n=2)", "slow (n=1)"]
    assert family.lines[0].get_color() == other.lines[0].get_color()
    from matplotlib.collections import PathCollection, PolyCollection
    assert sum(isinstance(c, PolyCollection) for c in family.collections) == 2  # a band a regime
    marks = [c.get_offsets().tolist() for c in family.collections
             if isinstance(c, PathCollection)]
    assert marks == [[[20, pytest.approx(6.1)]], [[24, pytest.approx(4.7)]]]
    assert len([c for c in other.collections if isinstance(c, PathCollection)]) == 1  # slow: none


def test_plot_study_cli_and_bad_input(study, tmp_path, capsys):
    png = tmp_path / "fig" / "study.png"
    plot.main(["--study", str(study), "--table", "--out", str(png)])
    out = capsys.readouterr().out
    assert "| inc | 3 |" in out and png.read_bytes()[:4] == b"\x89PNG"
    assert plot.write_study(study).splitlines()[3].startswith("| inc | 3 |")
    assert ((study / "study.md").read_text().startswith("| regime |")
            and (study / "study.png").exists())
    shutil.rmtree(study / "baseline")
    (tmp_path / "empty").mkdir()
    for argv, message in [(["--study", str(study), "--table"],
                           "no runs of a regime named baseline"),
                          (["--study", str(tmp_path / "empty"), "--table"], "no runs in"),
                          (["--study", str(study), str(study), "--table"],
                           "give run logs or --study DIR"),
                          (["--study", str(study), "--x", "step", "--table"],
                           "drop --labels and --x"),
                          ([], "give run logs or --study DIR")]:
        with pytest.raises(SystemExit) as e:
            plot.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)


# the suite's toy flags without --val-tokens and --eval-every: the sweep's evaluation defaults apply
SWEEP_TOY = [x for f, v in zip(TOY[::2], TOY[1::2]) if f not in ("--val-tokens", "--eval-every")
             for x in (f, v)]


@pytest.mark.slow
def test_sweep_runs_resumes_and_summarizes_at_a_very_small_size(tmp_path, data, capsys,
                                                                monkeypatch):
    """2 regimes x 2 seeds of a 2-layer model at the budget of 4 baseline steps, after an
    interrupted sweep left one run stopped at a checkpoint: the sweep starts three, resumes that
    one and writes the summary; run again, it starts nothing."""
    out = tmp_path / "study"
    extra = ["--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--n-layer", "2",
             "--total-batch", "128", "--budget-steps", "4", "--inc-steps", "4"]
    flags, max_steps = sweep.train_flags("inc2-freeze", 2, extra)
    assert (flags[-4:] == ["--val-tokens", "0", "--eval-every", "1"]
            and max_steps > 4)  # cheaper steps: more
    stopped = out / "inc2-freeze" / "seed2"
    proc = subprocess.Popen([sys.executable, "-u", str(HERE / "train.py"), *flags,
                             "--out", str(stopped)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith(f"step {2:5d} |"):
            proc.send_signal(signal.SIGTERM)  # checkpoints at the end of the step it is in
    assert proc.wait(timeout=120) == 143 and (stopped / "ckpt.pt").exists()
    assert not sweep.finished(stopped, max_steps)

    argv = ["--regimes", "baseline,inc2-freeze", "--seeds", "1,2", "--out", str(out),
            "--jobs", "2", "--", *extra]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # --jobs 2 sets it for the runs: cores / 2
    sweep.main(argv)  # in this process: its runs are subprocesses all the same, two at a time
    printed = capsys.readouterr().out
    starts = [line.split(" in ")[0] for line in printed.splitlines()
              if line.startswith("[") and "done" not in line]
    assert sorted(starts) == ["[1/4] baseline seed 1: starting (4 steps)",
                              f"[2/4] inc2-freeze seed 1: starting ({max_steps} steps)",
                              "[3/4] baseline seed 2: starting (4 steps)",
                              f"[4/4] inc2-freeze seed 2: resuming ({max_steps} steps)"]
    assert sweep.run_env(2)["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert "OMP_NUM_THREADS" not in sweep.run_env(1)  # one run: PyTorch's own choice
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sweep.run_env(2)["OMP_NUM_THREADS"] == "3"  # the user's, kept
    logs = {}
    for regime in ("baseline", "inc2-freeze"):
        for seed in (1, 2):
            folder = out / regime / f"seed{seed}"
            steps, evals = read_log(folder)
            assert ([e["step"] for e in evals][-1] == steps[-1]["step"]
                    and sweep.finished(folder, steps[-1]["step"]))
            # --eval-every 1: every step
            assert len({e["step"] for e in evals}) == steps[-1]["step"] + 1
            # all 2049 - 1
            assert "validation 2,048 tokens in 16 batches" in (folder / "train.out").read_text()
            logs[folder] = (folder / "log.jsonl").read_bytes()
    assert b'"resumed": true' in logs[stopped]
    table = (out / "study.md").read_text()
    assert "| baseline | 2 |" in table and "| inc2-freeze | 2 |" in table and table in printed
    assert (out / "study.png").stat().st_size > 0

    sweep.main(argv)
    assert (sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("["))
            == [f"[{i}/4] {regime} seed {seed}: finished earlier, skipped"
                for i, (seed, regime) in enumerate([(1, "baseline"), (1, "inc2-freeze"),
                                                    (2, "baseline"), (2, "inc2-freeze")], 1)])
    assert all(folder.joinpath("log.jsonl").read_bytes() == log for folder, log in logs.items())


@pytest.mark.slow
def test_sweep_every_regime_spends_the_budget_at_a_very_small_size(tmp_path, data, capsys):
    """Every regime sweep.py knows, one seed, at the FLOPs of 24 baseline steps of a narrow 12-layer
    model (S = 12 needs 12):
    each trains, ends within one of its steps past the budget with its equal-cost evaluation,
    and has its row in the study's table."""
    out = tmp_path / "study"
    extra = ["--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--n-layer", "12",
             "--total-batch", "128", "--budget-steps", "24", "--inc-steps", "24",
             "--val-tokens", "128"]
    sweep.main(["--regimes", ",".join(sweep.REGIMES), "--seeds", "1", "--out", str(out),
                "--jobs", "2", "--", *extra])
    budget = 24 * full_step_flops(GPTConfig(block_size=32, n_layer=12, n_head=2, n_embd=32),
                                  128, 32)
    table = capsys.readouterr().out
    for regime in sweep.REGIMES:
        steps, evals = read_log(out / regime / "seed1")
        last_step = steps[-1]["flops"] - steps[-2]["flops"]
        assert (budget <= steps[-1]["flops"] < budget + last_step
                and evals[-1].get("equal_cost")), regime
        assert f"| {regime} | 1 |" in table, regime


@pytest.mark.slow
def test_sweep_passes_sigterm_to_its_runs_which_checkpoint_and_resume(tmp_path, data):
    """`kill SWEEP_PID` (SIGTERM to the sweep alone, as for one started with nohup) while two runs
    train side by side (--jobs 2): both get it too, save a checkpoint and stop, rather than run on
    orphaned, and no further run starts; the same command then resumes both and finishes."""
    out = tmp_path / "study"
    cmd = [sys.executable, str(HERE / "sweep.py"), "--regimes", "baseline", "--seeds", "1,2,3",
           "--out", str(out), "--jobs", "2", "--", "--preset", "tiny", "--data-dir", str(data),
           *SWEEP_TOY, "--max-steps", "100", "--val-tokens", "256", "--eval-every", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    logs = [out / "baseline" / f"seed{seed}" / "log.jsonl" for seed in (1, 2)]
    deadline = time.time() + 120
    while (not all(log.exists() and log.read_text().count('"loss"') >= 3 for log in logs)
           and time.time() < deadline):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode == 143  # as SIGTERM itself would
            and "stopped: run the same command again" in stderr), (stdout, stderr)
    for seed in (1, 2):
        assert (f"baseline seed {seed}: stopped (exit 143), resumable from its last checkpoint"
                in stdout), stdout
        steps, _ = read_log(out / "baseline" / f"seed{seed}")
        assert (out / "baseline" / f"seed{seed}" / "ckpt.pt").exists() and len(steps) < 100
    assert "seed 3: starting" not in stdout
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for seed in (1, 2, 3):
        assert (f"baseline seed {seed}: {'resuming' if seed < 3 else 'starting'} (100 steps)"
                in res.stdout)
        steps, evals = read_log(out / "baseline" / f"seed{seed}")
        assert [r["step"] for r in steps] == list(range(1, 101)) and evals[-1]["step"] == 100


@pytest.mark.slow
def test_sweep_nproc_launches_each_run_with_torchrun_and_matches_one_process(tmp_path, data,
                                                                             capsys, monkeypatch):
    """--nproc 2: the run is DDP on two CPU processes (gloo), and its losses are those of the same
    run in one process (the batch is split across ranks, not changed)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = ["--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--n-layer", "2",
             "--max-steps", "3"]
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        sweep.main(["--regimes", "baseline", "--seeds", "1", "--out", str(out),
                    "--nproc", str(nproc), "--", *extra])
        assert "[1/1] baseline seed 1: done" in capsys.readouterr().out
        assert f"device: cpu x {nproc}" in (out / "baseline" / "seed1" / "train.out").read_text()
        losses[nproc] = [r["loss"] for r in read_log(out / "baseline" / "seed1")[0]]
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_sweep_reports_a_failed_run_goes_on_and_refuses_bad_input(tmp_path, data, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    # seed 1 left a log but stopped before its first checkpoint: it cannot resume, and is not
    # deleted
    write_log(out / "baseline" / "seed1" / "log.jsonl",
              [step_rec(1, 10), {"step": 1, "val_loss": 5.0}])
    extra = ["--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--max-steps", "2"]
    with pytest.raises(SystemExit) as e:
        sweep.main(["--regimes", "baseline", "--seeds", "1,2", "--out", str(out), "--", *extra])
    captured = capsys.readouterr()
    assert e.value.code == 1
    log = out / "baseline" / "seed1" / "log.jsonl"
    assert (f"[1/2] baseline seed 1: FAILED: {log} is the log of a run that stopped before its "
            "first checkpoint (or whose checkpoint was removed), so there is nothing to resume: "
            "delete it" in captured.out)
    assert "[2/2] baseline seed 2: done" in captured.out and "| baseline | 2 |" in captured.out
    assert captured.err.splitlines() == ["failed: baseline seed 1"]
    assert log.exists()
    log.unlink()  # the advice, taken: the same command runs seed 1 and skips seed 2
    sweep.main(["--regimes", "baseline", "--seeds", "1,2", "--out", str(out), "--", *extra])
    captured = capsys.readouterr().out
    assert "[1/2] baseline seed 1: done" in captured and "seed 2: finished earlier" in captured

    for argv, message in [
            (["--regimes", "baseline,inc5"], "--regimes: unknown inc5"),
            (["--regimes", "baseline", "--seeds", "1,x"],
             "--seeds 1,x: give comma-separated whole numbers"),
            (["--regimes", "baseline", "--seeds", "1,1"], "must not repeat"),
            (["--regimes", "apollo", "--out", str(tmp_path / "new")], "add baseline to --regimes"),
            (["--regimes", "baseline", "--", "--seed", "3"], "--seed after --"),
            (["--regimes", "baseline", "--jobs", "0"], "--jobs 0 --nproc 1: give whole numbers"),
            (["--regimes", "baseline", "--jobs", "2", "--nproc", "2"], "--jobs with --nproc"),
            (["--regimes", "baseline", "--", *extra, "--lr", "-1"], "--lr -1.0: must be")]:
        with pytest.raises(SystemExit) as e:
            sweep.main(["--out", str(tmp_path / "bad"), *argv] if "--out" not in argv else argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------
# results/: the study's compact logs, and the README's tables made from them


def test_plot_drops_what_a_run_logged_past_the_checkpoint_it_resumed_from(tmp_path, capsys):
    """Stopped at once at step 5 (checkpoint at 3), resumed from 3 to its end at 4: steps 4 and 5
    of the first stretch, and its evaluation at 4, never happened to the run that finished."""
    first = [step_rec(s, 10 * s) for s in range(1, 6)] + [{"step": 4, "val_loss": 9.0}]
    resumed = [{"step": 3, "resumed": True}, step_rec(4, 40, loss=1.0),
               {"step": 4, "val_loss": 2.0}]
    write_log(tmp_path / "log.jsonl", first + resumed)
    run = plot.read_log(tmp_path)
    assert [r["step"] for r in run["steps"]] == [1, 2, 3, 4] and run["steps"][-1]["loss"] == 1.0
    assert [(e["step"], e["val_loss"]) for e in run["evals"]] == [(4, 2.0)]
    assert plot.stopped(run) is None  # it ended at 4, not "stopped at step 5"
    err = one_line_error(plot.main, [str(tmp_path), "--table", "--baseline", "x"], capsys)
    assert "--baseline goes with --study" in err
    err = one_line_error(plot.main, [str(tmp_path), str(tmp_path), "--table", "--labels", "x,x"],
                         capsys)
    assert "two runs share a label" in err


def test_sweep_reports_a_failed_runs_error_line_not_what_follows_it(tmp_path):
    """torchrun ends a failed run's output with a report of its own: the sweep quotes the run's
    error line, of this attempt, not the report's last line nor an earlier attempt's error."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.out").write_text("error: an earlier attempt's\n")
    fails = [sys.executable, "-c", "print('step 1'); print('error: this one'); print('=' * 20); "
             "raise SystemExit(1)"]
    code, line = sweep.Runs(fails, dict(os.environ)).run(tmp_path / "run", [], False)
    assert code == 1 and line == "error: this one"


def test_results_compact_log_keeps_evals_boundaries_and_time(tmp_path, data):
    """A run cut down to about 4 step records still has every evaluation at its FLOPs, the steps
    either side of each stage and phase boundary, the last step, and the loss and time of every
    step it stands for: the study's numbers come out of it as out of the whole log."""
    out = tmp_path / "run"
    run_train(out, data, "--stages", "2", "--max-steps", "24", "--inc-steps", "16", "--seed", "3")
    dest = tmp_path / "results" / "inc2" / "seed3.jsonl"
    results.compact(out, dest, {"regime": "inc2", "seed": 3}, points=4)
    full, short = plot.read_log(out), plot.read_log(dest)
    assert results.read_header(dest) == {"regime": "inc2", "seed": 3}
    assert [(e["step"], e["val_loss"], e["flops"]) for e in short["evals"]] == [
        (e["step"], e["val_loss"], e["flops"]) for e in full["evals"]]
    kept = [r["step"] for r in short["steps"]]
    layout = {r["step"]: (r["stage"], r["phase"]) for r in full["steps"]}
    crossings = [s for s in range(2, 25) if layout[s] != layout[s - 1]]
    assert crossings == [5, 9, 13, 17]  # each stage's phases 1 and 2, then continual training
    assert set(crossings) | {s - 1 for s in crossings} | {4, 8, 12, 16, 20, 24} <= set(kept)
    assert len(kept) < len(full["steps"])
    assert sum(r["steps"] for r in short["steps"]) == 24
    assert sum(r["dt"] for r in short["steps"]) == pytest.approx(sum(r["dt"] for r in
                                                                     full["steps"]))
    assert sum(r["loss"] * r["steps"] for r in short["steps"]) == pytest.approx(
        sum(r["loss"] for r in full["steps"]))
    assert short["steps"][-1]["flops"] == full["steps"][-1]["flops"]
    assert plot.run_row(short, "inc2", None, 3.0) == plot.run_row(full, "inc2", None, 3.0) | {
        "train_seconds": pytest.approx(plot.run_row(full, "inc2", None, 3.0)["train_seconds"])}
    with pytest.raises(ValueError, match="not a compact log"):
        results.read_header(out / "log.jsonl")


def test_sweep_results_count_as_finished_and_other_flags_are_refused(tmp_path, data, capsys):
    """--results keeps each finished run's compact log; another sitting (a new --out, nothing of
    the first left) skips the runs found there and summarizes from them. A study whose finished
    runs were made with other flags is refused before anything runs, in one line, where skipping
    them would have put their numbers in this study's table; its advice, taken, runs."""
    extra = ["--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--n-layer", "2",
             "--max-steps", "3"]
    res = tmp_path / "results"
    sweep.main(["--regimes", "baseline", "--seeds", "1", "--out", str(tmp_path / "a"),
                "--results", str(res), "--", *extra])
    printed = capsys.readouterr().out
    assert "[1/1] baseline seed 1: done" in printed and f"kept in {res}" in printed
    header = results.read_header(res / "baseline" / "seed1.jsonl")
    assert header["regime"] == "baseline" and header["config"]["max_steps"] == 3
    table = printed[printed.index("| regime"):printed.index("wrote")]
    shutil.rmtree(tmp_path / "a")
    sweep.main(["--regimes", "baseline", "--seeds", "1", "--out", str(tmp_path / "b"),
                "--results", str(res), "--", *extra])
    printed = capsys.readouterr().out
    assert f"[1/1] baseline seed 1: in {res / 'baseline' / 'seed1.jsonl'}, skipped" in printed
    assert not (tmp_path / "b" / "baseline").exists() and table in printed

    # other flags than the finished runs': in --results, and in --out alone
    for argv in (["--out", str(tmp_path / "c"), "--results", str(res)],
                 ["--out", str(tmp_path / "b")]):
        if "--results" not in argv:  # a finished run in the out folder, none in results
            sweep.main([*argv, "--regimes", "baseline", "--seeds", "1", "--", *extra])
            capsys.readouterr()
        err = one_line_error(sweep.main, [*argv, "--regimes", "baseline", "--seeds", "1", "--",
                                          *extra[:-1], "2"], capsys)
        assert "was made with other flags (--max-steps: 3 there, 2 here): give this study " \
               "another --out (and --results)" in err
    sweep.main(["--out", str(tmp_path / "d"), "--results", str(tmp_path / "res2"),
                "--regimes", "baseline", "--seeds", "1", "--", *extra[:-1], "2"])
    assert "[1/1] baseline seed 1: done" in capsys.readouterr().out
    # a run to be resumed, made with another --lr: resumed, it would train under both
    flags, _ = sweep.train_flags("baseline", 1, extra)
    train.main([*flags, "--out", str(tmp_path / "e" / "baseline" / "seed1"), "--lr", "1e-3"])
    capsys.readouterr()
    err = one_line_error(sweep.main, ["--out", str(tmp_path / "e"), "--regimes", "baseline",
                                      "--seeds", "1", "--", *extra[:-1], "5"], capsys)
    assert "--lr: 0.001 there, 0.003 here" in err


@pytest.mark.parametrize("argv, message", [
    (["--parts", "nope"], "--parts: unknown nope; known: study"),
    (["--parts", "study", "--seeds", "1"], "--parts sets --seeds itself"),

    (["--parts", "study", "--", "--lr", "1"], "--parts sets the flags after -- itself"),
    (["--seeds", "1"], "give --regimes and --out (or --parts)")])
def test_sweep_parts_take_no_other_flags(argv, message, capsys):
    assert message in one_line_error(sweep.main, argv, capsys)


def test_sweep_results_that_cannot_be_written_is_refused_before_any_run(tmp_path, data, capsys):
    (tmp_path / "file").write_text("")
    err = one_line_error(sweep.main, ["--regimes", "baseline", "--out", str(tmp_path / "out"),
                                      "--results", str(tmp_path / "file"), "--", "--preset",
                                      "tiny", "--data-dir", str(data), "--max-steps", "2"], capsys)
    assert f"--results {tmp_path / 'file'}: cannot keep compact logs there" in err
    assert not (tmp_path / "out").exists()


def test_results_readme_tables_are_what_the_committed_logs_give(tmp_path):
    """Every README block emptied, `python results.py` writes them back byte for byte from
    results/; and each part's command in the README is the one results.PARTS runs."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    blocks = results.BLOCK.findall(readme)
    assert {name for _, name, _, _ in blocks} == set(results.BLOCKS)
    emptied = results.BLOCK.sub(lambda m: m.group(1) + m.group(4), readme)
    copy = tmp_path / "README.md"
    copy.write_text(emptied, encoding="utf-8")
    logs = shutil.copytree(results.RESULTS, tmp_path / "results")  # the figures are written there
    argv = ["--readme", str(copy), "--results", str(logs)]
    with pytest.raises(SystemExit) as e:
        results.main([*argv, "--check"])
    assert e.value.code == 1
    results.main(argv)
    assert copy.read_text(encoding="utf-8") == readme
    results.main([*argv, "--check"])
    assert {p.name for p in logs.glob("*.png")} == {f"{name}.png" for name in results.PARTS
                                                     if results.part_runs(name)}
    for name in results.PARTS:
        assert results.part_command(name) in readme


def test_results_refuses_what_it_would_get_wrong_and_its_advice_repeats_the_flags(tmp_path,
                                                                                   capsys):
    """A block left open (rewriting it would swallow the prose up to the next block), a README
    with no blocks, a results folder with no compact logs: one line each, nothing written. A
    README behind its logs is told the command with the same --readme and --results."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    copy, logs = tmp_path / "README.md", shutil.copytree(results.RESULTS, tmp_path / "results")
    first_close = readme.index("<!-- /results.py -->")
    copy.write_text(readme[:first_close] + readme[first_close + len("<!-- /results.py -->"):])
    before = copy.read_text()
    err = one_line_error(results.main, ["--readme", str(copy), "--results", str(logs)], capsys)
    assert "is not closed before the next one opens: add <!-- /results.py -->" in err
    assert copy.read_text() == before
    copy.write_text("no tables here\n")
    err = one_line_error(results.main, ["--readme", str(copy), "--results", str(logs)], capsys)
    assert "the README has no results.py blocks" in err
    (tmp_path / "empty").mkdir()
    copy.write_text(readme)
    err = one_line_error(results.main, ["--readme", str(copy), "--results",
                                        str(tmp_path / "empty")], capsys)
    assert "no compact logs of the README's study there" in err and copy.read_text() == readme
    copy.write_text(results.BLOCK.sub(lambda m: m.group(1) + m.group(4), readme))
    argv = ["--readme", str(copy), "--results", str(logs)]
    err = one_line_error(results.main, [*argv, "--check"], capsys, code=1)
    assert err.endswith(f"run python results.py {' '.join(argv)}")
    results.main(argv)  # the advice, taken
    results.main([*argv, "--check"])



def test_results_verdicts_call_a_difference_within_the_spread_a_tie():
    """compare: lower loss is ahead, a difference no larger than the larger sd a tie, one seed no
    verdict; gap_claim: within a bound only when the whole mean ± sd is; claim_verdict: a paper's
    claim agrees only when every regime does what it says."""
    ref = {"budget_val_loss": (1.70, 0.02), "regime": "baseline-wsd"}
    d, word = results.compare({"budget_val_loss": (1.65, 0.01)}, ref)
    assert (d, word) == (pytest.approx(-0.05), "ahead")
    assert results.compare({"budget_val_loss": (1.72, 0.03)}, ref)[1] == "tie"  # 0.02 <= 0.03
    assert results.compare({"budget_val_loss": (1.75, 0.01)}, ref)[1] == "behind"
    assert results.compare({"budget_val_loss": (1.50, None)}, ref)[1] == "one seed: no verdict"
    gap = {(0.004, 0.0005): "within", (0.004, 0.002): "tie", (0.01, 0.002): "beyond",
           (0.001, None): "one seed: no verdict"}
    for (mean, sd), word in gap.items():
        cell, got = results.gap_claim(0.005, "late0", {"final_gap": (mean, sd), "n": 3}, ref)
        assert got == word and cell.startswith("late0's final-loss gap to baseline-wsd")
    assert results.claim_verdict(["behind", "behind"], "behind") == "agrees"
    assert results.claim_verdict(["ahead", "ahead"], "behind") == "disagrees"
    assert results.claim_verdict(["beyond", "beyond"], "within") == "disagrees"
    assert results.claim_verdict(["ahead", "tie"], "behind") == "mixed"
    assert results.claim_verdict(["behind", "ahead"], "behind") == "mixed"
    assert results.claim_verdict(["tie", "tie"], "ahead") == "cannot tell: ties"
    assert results.claim_verdict(["ahead", "one seed"], "ahead") == "no verdict yet: one seed"
    assert plot.signed_percent(-1e-17) == "+0.00%" and plot.signed_percent(-0.0123) == "-1.23%"


def test_results_late_regimes_wait_for_their_own_reference():
    """Late expansion is measured against baseline-wsd in a part that plans it, even before it has
    run (its cell says so), never against the cosine baseline meanwhile; elsewhere (plot.py
    --study on a folder without it) against the study's baseline."""
    assert results.reference("wide", "late1") == "baseline-wsd"
    assert results.reference("wide", "baseline-wsd") == results.reference("wide", "stack") == \
        "baseline"
    assert results.missing("wide", "late1", ["baseline", "late1"]) == (
        "baseline-wsd not run yet (n = 1)")
    assert results.missing("wide", "apollo", ["baseline", "late1"]) == "not run yet"
    assert plot.reference("late1", ["baseline", "late1"]) == "baseline"
    assert plot.reference("late1", ["baseline", "baseline-wsd", "late1"]) == "baseline-wsd"

# ----------------------------------------------------------------------------------------------
# Every refusal leads somewhere: each test takes the advice its message gives and checks that the
# next command proceeds


def test_baseline_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(
        tmp_path, data, capsys):
    """Bad data stops the first run after its step-0 evaluation, before any checkpoint: the same
    command, and --resume, both name the log to delete; deleting it, the command runs."""
    bad = make_shards(tmp_path / "bad", n_train=1)
    data_mod.write_shard(bad / "toy_train_000001.bin", np.r_[np.arange(4000), 60_000, 7])
    assert "holds token id 60000" in train_error(tmp_path, data, capsys, "--max-steps", "2",
                                                 data_dir=bad)
    log = tmp_path / "x" / "log.jsonl"
    for flags in ([], ["--resume"]):  # once the data is fixed, either way
        err = train_error(tmp_path, data, capsys, "--max-steps", "2", *flags)
        assert f"{log} is the log of a run that stopped before its first checkpoint" in err, err
        assert "delete it to start again" in err
    log.unlink()
    steps, _ = run_train(tmp_path / "x", data, "--max-steps", "2")
    assert [r["step"] for r in steps] == [1, 2]


def test_baseline_a_full_disk_at_the_first_checkpoint_says_there_is_none(tmp_path, data, capsys,
                                                                         monkeypatch):
    def full_disk(obj, path):
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    with monkeypatch.context() as m:
        m.setattr(runfolder.torch, "save", full_disk)
        err = train_error(tmp_path, data, capsys, "--max-steps", "2")
    assert "this run had no checkpoint yet" in err and "intact" not in err
    assert f"delete {tmp_path / 'x' / 'log.jsonl'} and run the same command again" in err
    (tmp_path / "x" / "log.jsonl").unlink()
    steps, _ = run_train(tmp_path / "x", data, "--max-steps", "2")  # space freed: it runs
    assert steps[-1]["step"] == 2 and (tmp_path / "x" / "ckpt.pt").exists()


def test_baseline_val_tokens_advice_is_a_value_that_works(tmp_path, data, capsys):
    """The validation split holds 2,049 tokens: 2,048 in whole 4 x 32 batches."""
    too_many = train_error(tmp_path, data, capsys, "--max-steps", "1", "--val-tokens", "4096")
    most = int(re.search(r"use --val-tokens (\d+) or less", too_many).group(1))
    too_few = train_error(tmp_path, data, capsys, "--max-steps", "1", "--val-tokens", "100")
    least = int(re.search(r"use --val-tokens (\d+) or more", too_few).group(1))
    assert (least, most) == (128, 2048)
    for n in (least, most):
        _, evals = run_train(tmp_path / str(n), data, "--max-steps", "1", "--val-tokens", str(n))
        assert len(evals) == 2
    err = train_error(tmp_path, data, capsys, "--max-steps", "1", "--seq-len", "1024",
                      "--batch-size", "4", "--total-batch", "4096")
    assert "validation split (2048 tokens) is less than one batch" in err
    assert "lower --batch-size or --seq-len" in err and "--val-tokens" not in err


def test_baseline_resuming_below_the_step_reached_is_refused_with_the_step(tmp_path, data, capsys):
    run_train(tmp_path, data, "--max-steps", "4")
    err = train_error(tmp_path, data, capsys, "--max-steps", "2", "--resume", out=".")
    assert "--max-steps 2 is below step 4, which this run has reached" in err
    steps, _ = run_train(tmp_path, data, "--max-steps", "4", "--resume")  # the advice: 4 or more
    assert steps[-1]["step"] == 4


def test_growth_too_few_steps_for_the_stages_names_the_steps_needed(tmp_path, data, capsys):
    flags = ["--regime", "apollo", "--grow-layers", "1,2,4", "--grow-at", "0.25,0.3"]
    err = train_error(tmp_path, data, capsys, *flags, "--max-steps", "8")
    assert "--max-steps 8 is too few for stages that start at --grow-at 0.25,0.3" in err
    enough = int(re.search(r"give at least (\d+)", err).group(1))
    steps, _ = run_train(tmp_path / "ok", data, *flags, "--max-steps", str(enough))
    assert len({r["unique_layers"] for r in steps}) == 3  # three stages, each with a step
    assert "must increase strictly" in train_error(tmp_path, data, capsys, "--regime", "apollo",
                                                   "--grow-layers", "1,2,4", "--grow-at",
                                                   "0.5,0.25")


def test_data_folders_never_mix(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    folder = tmp_path / "data"
    assert pf.main(["--text", str(text), "--out", str(folder)]) == 0
    assert pf.main(["--text", str(text), "--out", str(folder)]) == 0  # the same text: re-made
    other = tmp_path / "b.txt"
    other.write_text("Now is the winter of our discontent.\n" * 50)
    err = prepare_error(capsys, "--text", str(other), "--out", str(folder))
    assert "already holds other shards (a_train_000001.bin, a_val_000000.bin)" in err
    err = prepare_error(capsys, "--text", str(text), "--out", str(folder), "--tokenizer", "char")
    assert "made with the gpt2 tokenizer, not char (meta.json)" in err
    assert data_mod.read_meta(folder) == data_mod.GPT2_META  # untouched
    assert pf.main(["--text", str(other), "--out", str(tmp_path / "b")]) == 0  # its own --out
    # a shard is known by its name, not by "val" anywhere in it
    named = tmp_path / "named"
    data_mod.write_shard(named / "interval_val_000000.bin", np.arange(10))
    data_mod.write_shard(named / "interval_train_000001.bin", np.arange(10))
    train, val = data_mod.list_shards(named)
    assert [f.name for f in train] == ["interval_train_000001.bin"]
    assert [f.name for f in val] == ["interval_val_000000.bin"]
    data_mod.write_shard(named / "notes.bin", np.arange(10))
    with pytest.raises(ValueError, match="notes.bin is not named as a shard"):
        data_mod.list_shards(named)
    (named / "notes.bin").unlink()
    data_mod.write_shard(named / "other_train_000001.bin", np.arange(10))
    with pytest.raises(ValueError, match=r"holds the shards of 2 datasets \(interval, other\)"):
        data_mod.list_shards(named)


def test_data_every_missing_input_at_once_offline(tmp_path, monkeypatch):
    def offline(name):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(data_mod.tiktoken, "get_encoding", offline)
    with pytest.raises(DownloadError) as e:
        pf.prepare_tinyshakespeare(tmp_path, url=dead_url(), retries=0)
    assert "could not download Tiny Shakespeare" in str(e.value)
    assert "GPT-2's BPE files" in str(e.value) and "TIKTOKEN_CACHE_DIR" in str(e.value)


def test_data_a_failed_write_names_its_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_mod.os, "replace", full)
    with pytest.raises(OSError, match=r"could not write .*x_val_000000.bin \(No space left"):
        data_mod.write_shard(tmp_path / "x_val_000000.bin", np.arange(10))
    assert list(tmp_path.iterdir()) == []


def test_data_ctrl_c_while_tokenizing_is_one_line_and_keeps_nothing_half_written(
        tmp_path, capsys, monkeypatch):
    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be.\n" * 50)

    def interrupted(path, tokens):
        raise KeyboardInterrupt  # as if during the tokenizing or the write

    monkeypatch.setattr(pf, "write_shard", interrupted)
    argv = ["--text", str(text), "--out", str(tmp_path / "d"), "--tokenizer", "byte"]
    assert pf.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again" in err
    monkeypatch.undo()
    assert pf.main(argv) == 0
    assert not [p for p in (tmp_path / "d").iterdir() if p.suffix == ".tmp"]
    def cut_short(path, mode):  # the temporary file begun, then Ctrl-C
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(data_mod, "open", cut_short, raising=False)
        with pytest.raises(KeyboardInterrupt):
            data_mod.write_shard(tmp_path / "e" / "x_val_000000.bin", np.arange(3))
    assert list((tmp_path / "e").iterdir()) == []


def test_resume_refuses_other_shards_in_the_same_data_folder(tmp_path, data, capsys):
    """Another text made into the run's --data-dir between its start and its --resume: refused in
    one line, rather than training on other tokens from the saved position; the data put back,
    the run resumes."""
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    run_train(tmp_path / "run", folder, "--max-steps", "2")
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    make_shards(folder, seed=7)  # the same names, other tokens
    argv = ["--preset", "tiny", "--data-dir", str(folder), "--out", str(tmp_path / "run"), *TOY,
            "--max-steps", "4", "--resume"]
    err = one_line_error(train.main, argv, capsys)
    assert (f"the training shards in {folder} are not those this run trained on (their names, "
            "sizes or first bytes differ): resume with the data it started on") in err
    for name, content in saved.items():
        (folder / name).write_bytes(content)
    train.main(argv)
    assert read_log(tmp_path / "run")[0][-1]["step"] == 4


def test_a_budget_too_small_for_the_schedule_names_the_budget_and_its_advice_works(tmp_path,
                                                                                   data, capsys):
    """The run length --budget-steps probes is not a flag the user gave: the refusal says so and
    names the flags that cure it; raising the budget, the run's flags resolve. A budget that
    buys less than the stages need is refused too (it used to be spent many times over);
    shortening them, the run's flags resolve."""
    mine = ["--budget-steps", "1", "--stages", "4", "--inc-steps", "300"]
    flags = ["--preset", "tiny", "--data-dir", str(data), *TOY, *mine]
    err = train_error(tmp_path, data, capsys, *mine)
    assert ("--budget-steps 1: no run of up to 100 steps holds this run's schedule (--inc-steps "
            "300 exceeds --max-steps 100; that --max-steps is the longest run tried, not one you "
            "gave): change the flag it names, or raise --budget-steps") in err
    assert config.parse_args([*flags[:-5], "400", *flags[-4:]]).max_steps > 300  # raised
    # a budget the schedule's stages do not fit in: refused, not spent many times over
    err = train_error(tmp_path, data, capsys, *mine[:1], "20", *mine[2:])
    assert ("--budget-steps 20 buys less than this schedule needs: the shortest run that holds "
            "it, 300 steps, spends") in err and "raise --budget-steps, or shorten" in err
    assert config.parse_args([*flags[:-5], "20", *flags[-4:-1], "16"]).max_steps >= 20  # shorter


def test_resume_on_data_remade_with_another_tokenizer_is_one_line(tmp_path, data, capsys):
    """The data folder remade with another tokenizer: the model these flags make has another
    vocabulary than the checkpoint's. Refused in one line naming both, not a size-mismatch
    traceback; the data put back, the run resumes."""
    folder = tmp_path / "data"
    rng = np.random.default_rng(0)
    folder.mkdir()
    data_mod.write_shard(folder / "t_val_000000.bin", rng.integers(0, 256, 2049))
    data_mod.write_shard(folder / "t_train_000001.bin", rng.integers(0, 256, 4097))
    run_train(tmp_path / "run", folder, "--max-steps", "2")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 256}))
    argv = ["--preset", "tiny", "--data-dir", str(folder), "--out", str(tmp_path / "run"), *TOY,
            "--max-steps", "4", "--resume"]
    err = one_line_error(train.main, argv, capsys)
    assert "holds another model than these flags and --data-dir make (vocab_size: 50304 there, " \
           "256 here): resume with the data it started on (its tokenizer: gpt2)" in err
    (folder / "meta.json").unlink()
    train.main(argv)
    assert read_log(tmp_path / "run")[0][-1]["step"] == 4


def test_sweep_a_second_sweep_on_one_folder_is_refused_at_start(tmp_path, data, capsys):
    out = tmp_path / "study"
    with runfolder.hold(out / "sweep.lock", "sweep"):  # a sweep running there
        with pytest.raises(SystemExit) as e:
            sweep.main(["--regimes", "baseline", "--seeds", "1", "--out", str(out), "--",
                        "--preset", "tiny", "--data-dir", str(data), *SWEEP_TOY, "--max-steps",
                        "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"--out {out} is in use by another sweep (pid {os.getpid()})" in err
    assert not (out / "baseline").exists()  # nothing started, nothing called stale


def test_sweep_names_a_run_left_going_by_a_killed_sweep_and_goes_on_once_it_ends(tmp_path, data,
                                                                                  capsys):
    """A sweep killed with SIGKILL leaves its runs going (their own processes): the next sweep
    says which process holds the folder, rather than quoting that run's output; once it ends, the
    same command runs it."""
    out = tmp_path / "study"
    argv = ["--regimes", "baseline", "--seeds", "1", "--out", str(out), "--", "--preset", "tiny",
            "--data-dir", str(data), *SWEEP_TOY, "--max-steps", "2"]
    (out / "baseline" / "seed1").mkdir(parents=True)
    with runfolder.hold(out / "baseline" / "seed1" / "lock", "run"):  # the orphan, running
        with pytest.raises(SystemExit) as e:
            sweep.main(argv)
    assert e.value.code == 1
    assert (f"baseline seed 1: FAILED: {out / 'baseline' / 'seed1'} is in use by another "
            f"train.py (pid {os.getpid()}), not of this sweep: wait for it to end (or stop it: "
            f"kill {os.getpid()}), then run the sweep again") in capsys.readouterr().out
    assert not (out / "baseline" / "seed1" / "train.out").exists()
    sweep.main(argv)  # it ended: the advice, taken
    assert "[1/1] baseline seed 1: done" in capsys.readouterr().out


def test_sample_a_folder_for_a_checkpoint_points_at_the_file(tmp_path, capsys):
    save_plain_checkpoint(tiny_gpt(), tmp_path / "ckpt.pt")
    err = one_line_error(sample_main, ["--checkpoint", str(tmp_path), "--device", "cpu",
                                       "--max-new-tokens", "2"], capsys)
    assert f"{tmp_path} is a folder, not a checkpoint: point at {tmp_path / 'ckpt.pt'}" in err
    sample_main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--device", "cpu",
                 "--max-new-tokens", "2"])
    assert "sample 0:" in capsys.readouterr().out


def test_export_into_a_folder_it_cannot_make_is_one_line(tmp_path, capsys):
    ckpt = save_plain_checkpoint(tiny_gpt(), tmp_path / "ckpt.pt")
    (tmp_path / "file").write_text("not a folder")
    err = one_line_error(export_main, ["--checkpoint", str(ckpt), "--out",
                                       str(tmp_path / "file" / "hf")], capsys)
    assert err.startswith("error: ") and "file is a file, not a folder" in err


def test_plot_stays_below_ignores_a_dip_and_equal_steps_report_gap_and_flops(tmp_path):
    """A run that dips below the target and comes back up reaches it first at the dip, but stays
    at or below it only from its last stretch down there. At equal steps the table gives the final
    gap and the FLOPs ratio against the chosen baseline (here late expansion's baseline-wsd)."""
    base = [{"step": 0, "val_loss": 9.0}, step_rec(1, 10), step_rec(2, 20),
            {"step": 2, "val_loss": 5.0}, step_rec(3, 30), step_rec(4, 40),
            {"step": 4, "val_loss": 4.0}]
    dip = [{"step": 0, "val_loss": 9.0}, step_rec(1, 5), {"step": 1, "val_loss": 3.9},
           step_rec(2, 10), {"step": 2, "val_loss": 4.5}, step_rec(3, 15),
           {"step": 3, "val_loss": 4.0}, step_rec(4, 20), {"step": 4, "val_loss": 3.8}]
    for seed in (1, 2):
        write_log(tmp_path / "baseline-wsd" / f"seed{seed}" / "log.jsonl", base)
        write_log(tmp_path / "late0" / f"seed{seed}" / "log.jsonl", dip)
    runs, labels = plot.study_runs(tmp_path)
    row = plot.run_row(runs[-1], "late0", 40, 4.0)
    assert (row["flops_to_baseline"], row["flops_to_stay"]) == (5, 15)
    summary = plot.study_summary(runs, labels, baseline="baseline-wsd")
    late = next(r for r in summary["regimes"] if r["regime"] == "late0")
    assert late["final_gap"][0] == pytest.approx(-0.05) and late["flops"] == (0.5, 0.0)
    assert (late["flops_ratio"], late["stay_ratio"]) == ((0.125, 0.0), (0.375, 0.0))
    text = plot.study_table(summary)
    assert ("| late0 | 2 | 3.8000 ± 0.0000 | 3.8000 ± 0.0000 | -5.00% ± 0.00% | 0.500 ± 0.000 "
            "| 0.125 ± 0.000 | 0.375 ± 0.000 |") in text and "against baseline-wsd" in text
    with pytest.raises(ValueError, match="no runs of a regime named baseline"):
        plot.study_summary(runs, labels)
    assert plot.families(["baseline", "inc4", "apollo", "baseline-wsd", "late0", "mine"]) == [
        ("incremental (Li et al.)", ["baseline", "inc4"]),
        ("Apollo, stacking, G_stack", ["baseline", "apollo"]),
        ("late expansion (Bu)", ["baseline-wsd", "late0"]), ("other regimes", ["baseline", "mine"])]
    assert plot.families(["baseline", "inc12"]) == [("incremental (Li et al.)",
                                                     ["baseline", "inc12"])]
    assert len(plot.make_study_figure(runs, labels, "baseline-wsd").axes) == 1


def test_sweep_of_a_new_user_bad_inputs_found_and_fixed(tmp_path, data, capsys, monkeypatch):
    """Cases a new-user sweep of every script found misleading or silently wrong, each now one
    line that names the real cause."""
    def train_err(*flags, data_dir=None):
        return train_error(tmp_path, data, capsys, "--max-steps", "1", *flags, data_dir=data_dir)

    assert "--rewarm -2: must be a whole number -1 or more" in train_err("--rewarm", "-2")
    assert "only applies where blocks are shared" in train_err("--share", "cyclic")
    assert "--out '': give a folder's name" in one_line_error(
        train.main, ["--preset", "tiny", "--data-dir", str(data), "--out", "", *TOY], capsys)
    (tmp_path / "file").write_text("not a folder")
    assert "is a file: give the folder" in train_err(data_dir=tmp_path / "file")
    err = one_line_error(sweep.main, ["--regimes", "baseline,inc4-freeze", "--out",
                                      str(tmp_path / "s"), "--", "--stages", "2"], capsys)
    assert "--stages after --: that flag defines the regimes" in err
    assert "--n-layer only goes with --split" in one_line_error(cost_main, ["--n-layer", "4"],
                                                                capsys)
    cost_main(["--batch-tokens", "1024"])  # incremental: no ranks to split over
    assert "Incremental training" in capsys.readouterr().out
    log = write_log(tmp_path / "run" / "log.jsonl", [step_rec(1, 10), {"step": 1, "val_loss": 5.0}])
    for out, message in [(tmp_path, "give an image file's name"),
                         (tmp_path / "file" / "fig.png", "is a file, not a folder")]:
        assert message in one_line_error(plot.main, [str(log), "--out", str(out)], capsys)
    ckpt = save_plain_checkpoint(tiny_gpt(), tmp_path / "ckpt.pt")
    assert "is a file, not a folder" in one_line_error(
        export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "file" / "hf")], capsys)
    # prepare_fineweb: another text under the same name, a file for --out, HF_ENDPOINT no URL
    for i, words in enumerate(["To be, or not to be.\n", "Now is the winter.\n"]):
        (tmp_path / f"t{i}").mkdir()
        (tmp_path / f"t{i}" / "input.txt").write_text(words * 40)
    folder = str(tmp_path / "d")
    assert pf.main(["--text", str(tmp_path / "t0" / "input.txt"), "--out", folder]) == 0
    assert "holds another text's tokens under this name" in prepare_error(
        capsys, "--text", str(tmp_path / "t1" / "input.txt"), "--out", folder)
    assert "give a folder for the shards" in prepare_error(
        capsys, "--text", str(tmp_path / "t0" / "input.txt"), "--out", str(tmp_path / "file"))
    monkeypatch.setenv("HF_ENDPOINT", "notaurl")
    assert "HF_ENDPOINT='notaurl': give the hub's address" in prepare_error(capsys, "--shards", "0")

def test_hellaswag_a_missing_file_names_the_variable_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=rf"\${DATA_DIR_ENV}: point it at the folder"):
        load_examples("val")
    monkeypatch.setenv(DATA_DIR_ENV, str(VAL.parent))  # the advice, taken
    assert len(load_examples("val", limit=3)) == 3

def test_plot_a_stopped_run_has_no_final_val_loss(tmp_path, capsys):
    stopped = write_log(tmp_path / "stopped" / "log.jsonl", [
        {"step": 0, "val_loss": 9.0}, step_rec(1, 10), step_rec(2, 20),
        {"step": 2, "val_loss": 7.0}, step_rec(3, 30)])
    run = plot.read_log(stopped)
    row = plot.run_row(run, "stopped", None, None)
    assert row["final_val_loss"] is None and row["stopped"] == 3 and row["last_eval"] == (2, 7.0)
    assert "| stopped | stopped at step 3 (last: 7.0000 at step 2) |" in plot.table([row])
    with pytest.raises(ValueError, match="a baseline run stopped at step 3"):
        plot.study_summary([run], ["baseline"])



# ----------------------------------------------------------------------------------------------
# Samples and export (sample.py, export.py): text from a checkpoint, a Hugging Face GPT-2 folder


def save_checkpoint_with_plan(model, plan, path, tokenizer=data_mod.GPT2_META):
    """A checkpoint with what sample.py, export.py and hellaswag.py read of train.py's."""
    torch.save({"format": runfolder.FORMAT, "model": model.state_dict(),
                "model_config": model.config.to_dict(), "eval_plan": plan.to_dict(),
                "tokenizer": tokenizer}, path)
    return path


def test_export_sample_hellaswag_and_resume_refuse_an_earlier_format_in_one_line(tmp_path, data,
                                                                                capsys):
    """A checkpoint from before FORMAT (no "format" key) is refused with what to do, everywhere."""
    run_train(tmp_path, data, "--max-steps", "2")
    path = tmp_path / "ckpt.pt"
    old = torch.load(path, weights_only=True)
    del old["format"]
    torch.save(old, path)
    mains = {train.main: ["--preset", "tiny", "--data-dir", str(data), "--out", str(tmp_path), *TOY,
                          "--max-steps", "4", "--resume"],
             sample_main: ["--checkpoint", str(path), "--device", "cpu"],
             export_main: ["--checkpoint", str(path), "--out", str(tmp_path / "hf")],
             hs_main: ["--checkpoint", str(path), "--data-file", str(VAL), "--device", "cpu"]}
    for main, argv in mains.items():
        err = one_line_error(main, argv, capsys)
        assert f"{path} is in checkpoint format 1, written by an earlier nanogrow" in err, err
        assert "use the version that wrote it, or train again" in err


def test_sample_same_seed_same_text_and_exactly_max_new_tokens():
    model, enc = tiny_gpt(), data_mod.tokenizer(data_mod.GPT2_META)
    args = dict(SAMPLE_DEFAULTS, num_samples=3, max_new_tokens=8, device="cpu")
    first = sample(model, enc, **args)
    assert (sample(model, enc, **args) == first
            and sample(model, enc, **{**args, "seed": 7}) != first)
    assert len(first) == 3 and all(text.startswith(args["prompt"]) for text in first)
    assert model.training  # its mode is kept
    # generate: the prompt kept, exactly max_new_tokens more, never a padding token
    idx = tokens(0, 200)  # (2, 200): longer than block_size 128, so the context is cropped
    out = generate(model.eval(), idx, 5, 50, 1.0, torch.Generator().manual_seed(0),
                   vocab=enc.vocab_size)
    assert out.shape == (2, 205) and torch.equal(out[:, :200], idx) and out.max() < enc.vocab_size
    with torch.no_grad():  # top-1 is greedy: the argmax of the last 128 tokens' next-token logits
        greedy = generate(model, idx, 1, 1, 1.0, torch.Generator())[:, -1]
        assert torch.equal(greedy, model(idx[:, -128:])[0][:, -1].argmax(-1))


def test_sample_cli_follows_the_checkpoints_eval_plan(tmp_path, capsys):
    model, shared = tiny_gpt(), Plan((0, 0, 1, 1))
    ckpt = save_checkpoint_with_plan(model, shared, tmp_path / "ckpt.pt")
    argv = ["--checkpoint", str(ckpt), "--prompt", "ROMEO:", "--num-samples", "2",
            "--max-new-tokens", "6", "--seed", "3", "--device", "cpu"]
    sample_main(argv)
    printed = capsys.readouterr().out
    sample_main(argv)
    assert capsys.readouterr().out == printed  # same seed, same text
    enc = data_mod.tokenizer(data_mod.GPT2_META)
    args = dict(prompt="ROMEO:", num_samples=2, max_new_tokens=6, top_k=50, temperature=1.0,
                seed=3, device="cpu")
    texts = sample(model, enc, plan=shared, **args)
    assert printed == "".join(f"sample {i}: {t}\n" for i, t in enumerate(texts))
    assert sample(model, enc, **args) != texts  # the full plan writes otherwise


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples 0: must be a whole number from 1 to 10,000"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be a whole number from 1"),
    (["--max-new-tokens", str(10**20)], f"--max-new-tokens {10**20}: must be a whole number"),
    (["--top-k", "0"], "--top-k 0: must be a whole number from 1"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--temperature", "0"], "--temperature 0.0 must be above 0"),
    (["--checkpoint", "nowhere/ckpt.pt"], "no checkpoint at nowhere/ckpt.pt"),
])
def test_sample_bad_input_is_one_line_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--device", "cpu", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_sample_every_shows_samples_in_training_and_changes_no_number(tmp_path, data, capsys):
    plain, plain_evals = run_train(tmp_path / "plain", data, "--max-steps", "4")
    capsys.readouterr()
    steps, evals = run_train(tmp_path / "sampled", data, "--max-steps", "4", "--sample-every", "2")
    printed = capsys.readouterr().out
    assert [(r["loss"], r["norm"]) for r in steps] == [(r["loss"], r["norm"]) for r in plain]
    assert [r["val_loss"] for r in evals] == [r["val_loss"] for r in plain_evals]
    weights = [torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"]
               for run in ("plain", "sampled")]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    # at steps 0 and 2, and after the last step; in log.jsonl too
    assert printed.count(f"sample 0: {SAMPLE_DEFAULTS['prompt']}") == 3 and "sample 3: " in printed
    logged = [json.loads(line)
              for line in (tmp_path / "sampled" / "log.jsonl").read_text().splitlines()]
    samples = [r for r in logged if "samples" in r]
    assert ([r["step"] for r in samples] == [0, 2, 4]
            and all(len(r["samples"]) == 4 for r in samples))
    # --sample-every changes no number, so a run may resume with another one
    run_train(tmp_path / "plain", data, "--max-steps", "4", "--sample-every", "3", "--resume")
    assert "sample 0: " in capsys.readouterr().out


def hf_model(folder):
    """The exported folder as lm-eval-harness loads it: AutoModelForCausalLM, nothing left to
    initialise."""
    from transformers import AutoModelForCausalLM
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "trained", "shared"])
def test_export_logits_match_transformers_and_round_trip(kind, tmp_path, data, capsys):
    if kind == "random":
        model = tiny_gpt()
        # at std 0.02 GELU's inputs are too small for its tanh and erf forms to differ
        with torch.no_grad():
            for p in model.transformer.h.parameters():
                p.mul_(10 if p.dim() == 2 else 1)
        ckpt = save_checkpoint_with_plan(model, Plan((0, 1)), tmp_path / "ckpt.pt")
    elif kind == "trained":
        run_train(tmp_path, data, "--max-steps", "3")
        ckpt = tmp_path / "ckpt.pt"
    else:  # Apollo stopped in its second stage: 2 unique blocks evaluated at depth 4
        killed_run(tmp_path, data, 6, "--regime", "apollo", "--grow-layers", "1,2,4",
                   "--grow-at", "0.25,0.5", "--max-steps", "20")
        ckpt = tmp_path / "ckpt.pt"
    model, plan = load_model(ckpt)
    assert plan == (Plan((0, 0, 1, 1)) if kind == "shared"
                    else Plan(tuple(range(model.config.n_layer))))
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert "loads both" in capsys.readouterr().out
    # no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf")) == ["hf"]
    hf = hf_model(tmp_path / "hf")
    cfg = model.config
    assert ((hf.config.n_layer, hf.config.vocab_size, hf.config.n_positions)
            == (len(plan.blocks), 50257, cfg.block_size))
    idx = torch.randint(0, 50257, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx, plan=plan)[0][..., :50257]  # (2, T, 50257)
        assert (hf(idx).logits - ours).abs().max() < 1e-4
        # and back through the import GPT.from_pretrained uses: a plain GPT at the exported depth
        back = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=50257, n_layer=len(plan.blocks),
                             n_head=cfg.n_head, n_embd=cfg.n_embd))
        back.load_state_dict(convert_hf_state_dict(hf.state_dict()))
        assert torch.allclose(back.eval()(idx)[0], ours, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "byte", "char"])
def test_export_folder_works_with_autotokenizer_and_pipeline(name, tmp_path, capsys):
    """The exported folder carries its tokenizer: AutoTokenizer encodes as the data's tokenizer
    does, and pipeline("text-generation", folder) continues a prompt as this model does."""
    from transformers import AutoTokenizer, pipeline
    meta = data_mod.text_meta(name, SHAKESPEARE.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304 if name == "gpt2" else meta["vocab_size"],
                          n_layer=2, n_head=2, n_embd=32))
    ckpt = save_checkpoint_with_plan(model, Plan((0, 1)), tmp_path / "ckpt.pt", tokenizer=meta)
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert f"its {name} tokenizer" in capsys.readouterr().out
    ours, theirs = data_mod.tokenizer(meta), AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO:\nIs the day so young?  What, ho!"
    assert theirs.encode(text) == ours.encode(text) and theirs.decode(ours.encode(text)) == text
    ids = torch.tensor([ours.encode("ROMEO:")])  # (1, T)
    with torch.no_grad():
        for _ in range(4):  # greedy, over the tokenizer's own tokens
            logits = model.eval()(ids)[0][0, -1, :ours.vocab_size]  # (V,)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    generate = pipeline("text-generation", str(tmp_path / "hf"))
    made = generate("ROMEO:", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert made == ours.decode(ids[0].tolist())

def test_export_of_a_run_stopped_mid_growth_says_it_is_the_model_as_it_stood(tmp_path, data,
                                                                             capsys):
    stopped = tmp_path / "run"
    # SIGTERM after step 2's line: the checkpoint is of the step in flight when it lands, within
    # stage 1 (steps 0-5)
    step = killed_run(stopped, data, 2, "--stages", "2", "--max-steps", "20", "--inc-steps", "12")
    assert 2 <= step < 6
    export_main(["--checkpoint", str(stopped / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "GPT-2 with 2 layers" in out  # stage 1 of 2: half the 4 layers
    assert (f"the run stopped at step {step}, before its end: this is the model as it stood there"
            in out)


def test_export_of_msg_mid_ramp_gives_advice_that_works(tmp_path, data, capsys):
    """A checkpoint saved while MSG's gates were opening: a run that stopped there is told the step
    to continue past (resuming to it, the export works); a run that ends before its gates open is
    told to train again with its last stage earlier (done so, the export works)."""
    msg = ["--regime", "msg", "--grow-layers", "2,4", "--msg-ramp", "8", "--max-steps", "20"]
    stopped = tmp_path / "stopped"
    at = killed_run(stopped, data, 5, *msg, "--grow-at", "0.2")  # the step in flight: 5 or so
    assert 5 <= at < 12  # gates open 4 -> 12
    err = one_line_error(export_main, ["--checkpoint", str(stopped / "ckpt.pt"),
                                       "--out", str(tmp_path / "a")], capsys)
    assert ("they are open from step 12: continue the run past it (train.py with its flags and "
            f"--resume; it stopped at step {at}), then export") in err
    run_train(stopped, data, *msg, "--grow-at", "0.2", "--resume")
    capsys.readouterr()
    export_main(["--checkpoint", str(stopped / "ckpt.pt"), "--out", str(tmp_path / "a")])
    assert "the run stopped" not in capsys.readouterr().out  # it ended

    late = tmp_path / "late"
    run_train(late, data, *msg, "--grow-at", "0.9")  # gates open 18 -> 26, after the end
    err = one_line_error(export_main, ["--checkpoint", str(late / "ckpt.pt"),
                                       "--out", str(tmp_path / "b")], capsys)
    assert ("its run ends at step 20, before its last stage's gates open at step 26: train it "
            "again with that stage starting 8 or more steps before the end") in err
    run_train(tmp_path / "again", data, *msg, "--grow-at", "0.6")  # 12 -> 20
    export_main(["--checkpoint", str(tmp_path / "again" / "ckpt.pt"), "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_export_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    def error_of(ckpt, out):
        with pytest.raises(SystemExit) as e:
            export_main(["--checkpoint", str(ckpt), "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    gated = save_checkpoint_with_plan(tiny_gpt(), Plan((0, 1), gates=(1.0, 0.5)),
                                      tmp_path / "gated.pt")
    assert "MSG's gates were opening" in error_of(gated, tmp_path / "a")
    assert "no checkpoint at" in error_of(tmp_path / "nowhere.pt", tmp_path / "b")
    plain = save_checkpoint_with_plan(tiny_gpt(), Plan((0, 1)), tmp_path / "plain.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "already exists and is not an empty folder" in error_of(plain, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "gated.pt", "plain.pt"]
    (tmp_path / "empty").mkdir()  # an empty folder is replaced by the export
    export_main(["--checkpoint", str(plain), "--out", str(tmp_path / "empty")])
    assert (sorted(p.name for p in (tmp_path / "empty").iterdir())
            == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
                "vocab.json"])
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "empty").iterdir()}
    assert len(modes) == 1  # the weights readable as the config is
