"""Train Flowception: `python train.py` (the toy), `torchrun --nproc_per_node=8 train.py --preset taichi256
--data DIR`, `python train.py --encode-videos videos/ --preset taichi256 --out DIR` (videos -> LTX latents).
One code path for 1..N processes: each builds the same global batch and trains on its share, in --grad-accum
micro-batches packed into rows of --pack frames; the losses are normalised by the GLOBAL batch's counts, so N
processes x k micro-batches compute exactly one process's loss and gradient."""
import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dcp
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import flowception as fc
import toy_data

rank, world_size = 0, 1  # set by setup_distributed
saved_step = None  # the step of <out>/ckpt.pt, resumed or written by this run


def print0(*args, **kwargs):
    if rank == 0:
        print(*args, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Flowception (arXiv 2512.11438).")
    arg, flag = p.add_argument, argparse.BooleanOptionalAction
    arg("--preset", choices=fc.PRESETS, default="toy", help="model, data and schedule")
    arg("--out", help="run folder (default out/<preset>)")
    arg("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    arg("--device", help="cpu, cuda, cuda:1... (default: cuda when there is a GPU)")
    arg("--timeout", type=float, default=10, help="minutes to wait for a stalled process (a 26 GB save fits)")
    arg("--data", help="toy; synthetic (random clips: speed, memory); or a folder of latent files")
    arg("--encode-videos", metavar="SRC", help="instead: encode into latent files in --out the videos of a "
        "folder, or of an LTX trainers' dataset file (.csv, .json, .jsonl: media_path, caption), captioned")
    arg("--vae", default="Lightricks/LTX-Video-0.9.5", help="hub id or folder of the LTX VAE (diffusers)")
    arg("--text-encoder", default=fc.LTX_T5, help="hub id or folder of the captions' T5 encoder")
    arg("--steps", type=int, help="optimizer steps")
    arg("--batch-size", type=int, help="videos per optimizer step, over all processes")
    arg("--grad-accum", type=int, help="micro-batches per process and step")
    arg("--pack", type=int, metavar="FRAMES", help="rows of FRAMES frames, several videos each (0: pad)")
    arg("--checkpointing", action=flag, help="activation checkpointing: recompute each block in backward")
    arg("--fsdp", action=flag, help="shard parameters, gradients, optimizer state and EMA per block (FSDP2)")
    arg("--speed", help=f"GPU speed paths, comma-separated, unmeasured: {','.join(fc.SPEEDS)} (gpu_speed.sh)")
    arg("--peak-tflops", type=float, help="the GPU's dense bf16 TFLOP/s, for the log's MFU (default: PEAK's)")
    arg("--lr", type=float, help="peak learning rate (AdamW)")
    arg("--warmup", type=int, help="linear warm-up steps, then cosine decay to lr / 10")
    arg("--seed", type=int, help="seed of the init and of the data stream")
    arg("--ema-decay", type=float, help="EMA decay of the weights that sample.py uses")
    arg("--dim", type=int, help="model width")
    arg("--depth", type=int, help="DiT blocks")
    arg("--heads", type=int, help="attention heads")
    arg("--prompt-dim", type=int, help="width of the prompts' embeddings (0: no prompt)")
    arg("--rope", choices=fc.ROPES, help="RoPE over (frame, row, column): axial, or videorope (the paper's)")
    arg("--window", type=int, help="attention within +-window frames (0: the whole video)")
    arg("--count-embedding", action=flag, help="embed the frame count (ours; the paper has none)")
    arg("--kappa", choices=fc.KAPPAS, help="insertion scheduler")
    arg("--n-start", type=int, help="frames present at tau_g = 0")
    arg("--tau-density", choices=fc.TAU_DENSITIES, help="law of the global time tau_g on [0, 2)")
    arg("--rate-weight", type=float, help="weight of the insertion (Poisson) loss")
    arg("--tasks", help=f"task mix, e.g. 'uncond:2,i2v:1' (tasks: {', '.join(fc.TASKS)})")
    arg("--cond-dropout", type=float, help="P(a video's context and prompt are dropped), for guidance")
    arg("--paradigm", choices=fc.PARADIGMS, help="Flowception, or a baseline (t ~ sigmoid(N(0, 1))): "
        "full_sequence, ar (bidirectional), ar_causal (causal by frame, a KV cache in sampling)")
    arg("--gamma", type=float, help="per-frame time t = clip(tau, 0, 1)^gamma (Appendix E); sample with it")
    arg("--log-every", type=int, help="steps between log lines")
    arg("--ckpt-every", type=int, help="steps between checkpoints (0: none)")
    return p.parse_args(argv)


def make_config(args, base=None):
    """The preset (or a resumed run's config) with every flag given applied; fc.Config checks the values."""
    base = base or fc.PRESETS[args.preset]
    given = {k: v for k in vars(base) if (v := getattr(args, k, None)) is not None}  # the flags given
    shape = ("channels", "height", "width", "patch", "dim", "depth", "heads", "mlp_ratio", "count_embedding",
             "prompt_dim")
    changed = [k for k in (*shape, "seed") if k in given and given[k] != getattr(base, k)]
    if args.resume and changed:  # the seed: a resumed run's weights and data stream are the checkpoint's
        raise ValueError(f"cannot resume with a different model shape or seed: {', '.join(changed)}")
    cfg = dataclasses.replace(base, **given)
    fc.parse_tasks(cfg.tasks)
    return cfg


def setup_distributed(device, fsdp=False, timeout=10):
    """This process's device (LOCAL_RANK's GPU), and a process group for several processes or FSDP2."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout))
    elif fsdp and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def shard(model, device):
    """FSDP2: every block, then the rest, sharded; on CUDA bf16 compute, fp32 reduction, fp32 master state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: autocast already computes in bf16, and a cast inside a checkpointed block
    # would change the recomputed tensors' dtype (CheckpointError under --checkpointing)
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mp = MixedPrecisionPolicy(**bf16) if device.type == "cuda" else MixedPrecisionPolicy()
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
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one kernel for all


PEAK = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "B200": 2250}  # bf16 TFLOP/s, datasheets


FULL = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on the CPU, however sharded


def save_checkpoint(path, model, ema, opt, step, cfg, preset, data_rng, data_info):
    """Full (gathered) tensors and plain data in one file by rank 0 (all call it): it loads with weights_only
    anywhere and resumes on any number of processes. data_info: the latents' fps and VAE."""
    global saved_step
    ckpt = {name: dcp.get_model_state_dict(m, options=FULL) for name, m in (("model", model), ("ema", ema))}
    ckpt |= {"optimizer": dcp.get_optimizer_state_dict(model, opt, options=FULL), "step": step,
             "preset": preset, "config": dataclasses.asdict(cfg), "data_rng": data_rng.get_state(),
             "data": data_info}
    if rank == 0:  # on disk before the rename; a failed write leaves the last checkpoint as it was
        fc.write_atomically(path, lambda f: torch.save(ckpt, f))
    saved_step = step


def claim_folder(out, resume):
    """Rank 0: a lock refuses a second live run; a new run never starts where a checkpoint is."""
    lock = fc.hold_lock(out, ".lock")
    ckpt_path = os.path.join(out, "ckpt.pt")
    if not resume and os.path.exists(ckpt_path):
        raise ValueError(f"{out} holds a run: continue it with --resume, or use another --out (or delete it)")
    if not resume and os.path.exists(os.path.join(out, "log.jsonl")):
        print(f"{out} has a log but no checkpoint (the run stopped before its first save): starting over")
    if os.path.exists(ckpt_path + ".tmp"):
        os.remove(ckpt_path + ".tmp")
    return lock


def log_rows(path, last):
    """The rows of a run's log.jsonl up to step `last` (a resumed run keeps them); a torn line is dropped."""
    rows = []
    for line in open(path, errors="replace") if os.path.exists(path) else []:  # a bad byte: a bad line
        try:
            rows += [row] if (row := json.loads(line))["step"] <= last else []
        except (ValueError, KeyError, TypeError):
            pass
    return rows


def read_dataset(path):
    """An LTX trainers' dataset file: CSV, JSON (a list) or JSONL rows, each a caption and a media_path
    (LTX-2's trainer: or video), relative to the file's folder -> {video path: caption}."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f)) if path.endswith(".csv") else \
                [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
        return {os.path.join(os.path.dirname(path), r.get("media_path") or r["video"]): r.get("caption") or ""
                for r in rows}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, not rows, no media_path
        raise ValueError(f"{path} is not a dataset file of rows with a media_path and a caption "
                         f"({fc.why(e)})") from None


def encode_videos(src, out, device, cfg, vae_name, text_encoder_name):
    """Every video of a folder, or of a dataset file with its caption -> out/<its path>.pt: its first
    1 + 8 (max_frames - 1) frames at the preset's size, and its caption's T5 embeddings (fc.encode_text)."""
    if world_size > 1 or cfg.data != "latents":
        raise ValueError("--encode-videos runs in one process (not under torchrun), for a latent preset ("
                         + ", ".join(name for name, c in fc.PRESETS.items() if c.data == "latents") + ")")
    captions = read_dataset(src) if os.path.isfile(src) else {}
    root = os.path.dirname(src) if os.path.isfile(src) else src
    videos = sorted(captions or (os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs
                                 if os.path.splitext(f)[1].lower() in fc.VIDEO_FILES))
    if not videos:
        raise ValueError(f"no videos ({' '.join(fc.VIDEO_FILES)}) in {src}")
    vae = fc.load_vae(vae_name, device)
    identity = fc.vae_identity(vae, vae_name)
    text = fc.load_text_encoder(text_encoder_name, device) if any(captions.values()) else None
    text_identity = fc.identity("text_encoder", text[1], text_encoder_name) if text else None
    size = (cfg.height * fc.LTX_SPATIAL, cfg.width * fc.LTX_SPATIAL)
    failed = 0
    for path in tqdm(videos, desc="encoding"):
        try:
            frames, fps = fc.read_video(path, size, max_frames=1 + fc.LTX_TEMPORAL * (cfg.max_frames - 1))
            if len(frames) < 1 + fc.LTX_TEMPORAL:
                raise ValueError(f"video {path} has {len(frames)} frames, fewer than {1 + fc.LTX_TEMPORAL}")
            z = fc.encode_video(vae, frames.float() / 127.5 - 1)
        except (ValueError, RuntimeError) as e:  # RuntimeError: e.g. out of memory on a huge frame
            failed += 1
            tqdm.write(f"skipped: {e}" if isinstance(e, ValueError) else f"skipped: {path} ({fc.why(e)})")
            continue
        prompt = fc.encode_text(text, [captions[path]])[0] if text else None
        fc.save_latents(os.path.join(out, os.path.relpath(path, root) + ".pt"), z, fps, identity, prompt,
                        text_identity)  # a.mp4.pt
    if failed == len(videos):
        raise ValueError(f"none of the {failed} videos in {src} could be encoded (reasons above)")
    print(f"encoded {len(videos) - failed} of {len(videos)} videos into {out} ({failed} skipped), "
          f"{size[0]}x{size[1]} px, with {identity['vae']} ({identity['vae_fingerprint']})"
          + (f"; captions with {text_identity['text_encoder']}" if text else ""))


def global_batch(cfg, kappa, data_rng, clips=None):
    """The step's whole batch, built on the CPU from the shared data stream (the same on every process)."""
    # 1. clean videos, padded, and their lengths
    B, F = cfg.batch_size, cfg.max_frames
    prompts = [torch.zeros(0, cfg.prompt_dim)] * B  # the empty prompt, (P, E) each
    if cfg.data == "toy":
        x_1, lengths = toy_data.sample_toy_videos(B, data_rng)
        if cfg.prompt_dim:  # text-to-video: a caption of each video (toy_data.caption)
            captions = [toy_data.caption(v[:n], data_rng) for v, n in zip(x_1, lengths)]
            prompts = [toy_data.embed_caption(c) for c in captions]
    elif clips:  # latent clips and their prompts, drawn with replacement, zero-padded
        chosen = [clips[i] for i in torch.randint(len(clips), (B,), generator=data_rng).tolist()]
        x_1, lengths = pad_sequence([z for z, _ in chosen], True), torch.tensor([len(z) for z, _ in chosen])
        prompts = [p.float() for _, p in chosen] if cfg.prompt_dim else prompts
    else:  # synthetic: the longest clips the preset allows, prompts of 77 tokens (the official configs')
        x_1 = torch.randn(B, F, cfg.channels, cfg.height, cfg.width, generator=data_rng)
        lengths = torch.full((B,), F)
        prompts = list(torch.randn(B, 77, cfg.prompt_dim, generator=data_rng)) if cfg.prompt_dim else prompts
    prompt, prompt_mask = fc.pad_prompts(prompts)
    # 2. each video's task (its context frames) and where each of its frames stands in extended time
    context, passive = fc.sample_context(lengths, cfg.tasks, data_rng)
    if cfg.paradigm.startswith("ar"):  # Appendix C.1: j frames given, j uniform on 0..n-1, then frame j
        lengths = 1 + (torch.rand(B, generator=data_rng) * lengths).long()  # the clip cut after it
        context = passive = torch.arange(int(lengths.max())) < lengths[:, None] - 1
    x_1 = x_1[:, : int(lengths.max())]  # to the longest video (the toy's come padded to 30 frames)
    if cfg.paradigm == "flowception":
        state = fc.sample_training_state(lengths, kappa, cfg.n_start, None, data_rng, cfg.tau_density,
                                         context, passive, cfg.gamma)
    else:  # the baselines: one flow time for every frame that is not given
        state = fc.baseline_state(lengths, context, passive, data_rng)
    # 3. what the model sees: the visible frames, noised to their own times, stripped and padded
    return fc.make_training_batch(x_1, state, data_rng, cfg.cond_dropout, prompt, prompt_mask)


def pack_batch(batch, capacity):
    """A padded TrainingBatch -> the same frames in rows of `capacity` frames (at least the longest video),
    first-fit decreasing; `video` keeps attention within a video, and the losses, sums over frames, hold."""
    lengths = batch.mask.sum(dim=1).tolist()
    capacity, rows = max(capacity, max(lengths)), []  # rows: the videos each holds
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):  # the longest first, into the first row
        row = next((row for row in rows if sum(lengths[i] for i in row) + lengths[b] <= capacity), None)
        if row is None:
            rows.append(row := [])
        row.append(b)
    # packed frame [r, f] is frame src_f[r, f] of video src_b[r, f]; -1: padding
    src_b = torch.full((len(rows), capacity), -1, dtype=torch.long, device=batch.mask.device)
    src_f = torch.zeros_like(src_b)
    # and each row's prompt tokens: its videos' real ones, video by video, labelled with their video as src_b
    P = max(int((batch.prompt_video[row] >= 0).sum()) for row in rows)
    prompt = batch.prompt.new_zeros(len(rows), P, batch.prompt.shape[2])
    prompt_video = torch.full((len(rows), P), -1, dtype=torch.long, device=src_b.device)
    for r, row in enumerate(rows):
        n = sum(lengths[b] for b in row)
        src_b[r, :n] = torch.tensor([b for b in row for _ in range(lengths[b])])
        src_f[r, :n] = torch.cat([torch.arange(lengths[b]) for b in row])
        real = batch.prompt_video[row] >= 0  # (videos, P')
        prompt[r, : int(real.sum())] = batch.prompt[row][real]
        prompt_video[r, : int(real.sum())] = torch.tensor(row)[:, None].expand_as(real)[real]

    def move(v):  # (B, F', ...) -> (R, capacity, ...): each packed frame's source; zero (False) on padding
        real = (src_b >= 0).view(*src_b.shape, *[1] * (v.dim() - 2))
        return torch.where(real, v[src_b, src_f], torch.zeros((), dtype=v.dtype, device=v.device))

    placed = ("video", "position", "prompt", "prompt_video")  # above
    moved = {k: move(v) for k, v in vars(batch).items() if k not in placed}
    return fc.TrainingBatch(**moved, video=src_b, position=src_f, prompt=prompt, prompt_video=prompt_video)


