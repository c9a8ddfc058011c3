"""Train Flowception.

    python train.py                                   # the 3-pixel toy on CPU, a few minutes on 2 cores
    python train.py --preset toy_tasks                # the toy on every task: i2v, interpolation, ...
    python train.py --preset toy --steps 500 --out out/quick
    python train.py --resume                          # continue out/<preset>/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train.py # data parallel: gloo on CPU, nccl on CUDA
    python train.py --encode-videos videos/ --out data/latents --vae Lightricks/LTX-Video
    torchrun --nproc_per_node=8 train.py --preset taichi256 --data data/latents
    python train.py --benchmark 30                    # Flowception vs full sequence, padded vs packed: speed, FLOPs

One code path for 1..N processes. Every process builds the same global batch from the shared data
stream and trains on its own rows, in --grad-accum micro-batches; the losses are normalised by the
counts of the GLOBAL batch, so N processes x k micro-batches compute exactly the loss (and gradient)
of one process on the whole batch. DistributedDataParallel averages gradients over processes. With
--pack F each micro-batch's videos are packed into rows of F frames (fc.pack_batch): same losses.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import glob
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import flowception as fc
import toy_data

rank, world_size = 0, 1  # set by setup_distributed


def print0(*args, **kwargs):
    if rank == 0:
        print(*args, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Flowception (arXiv 2512.11438).")
    p.add_argument("--preset", choices=fc.PRESETS, default="toy", help="model + data + schedule preset")
    p.add_argument("--out", default=None, help="output folder (default out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--data", help="toy: the 3-pixel videos; synthetic: random full-length clips of the preset's "
                   "shape (speed and memory measurements, nothing to learn); else a folder of latent files")
    p.add_argument("--encode-videos", metavar="DIR", help="instead of training: encode the videos (*.mp4) of DIR "
                   "into latent files in --out with the LTX VAE (--vae), then exit")
    p.add_argument("--benchmark", type=int, metavar="STEPS", help="instead of training: time STEPS steps each of "
                   "Flowception and the full-sequence baseline, alternating; print throughput, FLOPs, MFU and ratios")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device for MFU (default: 989 on an H100/H200)")
    p.add_argument("--vae", default="Lightricks/LTX-Video", help="hub id or local folder of the LTX-Video VAE (diffusers)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, help="videos per optimizer step, over all processes")
    p.add_argument("--grad-accum", type=int, help="micro-batches per process and step (gradient accumulation)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (activation checkpointing); taichi256 default")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard parameters, gradients, optimizer state and EMA per block (FSDP2); taichi256 default")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay to lr / 10")
    p.add_argument("--seed", type=int, help="seed of the model init and the data stream")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the weights used for sampling")
    p.add_argument("--rate-weight", type=float, help="weight of the insertion (Poisson) loss")
    p.add_argument("--n-start", type=int, help="frames present at t_g = 0")
    p.add_argument("--kappa", choices=fc.KAPPAS, help="insertion scheduler")
    p.add_argument("--tau-density", choices=("uniform", "logit_normal", "late"), help="law of the global time tau_g on [0, 2]")
    p.add_argument("--hazard-weight", action="store_true", default=None, help="weight the rate loss by dkappa/(1-kappa) (Eq. 19)")
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--depth", type=int, help="number of DiT blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--no-count-embedding", dest="count_embedding", action="store_false", default=None,
                   help="the paper's DiT: no embedding of the frame count (see Config.count_embedding)")
    p.add_argument("--tasks", help="training task mix, e.g. 'uncond:2,i2v:1,interp:1' (tasks: "
                   + ", ".join(fc.TASKS) + ")")
    p.add_argument("--cond-dropout", type=float, help="probability that a video's context is dropped (for guidance)")
    p.add_argument("--full-sequence", action="store_true", default=None,
                   help="train the full-sequence flow matching baseline: every frame a start frame, no insertions")
    p.add_argument("--gamma", type=float, help="per-frame time t = u^gamma (Appendix E); sample with the same gamma")
    p.add_argument("--window", type=int, help="local attention over +-window frames (0: full)")
    p.add_argument("--pack", type=int, metavar="FRAMES", help="pack videos into rows of FRAMES frames, several per row "
                   "(0: pad every video to the batch's longest)")
    p.add_argument("--attention", choices=("sdpa", "flex"), help="sdpa: dense mask; flex: FlexAttention BlockMask (CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile every block")
    p.add_argument("--log-every", type=int, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    return p.parse_args(argv)


def make_config(args, base=None):
    """The preset (or a resumed run's config) with every given override applied, validated by Config."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(fc.Config)
                 if getattr(args, f.name, None) is not None}
    base = base or fc.PRESETS[args.preset]
    shape = ("channels", "height", "width", "patch", "dim", "depth", "heads", "mlp_ratio", "count_embedding")
    changed = [k for k in shape if k in overrides and overrides[k] != getattr(base, k)]
    if args.resume and changed:
        raise ValueError(f"cannot resume with a different model shape: {', '.join(changed)}")
    return dataclasses.replace(base, **overrides)


