"""Train Flowception.

    python train.py                              # the 3-pixel toy on CPU, a few minutes on 2 cores
    python train.py --preset toy --steps 500 --out out/quick
    python train.py --resume                     # continue out/<preset>/ckpt.pt

Single process for now; the torchrun path (issue 5) slots in where `rank` and `world_size` appear.
"""
import argparse
import copy
import dataclasses
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import flowception as fc
import toy_data

rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0


def print0(*args, **kwargs):
    if master:
        print(*args, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Flowception (arXiv 2512.11438).")
    p.add_argument("--preset", choices=fc.PRESETS, default="toy", help="model + data + schedule preset")
    p.add_argument("--out", default=None, help="output folder (default out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, help="videos per step")
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
    p.add_argument("--window", type=int, help="local attention over +-window frames (0: full)")
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


def save_checkpoint(path, model, ema, opt, step, cfg, preset, data_rng):
    """One flat dict of tensors and plain data, written atomically (temp file, then rename)."""
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "config": dataclasses.asdict(cfg), "preset": preset, "data_rng": data_rng.get_state()}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def train(args):
    if world_size > 1:
        raise ValueError("multi-process training (torchrun) is not built yet (issue 5); run one process")
    out = args.out or os.path.join("out", args.preset)
    ckpt_path = os.path.join(out, "ckpt.pt")
    ckpt = fc.load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None and ckpt["preset"] != args.preset:
        raise ValueError(f"checkpoint {ckpt_path} is of preset {ckpt['preset']!r}, not {args.preset!r}")
    if ckpt is not None and not {"optimizer", "data_rng"} <= set(ckpt):
        raise ValueError(f"checkpoint {ckpt_path} has no optimizer or data state to resume from")
    cfg = make_config(args, base=fc.Config.from_dict(ckpt["config"]) if ckpt else None)
    if cfg.data != "toy":
        raise ValueError(f"preset {args.preset!r} trains on LTX latents, whose loader is not built yet (issue 5)")
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed * world_size + rank)  # per-rank data stream
    model = fc.build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    kappa = cfg.make_kappa()
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        data_rng.set_state(ckpt["data_rng"])
        start = ckpt["step"]
        print0(f"resumed from {ckpt_path} at step {start}")
    os.makedirs(out, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters, {cfg.steps} steps of {cfg.batch_size} videos on {device}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not master, dynamic_ncols=True)
    t_log, sums, n_logged = time.time(), torch.zeros(2), 0
    for step in bar:
        # 1. a batch of clean videos, padded, with their lengths
        x_1, lengths = toy_data.sample_toy_videos(cfg.batch_size, data_rng)
        x_1 = x_1[:, : int(lengths.max())]  # built on the CPU with the data generator, moved below
        # 2. where every frame stands in extended time (Section 4 / Algorithm 2)
        state = fc.sample_training_state(lengths, kappa, cfg.n_start, generator=data_rng, tau_density=cfg.tau_density)
        # 3. what the model sees: visible frames noised to their own times, stripped and padded
        batch = fc.make_training_batch(x_1, state, generator=data_rng)
        batch = fc.TrainingBatch(**{k: v.to(device) for k, v in vars(batch).items()})
        # 4. forward and losses (Eqs. 12, 20)
        with autocast:
            v, log_lam = model(batch.x_t, batch.t, batch.mask, batch.cond)
        loss_v = fc.velocity_loss(v, batch)
        loss_r = fc.rate_loss(log_lam, batch, kappa, cfg.hazard_weight)
        loss = loss_v + cfg.rate_weight * loss_r
        # 5. update: clip, AdamW at the scheduled lr, EMA (warmed up so early EMA is not the init)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        # 6. log and checkpoint
        sums += torch.tensor([loss_v.item(), loss_r.item()])
        n_logged, done = n_logged + 1, step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            speed = n_logged / (time.time() - t_log)
            if master:
                bar.write(f"step {done:6d} | velocity {sums[0] / n_logged:.4f} | rate {sums[1] / n_logged:.4f} | "
                          f"lr {lr:.2e} | {speed:.1f} steps/s")
            t_log, sums, n_logged = time.time(), torch.zeros(2), 0
        if master and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_path, model, ema, opt, done, cfg, args.preset, data_rng)
    print0(f"saved {ckpt_path}; sample it with: python sample.py --ckpt {ckpt_path}")
    return ckpt_path


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