def forward_backward(net, model, batch, cfg, device, autocast):
    """This process's share of the global batch's loss and gradients, in grad_accum micro-batches."""
    n_active, n_insert = batch.active.sum().clamp_min(1), batch.can_insert.sum().clamp_min(1)  # global counts
    losses = torch.zeros(2, dtype=torch.float64)
    micro = torch.arange(len(batch.mask)).chunk(world_size)[rank].chunk(cfg.grad_accum)  # rows of the batch
    for i, rows in enumerate(micro):
        F = max(int(batch.mask[rows].sum(1).max()), 1)  # trimmed to its longest video
        mb = {k: v[rows] if k.startswith("prompt") else v[rows, :F] for k, v in vars(batch).items()}
        mb = fc.TrainingBatch(**mb)
        mb = pack_batch(mb, cfg.pack) if cfg.pack else mb
        mb = fc.TrainingBatch(**{k: v.to(device) for k, v in vars(mb).items()})
        last = i == len(micro) - 1  # gradients are reduced once, after the last micro-batch
        if cfg.fsdp:
            model.set_requires_gradient_sync(last)
        with autocast, (net.no_sync() if net is not model and not last else contextlib.nullcontext()):
            v, log_lam = net(mb.x_t, mb.t, mb.mask, mb.cond, mb.video, mb.position, None, mb.prompt,
                             mb.prompt_video)
            loss_v = fc.velocity_loss(v, mb, count=n_active)  # this micro-batch's share of the global means
            loss_r = fc.rate_loss(log_lam, mb, count=n_insert)
            loss = loss_v + (cfg.rate_weight if cfg.paradigm == "flowception" else 0) * loss_r
            (loss * world_size).backward()  # DDP averages over processes; the counts are already global
        losses += torch.stack([loss_v.detach(), loss_r.detach()]).double().cpu()
    if world_size > 1:  # the global batch's losses, for the log (on the device: nccl has no CPU tensors)
        on_device = losses.to(device)
        dist.all_reduce(on_device)
        losses = on_device.cpu()
    return losses


