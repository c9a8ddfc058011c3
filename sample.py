"""Sample Flowception videos, compare their lengths with the data law, draw pictures.

    python sample.py                               # out/toy/ckpt.pt (EMA weights), 512 videos
    python sample.py --task i2v                    # image-to-video from held-out first frames
    python sample.py --task interp --anchors 1     # first, last and 1 middle frame given; gaps free
    python sample.py --task i2v --rate-guidance 2  # Eq. (13); --cfg S for velocity guidance
    python sample.py --order hierarchical          # Table 2's data-independent insertion orders
    python sample.py --steps 100 --sampler bernoulli --max-reveal-prob 1   # Algorithm 1 exactly
    python sample.py --oracle                      # the exact posterior-mean rate instead of a model
    python sample.py --benchmark                   # FLOPs and time vs the full-sequence baseline

Context frames come from held-out toy videos (a seed stream training never uses) or from a file
(--context FILE: a tensor (A, C, H, W) or (N, A, C, H, W) saved with torch.save). Prints a terminal
histogram of generated vs data lengths with the metrics of toy_data, the task's own statistics,
saves the raw results to <out>/samples.pt and, when matplotlib is installed, <out>/lengths.png
(Figure 10) and <out>/videos.png (Figures 5/6: each frame's insertion time as a colour under it,
context frames in dashed boxes).
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
from tqdm import tqdm

import flowception as fc
import toy_data

HELD_OUT = 1_000_003  # seed offset of the held-out videos that provide context frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample Flowception and compare lengths with the data.")
    p.add_argument("--ckpt", default="out/toy/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--oracle", action="store_true", help="use the analytic posterior-mean oracle (no checkpoint)")
    p.add_argument("--oracle-gamma", type=float, default=1.0, help="the gamma the oracle assumes the model was trained with")
    p.add_argument("--num", type=int, default=512, help="number of videos")
    p.add_argument("--batch-size", type=int, default=256, help="videos generated together")
    p.add_argument("--steps", type=int, default=25, help="flow steps per frame (h = 1 / steps)")
    p.add_argument("--sampler", choices=("poisson", "bernoulli"), default="poisson", help="insertion draw")
    p.add_argument("--max-reveal-prob", type=float, default=0.1, help="cap on each step's reveal probability (1 = Algorithm 1)")
    p.add_argument("--max-frames", type=int, default=None, help="length cap (default: twice the data's longest)")
    p.add_argument("--task", choices=("uncond", "i2v", "interp", "extend"), default="uncond", help="what is given")
    p.add_argument("--context", default=None, help="file with context frames (default: held-out toy videos)")
    p.add_argument("--anchors", type=int, default=0, help="interp: middle anchors between the first and last frame")
    p.add_argument("--prefix", type=int, default=4, help="extend: number of given frames")
    p.add_argument("--rate-guidance", type=float, default=1.0, help="rate guidance scale w, Eq. (13) (1 = off)")
    p.add_argument("--cfg", type=float, default=1.0, help="velocity classifier-free guidance scale (1 = off)")
    p.add_argument("--gamma", type=float, default=None, help="per-frame time t = u^gamma (Appendix E; default: the training gamma)")
    p.add_argument("--order", choices=fc.ORDERS, default="learned", help="where frames go (Table 2); 'full_sequence' = baseline")
    p.add_argument("--length", type=int, default=None, help="target length for --order (default: the data law / the context's video)")
    p.add_argument("--vae", default="Lightricks/LTX-Video", help="latent presets: the LTX VAE (hub id or folder) that decodes to mp4")
    p.add_argument("--fps", type=float, default=16.0, help="latent presets: frame rate of the mp4s")
    p.add_argument("--decode-timestep", type=float, default=0.0, help="latent presets: decode timestep of timestep-conditioned LTX VAEs")
    p.add_argument("--decode-noise-scale", type=float, default=None, help="latent presets: noise mixed in before decoding (default: the timestep)")
    p.add_argument("--raw", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--benchmark", action="store_true", help="instead of sampling: generate with Flowception, then with the "
                   "full-sequence baseline at the same lengths and steps per frame; print NFE, FLOPs and wall-clock")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


def load_model(args):
    """-> (model callable, config, label)."""
    if args.oracle:  # the exact rate of the toy law; for prompts whose context comes first
        cfg = dataclasses.replace(fc.PRESETS["toy"], gamma=args.oracle_gamma)
        if args.task == "interp":
            raise ValueError("the oracle knows the rate for uncond, i2v and extend prompts, not interp")
        n_context = {"uncond": 0, "i2v": 1, "extend": args.prefix}[args.task]
        oracle = fc.PosteriorMeanOracle(toy_data.length_probs(), cfg.make_kappa(), cfg.n_start, gamma=args.oracle_gamma,
                                        n_context=n_context, n_passive=max(n_context - 1, 0))
        return oracle, cfg, "oracle"
    ckpt = fc.load_checkpoint(args.ckpt)
    cfg = fc.Config.from_dict(ckpt["config"])
    if cfg.attention == "flex" and "cuda" not in str(args.device):  # the same rule, as a dense mask
        cfg = dataclasses.replace(cfg, attention="sdpa")
    if cfg.data != "toy" and args.task != "uncond" and args.context is None:
        raise ValueError(f"{args.ckpt} is a latent preset: give the context latents with --context FILE")
    trained = fc.parse_tasks(cfg.tasks)
    if args.task != "uncond" and not trained.get(args.task):
        raise ValueError(f"{args.ckpt} was trained on tasks {cfg.tasks!r}, not {args.task!r} (train with --tasks or --preset toy_tasks)")
    if (args.rate_guidance != 1 or args.cfg != 1) and cfg.cond_dropout == 0:
        raise ValueError(f"guidance needs a model trained with conditioning dropout; {args.ckpt} has cond_dropout=0")
    model = fc.build_model(cfg)
    model.load_state_dict(ckpt["model" if args.raw else "ema"])
    return model.to(args.device).eval(), cfg, f"{ckpt['preset']} step {ckpt['step']}"


def task_inputs(args, frame_shape):
    """-> (prompt or None, source lengths (N,) or None, anchor indices (N, A) or None).

    Context frames are cut from held-out toy videos, or read from --context.
    """
    N, short = args.num, min(toy_data.LENGTHS)
    if not 0 <= args.anchors <= 2:
        raise ValueError(f"--anchors must be 0, 1 or 2 (training shows at most 2 middle anchors), got {args.anchors}")
    if not 2 <= args.prefix <= short // 2:
        raise ValueError(f"--prefix must be in [2, {short // 2}] (training gives 2..n/2 frames), got {args.prefix}")
    videos, lengths = toy_data.sample_toy_videos(N, torch.Generator().manual_seed(HELD_OUT + args.seed))
    if args.task == "uncond":
        return None, None, None
    if args.context is not None:
        if not os.path.isfile(args.context):
            raise ValueError(f"context file {args.context} does not exist")
        frames = torch.load(args.context, weights_only=True)
        if isinstance(frames, dict):  # a latent file: its first frame, first clip, or first and last frame
            z = fc.load_latents(args.context)
            frames = {"i2v": z[:1], "extend": z[: args.prefix], "interp": z[[0, -1]]}[args.task]
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"context file {args.context} holds no tensor")
        frames = frames.expand(N, *frames.shape) if frames.ndim == 4 else frames
        if frames.ndim != 5 or frames.shape[0] != N or tuple(frames.shape[2:]) != tuple(frame_shape):
            raise ValueError(f"context frames must be (A, {', '.join(map(str, frame_shape))}) or ({N}, A, ...), "
                             f"got {tuple(frames.shape)} from {args.context}")
        return fc.make_prompt(args.task, frames.float()), None, None
    index = None
    if args.task == "i2v":
        frames = videos[:, :1]
    elif args.task == "extend":
        frames = videos[:, : args.prefix]
    else:  # interp: first, last and `anchors` evenly spaced frames in between
        where = torch.linspace(0, 1, args.anchors + 2)[None] * (lengths[:, None] - 1)  # (N, A)
        index = where.round().long()
        frames = videos[torch.arange(N)[:, None], index]  # (N, A, C, H, W)
    return fc.make_prompt(args.task, frames), lengths, index


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


def task_statistics(samples, task, source_lengths, anchors):
    """The numbers that say whether a task worked; each printed with its data reference."""
    lengths = torch.tensor([s.frames.shape[0] for s in samples])
    rough = torch.tensor([toy_data.roughness(s.frames) for s in samples])
    data = toy_data.sample_toy_videos(len(samples), torch.Generator().manual_seed(HELD_OUT - 1))
    data_rough = torch.tensor([toy_data.roughness(v[:n]) for v, n in zip(*data)])
    stats = {"roughness": float(rough.mean()), "data_roughness": float(data_rough.mean())}
    if task == "i2v" and len(samples) > 1:  # does frame 1 continue ITS context frame, or any frame?
        first, nxt = torch.stack([s.frames[0] for s in samples]), torch.stack([s.frames[1] for s in samples])
        stats["continuation"] = float(toy_data.outer_distance(nxt, first).mean())
        stats["continuation_shuffled"] = float(toy_data.outer_distance(nxt, first.roll(1, dims=0)).mean())
    if task == "interp" and source_lengths is not None:
        stats["length_exact"] = float((lengths == source_lengths).double().mean())
        stats["length_within1"] = float(((lengths - source_lengths).abs() <= 1).double().mean())
        jumps = torch.tensor([toy_data.jump_excess(s.frames) for s in samples])
        stats["one_jump"] = float((jumps < 0.1).double().mean())
        stats["jump_excess"] = float(jumps.mean())
    if task == "interp" and anchors is not None and anchors.shape[1] > 2:  # how the frames are split between anchors
        share = lambda gaps: gaps / gaps.sum(-1, keepdim=True).clamp_min(1)  # noqa: E731
        src = share((anchors.diff(dim=1) - 1).double())  # (N, A-1)
        got = torch.stack([share((s.context.nonzero().flatten().diff() - 1).double()) for s in samples])
        stats["split_error"] = float((got - src).abs().mean())
    return stats


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
    # Figures 5/6: a few videos, frames left to right; the three pixels stacked, insertion time below,
    # context frames in dashed boxes
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
    for r, s in enumerate(videos):
        for f in torch.nonzero(s.context).flatten().tolist():
            ax.add_patch(plt.Rectangle((f - 0.5, 5 * r - 0.5), 1, 3, fill=False, edgecolor="black", linestyle="--", linewidth=1.2))
    ax.set(xlabel="frame", yticks=[], title="Sampled toy videos (3 pixels per frame; bar: insertion time; dashed: context)")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, label="insertion time t_g", fraction=0.03)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "videos.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'lengths.png')} and {os.path.join(out, 'videos.png')}")


def write_latent_videos(samples, lengths, out, args, seconds, vae):
    """Latent presets: decode every sample through the LTX VAE, one clip at a time, into mp4s."""
    nfe = torch.tensor([s.nfe for s in samples]).float()
    print(f"{len(samples)} videos in {seconds:.0f} s: latent lengths {lengths.min()}..{lengths.max()} "
          f"(mean {lengths.float().mean():.1f}, i.e. {1 + 8 * (lengths.float().mean() - 1):.0f} video frames) | NFE per video {nfe.mean():.0f}")
    torch.save({"lengths": lengths, "insert_time": [s.insert_time for s in samples], "latents": [s.frames for s in samples],
                "context": [s.context for s in samples], "nfe": nfe.long()}, os.path.join(out, "samples.pt"))
    try:
        os.makedirs(os.path.join(out, "videos"), exist_ok=True)
        for i, s in enumerate(tqdm(samples, desc="decoding")):
            pixels = fc.decode_latents(vae, s.frames, args.decode_timestep, args.decode_noise_scale)
            fc.write_video(os.path.join(out, "videos", f"sample_{i:04d}.mp4"), ((pixels + 1) * 127.5).round().to(torch.uint8), args.fps)
    except ValueError as e:
        sys.exit(f"error: {e} (the latents are in {os.path.join(out, 'samples.pt')})")
    print(f"wrote {len(samples)} mp4s to {os.path.join(out, 'videos')} and the latents to {os.path.join(out, 'samples.pt')}")


class FlopCounter:
    """model(x_t, t, mask, cond), counting the FLOPs of each call: 'useful' over every video's real frames,
    'executed' over the padded batch the model runs on."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.useful, self.executed = model, cfg, 0.0, 0.0

    def __call__(self, x_t, t, mask, cond):
        self.useful += sum(fc.forward_flops(self.cfg, int(m)) for m in mask.sum(dim=1))
        self.executed += mask.shape[0] * fc.forward_flops(self.cfg, mask.shape[1])
        return self.model(x_t, t, mask, cond)