def setup_distributed(device, fsdp=False):
    """Rank, world size and device from torchrun's environment; a process group when there are several
    processes, or for FSDP2 (which needs one even alone)."""
    global rank, world_size
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():  # long timeout: rank 0 may be writing a 26 GB checkpoint
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    elif fsdp and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def shard(model, device):
    """FSDP2: every block, then the rest, sharded over the processes; on CUDA, compute in bf16 and reduce
    gradients in fp32 (the sharded parameters, the optimizer state and the EMA stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: autocast already computes in bf16, and a cast inside a checkpointed
    # block would change the recomputed tensors' dtype (CheckpointError under --checkpointing)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on the CPU, whatever the sharding


def save_checkpoint(path, model, ema, opt, step, cfg, preset, data_rng):
    """One flat dict of full (gathered) tensors and plain data, written atomically by rank 0.

    Gathered rather than sharded: one file that loads with torch.load(weights_only=True) anywhere, and
    resumes on any number of processes with or without FSDP2; for taichi256 it is 26 GB, written once
    per ckpt_every steps. Every process must call this (the gathering is collective).
    """
    ckpt = {"model": get_model_state_dict(model, options=FULL), "ema": get_model_state_dict(ema, options=FULL),
            "optimizer": get_optimizer_state_dict(model, opt, options=FULL), "step": step,
            "config": dataclasses.asdict(cfg), "preset": preset, "data_rng": data_rng.get_state()}
    if rank == 0:
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)


def encode_videos(src, out, vae_name, device, max_frames):
    """Every *.mp4 of src -> one latent file per clip in out, cut to the preset's max_frames latent frames
    (1 + 8 (max_frames - 1) video frames); a bad video is reported and skipped."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--encode-videos runs in one process (not under torchrun)")
    videos = sorted(glob.glob(os.path.join(src, "**", "*.mp4"), recursive=True))
    if not videos:
        raise ValueError(f"no videos (*.mp4) in {src}")
    vae = fc.load_vae(vae_name, device)
    os.makedirs(out, exist_ok=True)
    failed = 0
    for path in tqdm(videos, desc="encoding"):
        try:
            frames, fps = fc.read_video(path)
            if frames.shape[0] < 1 + fc.LTX_TEMPORAL:
                raise ValueError(f"video {path} has {frames.shape[0]} frames, fewer than {1 + fc.LTX_TEMPORAL}")
            frames = frames[: 1 + fc.LTX_TEMPORAL * (max_frames - 1)]
            z = fc.encode_video(vae, frames.float() / 127.5 - 1)
        except (ValueError, RuntimeError) as e:  # RuntimeError: e.g. out of memory on a huge frame size
            failed += 1
            tqdm.write(f"skipped: {e}" if isinstance(e, ValueError) else f"skipped: {path} ({type(e).__name__}: {str(e)[:80]})")
            continue
        name = os.path.splitext(os.path.relpath(path, src))[0].replace(os.sep, "__")
        fc.save_latents(os.path.join(out, name + ".pt"), z, fps)
    print(f"encoded {len(videos) - failed} of {len(videos)} videos into {out}" + (f" ({failed} skipped)" if failed else ""))