def train(args):
    """Check everything a user can get wrong, claim the run folder (claim_folder), then train."""
    out = args.out or os.path.join("out", args.preset)
    ckpt_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    ckpt, base = fc.load_checkpoint(ckpt_path) if args.resume else (None, None)
    if ckpt is not None and ckpt["preset"] != args.preset:
        raise ValueError(f"checkpoint {ckpt_path} is of preset {ckpt['preset']!r}, not {args.preset!r}")
    if ckpt is not None and not {"optimizer", "data_rng"} <= set(ckpt):
        raise ValueError(f"checkpoint {ckpt_path} holds no optimizer or data state to resume from")
    cfg = make_config(args, base)
    if cfg.data == "latents":
        raise ValueError(f"preset {args.preset!r} trains on LTX latents: pass --data DIR (a folder of latent "
                         "files, see --encode-videos), or --data synthetic to measure speed and memory")
    if cfg.data not in ("toy", "synthetic") and not os.path.relpath(out, cfg.data).startswith(".."):
        raise ValueError(f"--out {out} is inside --data {cfg.data}: ckpt.pt would be read as a latent file")
    device = fc.get_device(args.device)
    if args.device is None and device.type == "cpu" and args.preset == "taichi256":
        raise ValueError("taichi256 on a CPU takes hours per step: pass --device cpu if you mean it")
    if cfg.data == "toy" and (cfg.channels, cfg.height, cfg.width) != toy_data.FRAME_SHAPE:
        raise ValueError(f"--data toy has frames of {toy_data.FRAME_SHAPE}, preset {args.preset} wants "
                         f"{(cfg.channels, cfg.height, cfg.width)}")
    if cfg.data == "toy" and cfg.prompt_dim not in (0, toy_data.EMBED_DIM):
        raise ValueError(f"--data toy's captions have {toy_data.EMBED_DIM} dimensions, not {cfg.prompt_dim}")
    if cfg.data == "toy" and cfg.n_start > min(toy_data.LENGTHS):
        raise ValueError(f"--n-start {cfg.n_start}: the toy's shortest videos have {min(toy_data.LENGTHS)}")
    if ckpt is not None and ckpt["step"] >= cfg.steps:
        raise ValueError(f"{ckpt_path} is at step {ckpt['step']} already: give --steps above it to train on")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum = "
                         f"{world_size * cfg.grad_accum}")
    resumed = [ckpt] if ckpt else []  # run takes the only reference, to let the memory-mapped file go
    del ckpt
    with claim_folder(out, args.resume) if rank == 0 else contextlib.nullcontext():  # released as run ends
        run(args, cfg, resumed, device, out)