def benchmark(model, cfg, args, generate_all):
    """Flowception, then the full-sequence baseline at the lengths Flowception generated, both with
    --steps flow steps per frame (exactly so with --max-reveal-prob 1; the default grid gives frames
    more steps before t_g = 1). The baseline's cost does not depend on the weights, so one model does."""
    sync = torch.cuda.synchronize if "cuda" in str(args.device) else (lambda: None)
    results, lengths = {}, None
    generate_all(model, "learned", None, num=min(args.num, 4))  # warm-up (compilation, allocator), untimed
    for name, order in (("Flowception", "learned"), ("full sequence", "full_sequence")):
        counted = FlopCounter(model, cfg)
        sync()
        t0 = time.perf_counter()
        samples = generate_all(counted, order, lengths)
        sync()
        seconds = time.perf_counter() - t0
        lengths = torch.tensor([s.frames.shape[0] for s in samples])
        n = len(samples)
        results[name] = r = dict(nfe=sum(s.nfe for s in samples) / n, useful=counted.useful / n, executed=counted.executed / n,
                                 seconds=seconds / n)
        print(f"{name:>13}: NFE per video {r['nfe']:6.1f} | {r['useful'] / 1e9:.4g} GFLOP/video useful, "
              f"{r['executed'] / 1e9:.4g} executed | {1 / r['seconds']:.1f} videos/s | mean length {lengths.float().mean():.2f}")
    a, b = results["Flowception"], results["full sequence"]
    print(f"Flowception / full sequence per video ({args.num} videos, batch {args.batch_size}, {args.steps} steps per frame, "
          f"max_reveal_prob {args.max_reveal_prob}): NFE {a['nfe'] / b['nfe']:.3f} | FLOPs {a['useful'] / b['useful']:.3f} useful, "
          f"{a['executed'] / b['executed']:.3f} executed | wall-clock {a['seconds'] / b['seconds']:.3f}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.num < 1 or args.batch_size < 1:
            raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
        model, cfg, label = load_model(args)
        order = args.order
        if cfg.full_sequence and order == "learned":
            print("this checkpoint is the full-sequence baseline (no rate head trained): using --order full_sequence")
            order = "full_sequence"
        frame_shape = (cfg.channels, cfg.height, cfg.width)
        gamma = cfg.gamma if args.gamma is None else args.gamma  # the oracle's cfg.gamma is --oracle-gamma
        prompt, source_lengths, anchors = task_inputs(args, frame_shape)
        targets = None
        if order != "learned" and cfg.data != "toy" and not args.length:
            raise ValueError(f"order {order!r} on a latent preset needs --length")
        if order != "learned":  # a target length per video: given, the context's own video, or the data law
            law = toy_data.sample_toy_videos(args.num, torch.Generator().manual_seed(HELD_OUT + args.seed))[1]
            targets = torch.full((args.num,), args.length) if args.length else (source_lengths if source_lengths is not None else law)
        out = args.out or ("out/oracle" if args.oracle else os.path.dirname(args.ckpt) or ".")
        generator = torch.Generator(args.device).manual_seed(args.seed)
        kwargs = dict(frame_shape=frame_shape, kappa=cfg.make_kappa(), n_start=cfg.n_start, steps=args.steps,
                      sampler=args.sampler, max_reveal_prob=args.max_reveal_prob,
                      max_frames=args.max_frames or (2 if cfg.data == "toy" else 1) * cfg.max_frames, generator=generator, device=args.device,
                      rate_guidance=args.rate_guidance, cfg_scale=args.cfg, gamma=gamma)

        def generate_all(model, order, targets, num=args.num):
            samples = []
            for start in tqdm(range(0, num, args.batch_size), desc=f"sampling ({order})", unit="batch"):
                part = slice(start, min(start + args.batch_size, num))
                sub = None if prompt is None else fc.Prompt(prompt.frames[part], prompt.context[part], prompt.passive[part])
                samples += fc.generate(model, part.stop - part.start, prompt=sub, order=order,
                                       lengths=None if targets is None else targets[part], **kwargs)
            return samples

        if args.benchmark:
            if cfg.full_sequence or order != "learned":
                raise ValueError("--benchmark compares a Flowception checkpoint's learned insertions with the baseline")
            return benchmark(model, cfg, args, generate_all)
        os.makedirs(out, exist_ok=True)
        vae = fc.load_vae(args.vae, args.device) if cfg.data != "toy" and not args.oracle else None  # fail early
        t0 = time.time()
        samples = generate_all(model, order, targets)
    except ValueError as e:
        sys.exit(f"error: {e}")
    seconds = time.time() - t0
    samples = [fc.Sample(s.frames.cpu(), s.insert_time.cpu(), s.nfe, s.refused, s.context.cpu()) for s in samples]
    lengths = torch.tensor([s.frames.shape[0] for s in samples])
    if cfg.data != "toy":
        return write_latent_videos(samples, lengths, out, args, seconds, vae)
    print_histogram(lengths)
    m = toy_data.length_metrics(lengths)
    nfe = torch.tensor([s.nfe for s in samples]).float()
    print(f"{label}: {args.num} videos, task {args.task}, order {order}, {args.sampler}, steps {args.steps}, "
          f"max_reveal_prob {args.max_reveal_prob}, rate guidance {args.rate_guidance}, cfg {args.cfg}, gamma {gamma}")
    print(f"length TV {m['tv']:.3f} | within +-1 of a mode {m['within1']:.1%} | mode-binned TV {m['binned_tv']:.3f} | "
          f"mean length {lengths.float().mean():.2f} | NFE per video {nfe.mean():.0f} | refused {sum(s.refused for s in samples)} | {seconds:.0f} s")
    stats = task_statistics(samples, args.task, source_lengths, anchors)
    print(f"roughness of the outer pixels {stats['roughness']:.4f} (data {stats['data_roughness']:.4f})")
    if "continuation" in stats:
        print(f"i2v: frame 1 to its context frame {stats['continuation']:.3f} vs to another video's {stats['continuation_shuffled']:.3f} (outer-pixel distance)")
    if "length_exact" in stats:
        print(f"interp: length = the anchors' video {stats['length_exact']:.1%}, within +-1 {stats['length_within1']:.1%} | "
              f"middle pixel jumps once {stats['one_jump']:.1%} (data 100%), mean excess variation {stats['jump_excess']:.3f}")
    if "split_error" in stats:
        print(f"interp: share of the frames in each gap vs the source video's, mean absolute error {stats['split_error']:.3f}")
    torch.save({"lengths": lengths, "insert_time": [s.insert_time for s in samples], "frames": [s.frames for s in samples],
                "context": [s.context for s in samples], "nfe": nfe.long(), "metrics": m, "task_stats": stats,
                "source_lengths": source_lengths}, os.path.join(out, "samples.pt"))
    print(f"wrote {os.path.join(out, 'samples.pt')}")
    save_pictures(samples, lengths, out, label)


if __name__ == "__main__":
    main()