def global_batch(cfg, kappa, data_rng, dataset=None):
    """The step's whole batch, built on the CPU from the shared data stream (the same on every process)."""
    # 1. clean videos, padded, with their lengths
    if cfg.data == "toy":
        x_1, lengths = toy_data.sample_toy_videos(cfg.batch_size, data_rng)
        x_1 = x_1[:, : int(lengths.max())]
    elif dataset is not None:  # latent clips, drawn with replacement
        x_1, lengths = dataset.batch(torch.randint(len(dataset), (cfg.batch_size,), generator=data_rng))
    else:  # synthetic: the longest clips the preset allows
        lengths = torch.full((cfg.batch_size,), cfg.max_frames)
        x_1 = torch.randn(cfg.batch_size, cfg.max_frames, cfg.channels, cfg.height, cfg.width, generator=data_rng)
    # 2. each video's task (its context frames) and where every frame stands in extended time
    context, passive = fc.sample_context(lengths, cfg.tasks, data_rng)
    state = fc.sample_training_state(lengths, kappa, cfg.n_start, generator=data_rng, tau_density=cfg.tau_density,
                                     context=context, passive=passive, full_sequence=cfg.full_sequence, gamma=cfg.gamma)
    # 3. what the model sees: visible frames noised to their own times, stripped and padded
    return fc.make_training_batch(x_1, state, generator=data_rng, cond_dropout=cfg.cond_dropout)


def my_micro_batches(batch, cfg):
    """This process's videos of the global batch in grad_accum micro-batches, each trimmed to its longest
    video, or packed into rows of cfg.pack frames."""
    videos = torch.arange(batch.mask.shape[0]).chunk(world_size)[rank]
    out = []
    for r in videos.chunk(cfg.grad_accum):
        F = max(int(batch.mask[r].sum(1).max()), 1)
        mb = fc.TrainingBatch(**{k: v[r, :F] for k, v in vars(batch).items()})
        out.append(fc.pack_batch(mb, cfg.pack) if cfg.pack else mb)
    return out


def forward_backward(net, model, batch, cfg, kappa, device, autocast):
    """Gradients of the global batch's loss from this process's micro-batches -> the global losses (2,)."""
    n_active, n_insert = batch.active.sum().clamp_min(1), batch.can_insert.sum().clamp_min(1)  # global counts
    losses = torch.zeros(2, dtype=torch.float64)
    micro = my_micro_batches(batch, cfg)
    for i, mb in enumerate(micro):
        mb = fc.TrainingBatch(**{k: v.to(device) for k, v in vars(mb).items()})
        last = i == len(micro) - 1  # gradients are reduced once, after the last micro-batch
        if cfg.fsdp:
            model.set_requires_gradient_sync(last)
        with autocast, (net.no_sync() if net is not model and not last else contextlib.nullcontext()):
            v, log_lam = net(mb.x_t, mb.t, mb.mask, mb.cond, mb.video, mb.position)
            # this micro-batch's share of the global means (Eqs. 12, 20)
            loss_v = fc.velocity_loss(v, mb, count=n_active)
            loss_r = fc.rate_loss(log_lam, mb, kappa, cfg.hazard_weight, count=n_insert)
            loss = loss_v + (0.0 if cfg.full_sequence else cfg.rate_weight) * loss_r  # baseline: nothing to insert
            (loss * world_size).backward()  # DDP averages over processes; the counts are already global
        losses += torch.stack([loss_v.detach(), loss_r.detach()]).double().cpu()
    if world_size > 1:  # the global batch's losses, for the log (on the device: nccl has no CPU tensors)
        on_device = losses.to(device)
        dist.all_reduce(on_device)
        losses = on_device.cpu()
    return losses


def expected_flop_ratio(cfg, kappa, dataset=None, draws=20_000):
    """E[training FLOPs of a video] under the configured law (tasks, tau_g density, gamma), Flowception over
    the full-sequence baseline, before any padding: Monte Carlo over `draws` training states."""
    g = torch.Generator().manual_seed(1)
    if cfg.data == "toy":
        lengths = toy_data.sample_toy_videos(draws, g)[1]
    elif dataset is not None:
        lengths = torch.tensor([c.shape[0] for c in dataset.clips])[torch.randint(len(dataset), (draws,), generator=g)]
    else:
        lengths = torch.full((draws,), cfg.max_frames)
    context, passive = fc.sample_context(lengths, cfg.tasks, g)
    visible = fc.sample_training_state(lengths, kappa, cfg.n_start, generator=g, tau_density=cfg.tau_density,
                                       context=context, passive=passive, gamma=cfg.gamma).visible.sum(dim=1)
    flops = lambda frames: sum(n * fc.forward_flops(cfg, f) for f, n in enumerate(torch.bincount(frames).tolist()))  # noqa: E731
    return flops(visible) / flops(lengths)