def run(args, cfg, resumed, device, out):
    """Build the model (and resume it), then train: the numbered steps of the loop."""
    global saved_step
    ckpt_path, ckpt = os.path.join(out, "ckpt.pt"), resumed.pop() if resumed else None
    clips, data_info = ([], {}) if cfg.data in ("toy", "synthetic") else fc.load_latent_folder(cfg.data, cfg)
    data_info |= {"text_encoder": "toy"} if cfg.data == "toy" and cfg.prompt_dim else {}  # embed_caption
    if rank == 0:  # the effective config, for the record
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"preset": args.preset, **dataclasses.asdict(cfg), "data_info": data_info}, f, indent=1)
    device = setup_distributed(device, cfg.fsdp, args.timeout)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    data_rng = torch.Generator().manual_seed(cfg.seed)  # the same global batches on every process
    with torch.device(device):  # initialise in place: seconds instead of minutes for taichi256 on a GPU
        model = fc.build_model(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg.fsdp:
        shard(model, device)
        shard(ema, device)
    for block in model.blocks if "compile" in cfg.speed else []:  # each block compiled once, in place
        block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                            fused="fused" in cfg.speed or None)  # None: torch's default (foreach)
    kappa = fc.KAPPAS[cfg.kappa]()
    start, log_path = 0, os.path.join(out, "log.jsonl")  # one JSON line per step
    if ckpt is not None:
        load = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_model_state_dict(model, ckpt["model"], options=load)
        dcp.set_model_state_dict(ema, ckpt["ema"], options=load)
        dcp.set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=load)
        for state in opt.state.values():  # on the CPU it would keep the file's memory-mapped tensors
            state.update({k: v.clone() for k, v in state.items() if torch.is_tensor(v)})
        data_rng.set_state(ckpt["data_rng"])
        start = saved_step = ckpt["step"]
        ckpt = None  # let go of the memory-mapped file, so that a later save frees it,
        gc.collect()  # and of the reference cycle that dcp leaves around its tensors
        print0(f"resumed from {ckpt_path} at step {start}")
    kept = "".join(json.dumps(r) + "\n" for r in (log_rows(log_path, start) if args.resume else []))
    net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 and not cfg.fsdp else model
    bf16 = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    parallel = "FSDP2" if cfg.fsdp else "DDP" if world_size > 1 else "one process"
    print0(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
           f"{cfg.steps} steps of {cfg.batch_size} videos on {world_size} x {device.type} ({parallel}, "
           f"{cfg.grad_accum} micro-batches{', activation checkpointing' if cfg.checkpointing else ''})")
    name = torch.cuda.get_device_name(device) if bf16 else ""
    peak = 1e12 * (args.peak_tflops or next((v for k, v in PEAK.items() if k in name), 0))
    if bf16 and not peak:
        print0(f"{name}: peak unknown, the log shows no MFU (--peak-tflops gives it)")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, dynamic_ncols=True)
    t_log, sums, n_logged, tokens, flops = time.time(), torch.zeros(3, dtype=torch.float64), 0, 0, 0
    L1 = (cfg.height // cfg.patch[0]) * (cfg.width // cfg.patch[1]) + 1  # tokens per frame, rate token too
    for step in bar:
        # 1. the global batch: clean videos, tasks, the training state, noised and stripped (Algorithm 2)
        batch = global_batch(cfg, kappa, data_rng, clips)
        frames, prompts = batch.mask.sum(dim=1).tolist(), (batch.prompt_video >= 0).sum(dim=1).tolist()
        tokens += L1 * sum(frames) + sum(prompts)  # the useful work: a video a row, before packing
        flops += 3 * sum(fc.forward_flops(cfg, n, None, p) for n, p in zip(frames, prompts))
        # 2. this process's share of the losses and gradients (Eqs. 11, 12)
        opt.zero_grad(set_to_none=True)
        losses = forward_backward(net, model, batch, cfg, device, autocast)
        # 3. clip; stop on a NaN or inf before it reaches the weights; schedule, step, EMA (warmed up)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        losses = torch.cat([losses, norm.double().cpu()[None]])
        for name, value in zip(("velocity loss", "rate loss", "gradient norm"), losses.tolist()):
            if not math.isfinite(value):
                raise ValueError(f"step {step + 1}: the {name} is {value}; stopped before the weights "
                                 "changed (the last checkpoint, if any, is untouched)")
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        # 4. log and checkpoint
        sums, n_logged, done = sums + losses, n_logged + 1, step + 1
        if rank == 0:  # the first row of a run rewrites the log (atomically), keeping a resumed run's rows
            row = dict(zip(("step", "velocity", "rate", "grad_norm", "lr"), [done, *losses.tolist(), lr]))
            if done == start + 1:  # once a step is done: a run that dies before leaves the log as it was
                fc.write_atomically(log_path, lambda f: f.write(kept.encode()))
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            seconds, (velocity, rate, grad_norm) = time.time() - t_log, (sums / n_logged).tolist()
            memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if bf16 else ""
            mfu = f" | MFU {flops / seconds / world_size / peak:.1%}" if peak else ""  # per GPU
            bar.write(f"step {done:6d} | velocity {velocity:.4f} | rate {rate:.4f} | grad norm "
                      f"{grad_norm:.3f} | lr {lr:.2e} | {n_logged * cfg.batch_size / seconds:.1f} videos/s | "
                      f"{tokens / seconds:,.0f} tokens/s{mfu}{memory}")
            t_log, sums, n_logged, tokens, flops = time.time(), torch.zeros(3, dtype=torch.float64), 0, 0, 0
        if cfg.ckpt_every and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_path, model, ema, opt, done, cfg, args.preset, data_rng, data_info)
    print0(f"saved {ckpt_path}; sample it with: python sample.py --ckpt {ckpt_path}" if cfg.ckpt_every
           else "no checkpoint written (ckpt_every = 0)")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    global rank, world_size
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    args = parse_args(argv)
    try:
        if args.encode_videos:
            return encode_videos(args.encode_videos, args.out or "data/latents", fc.get_device(args.device),
                                 fc.PRESETS[args.preset], args.vae, args.text_encoder)
        train(args)
    except (ValueError, OSError, ImportError) as e:  # a user's error: one line, once (rank 0); all exit 1
        sys.exit(f"error: {e}" if rank == 0 else 1)
    except KeyboardInterrupt:  # Ctrl-C: files are written whole (fc.write_atomically); say what is there
        ckpt = os.path.join(args.out or os.path.join("out", args.preset), "ckpt.pt")
        print0(f"interrupted: {ckpt}", "is intact" if os.path.isfile(ckpt) else "was never written")
        sys.exit(130)
    except RuntimeError as e:  # a collective timed out, or lost a process (gloo's RuntimeError, NCCL's)
        if world_size == 1 or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        ckpt = os.path.join(args.out or os.path.join("out", args.preset), "ckpt.pt")
        then = f"resume from {ckpt} (step {saved_step}) with --resume" if saved_step else "no checkpoint yet"
        sys.exit(f"error: rank {rank} waited up to {args.timeout:g} minutes for another process (stalled or "
                 f"dead): stopped; {then}" if rank == 0 else 1)


if __name__ == "__main__":
    main()
