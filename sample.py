"""Sample Flowception videos, compare their lengths with the data law, draw pictures.

    python sample.py                               # out/toy/ckpt.pt (EMA weights), 512 videos
    python sample.py --steps 100 --sampler bernoulli --max-reveal-prob 1   # Algorithm 1 exactly
    python sample.py --oracle                      # the exact posterior-mean rate instead of a model

Prints a terminal histogram of generated vs data lengths with the metrics of toy_data.length_metrics,
saves the raw results (lengths, insertion times, frames) to <out>/samples.pt and, when matplotlib is
installed, <out>/lengths.png (Figure 10) and <out>/videos.png (Figures 5/6: each frame's insertion
time as a colour under it).
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import flowception as fc
import toy_data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample Flowception and compare lengths with the data.")
    p.add_argument("--ckpt", default="out/toy/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--oracle", action="store_true", help="use the analytic posterior-mean oracle (no checkpoint)")
    p.add_argument("--num", type=int, default=512, help="number of videos")
    p.add_argument("--batch-size", type=int, default=256, help="videos generated together")
    p.add_argument("--steps", type=int, default=25, help="flow steps per frame (h = 1 / steps)")
    p.add_argument("--sampler", choices=("poisson", "bernoulli"), default="poisson", help="insertion draw")
    p.add_argument("--max-reveal-prob", type=float, default=0.1, help="cap on each step's reveal probability (1 = Algorithm 1)")
    p.add_argument("--max-frames", type=int, default=None, help="length cap (default: twice the data's longest)")
    p.add_argument("--raw", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


def load_model(args):
    """-> (model callable, config, label)."""
    if args.oracle:
        cfg = fc.PRESETS["toy"]
        return fc.PosteriorMeanOracle(toy_data.length_probs(), cfg.make_kappa(), cfg.n_start), cfg, "oracle"
    ckpt = fc.load_checkpoint(args.ckpt)
    cfg = fc.Config.from_dict(ckpt["config"])
    if cfg.data != "toy":
        raise ValueError(f"{args.ckpt} is a {ckpt['preset']!r} checkpoint; only toy checkpoints can be sampled so far")
    model = fc.build_model(cfg)
    model.load_state_dict(ckpt["model" if args.raw else "ema"])
    return model.to(args.device).eval(), cfg, f"{ckpt['preset']} step {ckpt['step']}"


def print_histogram(lengths, width=50):
    """One row per length: generated count as '#', the data law's expected count as '|'."""
    P = toy_data.length_probs()
    lo, hi = min(int(lengths.min()), min(toy_data.LENGTHS)), max(int(lengths.max()), max(toy_data.LENGTHS))
    counts = torch.bincount(lengths, minlength=hi + 1)
    expected = [float(P[n]) * len(lengths) if n < len(P) else 0.0 for n in range(hi + 1)]
    scale = width / max(max(counts.tolist()), max(expected))
    print("length | generated ('#') vs data law ('|')")
    for n in range(lo, hi + 1):
        bar = list("#" * round(counts[n].item() * scale) + " " * (width + 1))
        if expected[n] > 0:
            bar[min(round(expected[n] * scale), width)] = "|"
        print(f"{n:6d} | {''.join(bar).rstrip():<{width + 1}} {counts[n].item():5d}")


def save_pictures(samples, lengths, out, label):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNGs (pip install matplotlib)")
        return
    # Figure 10: length histogram, generated vs data
    P = toy_data.length_probs()
    hi = max(int(lengths.max()), len(P) - 1)
    ns = torch.arange(hi + 1)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(ns, torch.bincount(lengths, minlength=hi + 1) / len(lengths), color="tab:blue", label=f"generated ({label})")
    ax.bar(ns, torch.cat([P, torch.zeros(hi + 1 - len(P), dtype=P.dtype)]), color="none", edgecolor="black", label="data")
    ax.set(xlabel="video length (frames)", ylabel="fraction of videos", title="Video length matching")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lengths.png"), dpi=120)
    plt.close(fig)
    # Figures 5/6: a few videos, frames left to right; the three pixels stacked, insertion time below
    videos = samples[:8]
    F = max(s.frames.shape[0] for s in videos)
    cmap = plt.get_cmap("viridis")
    rows = []
    for s in videos:
        img = torch.ones(5, F, 3)  # 3 pixel rows, 1 insertion-time row, 1 white gap
        n = s.frames.shape[0]
        img[:3, :n] = ((s.frames[:, :, 0, :].permute(2, 0, 1) + 1) / 2).clamp(0, 1)  # (W=3 pixels, F, RGB)
        img[3, :n] = torch.tensor(cmap(s.insert_time.numpy())[:, :3], dtype=torch.float32)
        rows.append(img)
    fig, ax = plt.subplots(figsize=(F * 0.25 + 2.5, len(videos) * 1.25 + 1))
    im = ax.imshow(torch.cat(rows).numpy(), aspect="equal", interpolation="nearest")
    im.set_cmap(cmap)
    ax.set(xlabel="frame", yticks=[], title="Sampled toy videos (3 pixels per frame; bar: insertion time)")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, label="insertion time t_g", fraction=0.03)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "videos.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'lengths.png')} and {os.path.join(out, 'videos.png')}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.num < 1 or args.batch_size < 1:
            raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
        model, cfg, label = load_model(args)
        out = args.out or ("out/oracle" if args.oracle else os.path.dirname(args.ckpt) or ".")
        os.makedirs(out, exist_ok=True)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        kwargs = dict(frame_shape=(cfg.channels, cfg.height, cfg.width), kappa=cfg.make_kappa(), n_start=cfg.n_start,
                      steps=args.steps, sampler=args.sampler, max_reveal_prob=args.max_reveal_prob,
                      max_frames=args.max_frames or 2 * cfg.max_frames, generator=generator, device=args.device)
        samples, t0 = [], time.time()
        for start in tqdm(range(0, args.num, args.batch_size), desc="sampling", unit="batch"):
            samples += fc.generate(model, min(args.batch_size, args.num - start), **kwargs)
    except ValueError as e:
        sys.exit(f"error: {e}")
    seconds = time.time() - t0
    samples = [fc.Sample(s.frames.cpu(), s.insert_time.cpu(), s.nfe, s.refused) for s in samples]
    lengths = torch.tensor([s.frames.shape[0] for s in samples])
    print_histogram(lengths)
    m = toy_data.length_metrics(lengths)
    nfe = torch.tensor([s.nfe for s in samples]).float()
    print(f"{label}: {args.num} videos, {args.sampler}, steps {args.steps}, max_reveal_prob {args.max_reveal_prob}: "
          f"length TV {m['tv']:.3f} | within +-1 of a mode {m['within1']:.1%} | mode-binned TV {m['binned_tv']:.3f} | "
          f"mean length {lengths.float().mean():.1f} | NFE per video {nfe.mean():.0f} | refused {sum(s.refused for s in samples)} | {seconds:.0f} s")
    torch.save({"lengths": lengths, "insert_time": [s.insert_time for s in samples], "frames": [s.frames for s in samples],
                "nfe": nfe.long(), "metrics": m}, os.path.join(out, "samples.pt"))
    print(f"wrote {os.path.join(out, 'samples.pt')}")
    save_pictures(samples, lengths, out, label)


if __name__ == "__main__":
    main()