def benchmark(args, cfg, net, model, opt, kappa, data_rng, dataset, device, autocast):
    """Time training steps of Flowception and of the full-sequence baseline, each padded and packed, on the
    same data geometry: the four alternate step by step after 2 warm-up steps each, padded and packed
    on the same batches. Print throughput, FLOPs, MFU and the ratios.

    FLOPs are model FLOPs (3x forward_flops, without the recomputation of activation checkpointing):
    'useful' over the real frames of each video, 'executed' over the rows the model ran on, as dense
    attention would (FlexAttention skips the blocks between videos: it executes fewer).
    """
    rows = cfg.pack or cfg.max_frames
    modes = {f"{name}, {layout}": dataclasses.replace(cfg, full_sequence=full, pack=pack)
             for name, full in (("Flowception", False), ("full sequence", True))
             for layout, pack in (("padded", 0), ("packed", rows))}
    L1 = (cfg.height // cfg.patch[0]) * (cfg.width // cfg.patch[1]) + 1
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and any(g in torch.cuda.get_device_name(device) for g in ("H100", "H200")):
        peak = 989.0  # dense bf16, SXM
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stats = {name: dict(seconds=0.0, videos=0, real=0, padded=0, flops=0.0, executed=0.0, memory=0.0) for name in modes}
    for step in tqdm(range(args.benchmark + 2), desc="benchmark", disable=rank != 0):
        for method in ("Flowception", "full sequence"):
            batch = global_batch(modes[method + ", padded"], kappa, data_rng, dataset)  # the same for both layouts
            for name in (method + ", padded", method + ", packed"):
                c = modes[name]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                forward_backward(net, model, batch, c, kappa, device, autocast)
                opt.step()
                sync()
                if step < 2:
                    continue
                st, frames = stats[name], batch.mask.sum(dim=1)
                st["seconds"] += time.perf_counter() - t0
                st["videos"] += len(frames)
                st["real"] += int(frames.sum()) * L1
                st["flops"] += 3 * sum(fc.forward_flops(c, int(f)) for f in frames)
                for mb in my_micro_batches(batch, c):  # this process's rows, times the processes
                    st["padded"] += mb.mask.numel() * L1 * world_size
                    st["executed"] += 3 * mb.mask.shape[0] * fc.forward_flops(c, mb.mask.shape[1]) * world_size
                st["memory"] = max(st["memory"], torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0)
    print0(f"{args.preset}, batch {cfg.batch_size}, packed rows of {rows} frames, {args.benchmark} timed steps each, "
           f"{world_size} x {device.type}{f', peak {peak:.0f} TFLOP/s' if peak else ''}, attention "
           f"{cfg.attention}")
    speed = {}
    for name, st in stats.items():
        achieved = st["flops"] / st["seconds"] / 1e12
        speed[name] = st["videos"] / st["seconds"]
        mfu = f" | MFU {achieved / (peak * world_size):.1%}" if peak else ""
        memory = f" | peak memory {st['memory']:.1f} GiB" if device.type == "cuda" else ""
        print0(f"{name:>22}: {speed[name]:8.1f} videos/s | {st['real'] / st['seconds']:10.0f} tokens/s | "
               f"{st['flops'] / st['videos'] / 1e12:.4g} TFLOP/video useful, {st['executed'] / st['videos'] / 1e12:.4g} executed | "
               f"{achieved:.3g} TFLOP/s{mfu} | padding efficiency {st['real'] / st['padded']:.1%}{memory}")
    per_video = lambda name, key: stats[name][key] / stats[name]["videos"]  # noqa: E731
    for method in ("Flowception", "full sequence"):
        print0(f"{method}: packed / padded speed {speed[method + ', packed'] / speed[method + ', padded']:.2f}x")
    for layout in ("padded", "packed"):
        a, b = f"Flowception, {layout}", f"full sequence, {layout}"
        print0(f"Flowception / full sequence per video, {layout}: FLOPs {per_video(a, 'flops') / per_video(b, 'flops'):.3f} "
               f"useful, {per_video(a, 'executed') / per_video(b, 'executed'):.3f} executed; "
               f"wall-clock {per_video(a, 'seconds') / per_video(b, 'seconds'):.3f}")
    print0(f"expected under the training law (20,000 draws, no padding): FLOPs {expected_flop_ratio(cfg, kappa, dataset):.3f}")


def train(args):
    out = args.out or os.path.join("out", args.preset)
    ckpt_path = os.path.join(out, "ckpt.pt")
    ckpt = fc.load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None and ckpt["preset"] != args.preset:
        raise ValueError(f"checkpoint {ckpt_path} is of preset {ckpt['preset']!r}, not {args.preset!r}")
    if ckpt is not None and not {"optimizer", "data_rng"} <= set(ckpt):
        raise ValueError(f"checkpoint {ckpt_path} has no optimizer or data state to resume from")
    cfg = make_config(args, base=fc.Config.from_dict(ckpt["config"]) if ckpt else None)
    device = setup_distributed(args.device, cfg.fsdp)
    if cfg.attention == "flex" and device.type != "cuda":
        raise ValueError("--attention flex needs CUDA: FlexAttention has no backward on the CPU in this torch")
    if cfg.data == "latents":
        raise ValueError(f"preset {args.preset!r} trains on LTX latents: pass --data DIR (a folder of latent files, "
                         "see `--encode-videos`), or --data synthetic to measure speed and memory")
    dataset = fc.LatentFolder(cfg.data, cfg) if cfg.data not in ("toy", "synthetic") else None
    if dataset is not None:
        print0(f"{len(dataset)} latent clips in {cfg.data}")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum = {world_size * cfg.grad_accum}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    data_rng = torch.Generator().manual_seed(cfg.seed)  # the same global batches on every process
    with torch.device(device):  # initialise in place: seconds instead of minutes for taichi256 on a GPU
        model = fc.build_model(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg.compile:  # per block, as torchtitan does: the same code for every block, compiled once
        for block in model.blocks:
            block.compile()
    if cfg.fsdp:
        shard(model, device)
        shard(ema, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    kappa = cfg.make_kappa()
    start = 0
    if ckpt is not None:
        load = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=load)
        set_model_state_dict(ema, ckpt["ema"], options=load)
        set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=load)
        data_rng.set_state(ckpt["data_rng"])
        start = ckpt["step"]
        print0(f"resumed from {ckpt_path} at step {start}")
    net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 and not cfg.fsdp else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if args.benchmark:  # nothing is written
        return benchmark(args, cfg, net, model, opt, kappa, data_rng, dataset, device, autocast)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "log.jsonl")  # one JSON line per step: step, velocity, rate, lr
    if rank == 0 and os.path.exists(log_path):  # a fresh run starts a new log; a resumed one drops later rows
        rows = [line for line in open(log_path) if ckpt is not None and json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(rows)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters, {cfg.steps} steps of {cfg.batch_size} videos "
           f"on {world_size} x {device.type} ({cfg.grad_accum} micro-batches each; "
           f"{'FSDP2' if cfg.fsdp else 'DDP' if world_size > 1 else 'one process'}"
           f"{', activation checkpointing' if cfg.checkpointing else ''})")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, dynamic_ncols=True)
    t_log, sums, n_logged = time.time(), torch.zeros(2, dtype=torch.float64), 0
    for step in bar:
        batch = global_batch(cfg, kappa, data_rng, dataset)
        opt.zero_grad(set_to_none=True)
        losses = forward_backward(net, model, batch, cfg, kappa, device, autocast)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # warmed up: early EMA is not the init
        sums += losses
        n_logged, done = n_logged + 1, step + 1
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": done, "velocity": losses[0].item(), "rate": losses[1].item(), "lr": lr}) + "\n")
        if done % cfg.log_every == 0 or done == cfg.steps:
            speed = n_logged / (time.time() - t_log)
            memory = f" | peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
            if rank == 0:
                bar.write(f"step {done:6d} | velocity {sums[0] / n_logged:.4f} | rate {sums[1] / n_logged:.4f} | "
                          f"lr {lr:.2e} | {speed:.2f} steps/s, {speed * cfg.batch_size:.1f} videos/s{memory}")
            t_log, sums, n_logged = time.time(), torch.zeros(2, dtype=torch.float64), 0
        if cfg.ckpt_every and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_path, model, ema, opt, done, cfg, args.preset, data_rng)
    print0(f"saved {ckpt_path}; sample it with: python sample.py --ckpt {ckpt_path}" if cfg.ckpt_every
           else "no checkpoint written (ckpt_every = 0)")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.encode_videos:
            return encode_videos(args.encode_videos, args.out or "data/latents", args.vae, args.device,
                                 fc.PRESETS[args.preset].max_frames)
        train(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
