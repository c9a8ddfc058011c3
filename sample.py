"""Sample Flowception videos and compare them with the data.

    python sample.py                                # out/toy/ckpt.pt (EMA weights), 512 videos
    python sample.py --ckpt out/toy_tasks/ckpt.pt --task interp --anchors 1  # first, middle, last given
    python sample.py --steps 100 --sampler bernoulli --max-reveal-prob 1   # Algorithm 1's grid and draw
    python sample.py --ckpt out/full/ckpt.pt        # a baseline (train.py --paradigm): at the data's lengths
    python sample.py --ckpt out/toy_t2v/ckpt.pt --prompt "25 frames, jumps up"   # text-to-video

Toy checkpoints: the histogram, toy_data's metrics, samples.pt, videos.png, generation.gif. Latents: mp4s."""
import argparse
import dataclasses
import os
import sys
import time

import torch
from tqdm import tqdm

import flowception as fc
import toy_data

HELD_OUT = 1_000_003  # seed offset of the held-out toy videos that give context frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample Flowception and compare with the data.")
    arg = p.add_argument
    arg("--ckpt", default="out/toy/ckpt.pt", help="checkpoint written by train.py")
    arg("--num", type=int, default=512, help="number of videos")
    arg("--batch-size", type=int, default=256, help="videos generated together")
    arg("--steps", type=int, default=25, help="flow steps per frame (h = 1 / steps)")
    arg("--sampler", choices=("poisson", "bernoulli"), default="poisson", help="insertion draw")
    arg("--max-reveal-prob", type=float, default=0.1, help="cap on a step's reveal probability (1: Alg. 1)")
    arg("--max-frames", type=int, help="length cap (default: the data's longest, twice that for the toy)")
    arg("--task", choices=fc.TASKS, default="uncond", help="what is given")
    arg("--prompt", help="the text every video is asked for (a checkpoint trained with prompts; '': none)")
    arg("--context", help="a latent file whose frames are the context (default: held-out toy videos)")
    arg("--anchors", type=int, default=0, help="interp: middle anchors between the first and last frame")
    arg("--prefix", type=int, default=4, help="extend: the number of given frames")
    arg("--rate-guidance", type=float, default=1.0, help="rate guidance w, Eq. (13) (1: off)")
    arg("--cfg", type=float, default=1.0, help="velocity classifier-free guidance scale (1: off)")
    arg("--gamma", type=float, help="per-frame time t = u^gamma (Appendix E; default: the training gamma)")
    arg("--kv-cache", action=argparse.BooleanOptionalAction, default=True, help="ar_causal: a KV cache")
    arg("--length", type=int, help="the baselines' length (default: the data law, or the context's video)")
    arg("--vae", help="latent presets: the LTX VAE that decodes to mp4 (default: the latents' own)")
    arg("--fps", type=float, help="latent presets: frame rate of the mp4s (default: the training clips')")
    arg("--seed", type=int, default=0, help="sampling seed")
    arg("--out", help="output folder (default: the checkpoint's)")
    arg("--device", help="cpu, cuda, cuda:1... (default: cuda when there is a GPU)")
    return p.parse_args(argv)


def check_numbers(args):
    """Every number a user gives, within the bounds outside which a run is meaningless or endless."""
    bounds = {"num": (1, 1e7), "batch_size": (1, 1e6), "steps": (1, 1e4), "max_reveal_prob": (1e-3, 1),
              "rate_guidance": (0, 100), "cfg": (0, 100), "gamma": (0.01, 100), "fps": (0.1, 1000),
              "anchors": (0, 2), "prefix": (2, 1e4), "length": (1, 1e4), "max_frames": (1, 1e4)}
    for name, (lo, hi) in bounds.items():  # anchors: what training shows
        if (value := getattr(args, name)) is not None and not lo <= value <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{lo:g}, {hi:g}], got {value}")


def load_model(args):
    """-> (model, config, label); a one-line error for what the checkpoint cannot do."""
    ckpt, cfg = fc.load_checkpoint(args.ckpt)
    trained = fc.parse_tasks(cfg.tasks) | ({"i2v": 1, "extend": 1} if cfg.paradigm.startswith("ar") else {})
    if args.task != "uncond" and not trained.get(args.task):  # AR: any number of first frames is a task
        raise ValueError(f"{args.ckpt} was trained on tasks {cfg.tasks!r}, not {args.task!r} (see --tasks)")
    if (args.rate_guidance, args.cfg) != (1, 1) and (cfg.cond_dropout == 0 or cfg.paradigm != "flowception"):
        raise ValueError(f"guidance needs Flowception trained with --cond-dropout: {args.ckpt} is not")
    model = fc.build_model(dataclasses.replace(cfg, speed=""))  # the speed paths are for training
    model.load_state_dict(ckpt["ema"])
    args.data_info = ckpt.get("data") or {}  # the latents' VAE and fps
    return model.to(args.device).eval(), cfg, f"{ckpt['preset']} step {ckpt['step']}"


def context_frames(args, cfg):
    """-> context frames (N, A, C, H, W) or None, and their videos' lengths (held-out toy or --context)."""
    if args.task == "uncond":
        return None, None
    N = args.num
    if args.context is not None:
        z, info = fc.load_latents(args.context, cfg.channels, (cfg.height, cfg.width))
        theirs, ours = info["vae_fingerprint"], args.data_info.get("vae_fingerprint")
        if theirs and ours and theirs != ours:
            raise ValueError(f"{args.context} holds latents of VAE {theirs}, the training latents of {ours}")
        videos, lengths = z.expand(N, *z.shape), torch.full((N,), len(z))
    elif cfg.data != "toy":
        raise ValueError(f"{args.ckpt} is a latent preset: give the context with --context LATENT_FILE")
    else:
        videos, lengths = toy_data.sample_toy_videos(N, torch.Generator().manual_seed(HELD_OUT + args.seed))
    need = {"i2v": 1, "interp": 2 + args.anchors, "extend": args.prefix}[args.task]  # context frames
    if need > min(int(lengths.min()), args.max_frames - 1):  # and room for one start frame
        raise ValueError(f"--task {args.task} needs {need} context frames, a video has {int(lengths.min())}, "
                         f"--max-frames {args.max_frames} leaves room for {args.max_frames - 1}")
    if args.task != "interp":  # the first frames
        return videos[:, :need], lengths
    index = (torch.linspace(0, 1, need)[None] * (lengths[:, None] - 1)).round().long()  # (N, A)
    return videos[torch.arange(N)[:, None], index], lengths  # the first frame, evenly spaced ones, the last


def encode_prompt(args, cfg):
    """--prompt -> generate's prompt (1, P, E), prompt_mask ({} if none), by the training prompts' encoder."""
    if args.prompt is None:
        return {}
    name, known = args.data_info.get("text_encoder"), args.data_info.get("text_encoder_fingerprint")
    if not cfg.prompt_dim or name is None:
        raise ValueError(f"{args.ckpt} was trained without prompts, or does not say which text encoder made "
                         "them")
    if name == "toy":
        embeds = toy_data.embed_caption(args.prompt)
    else:
        text_encoder = fc.load_text_encoder(name, args.device)
        fingerprint = fc.identity("text_encoder", text_encoder[1], name)["text_encoder_fingerprint"]
        if known not in (None, fingerprint):
            raise ValueError(f"the text encoder at {name} ({fingerprint}) is not the one that made the "
                             f"training prompts ({known})")
        embeds = fc.encode_text(text_encoder, [args.prompt])[0].float()
    return dict(prompt=embeds[None], prompt_mask=torch.ones(1, len(embeds), dtype=torch.bool))


def baseline_lengths(args, cfg, frames, source_lengths):
    """The baselines' length of each video: --length, the context's own video's or the data law's."""
    if args.task == "interp":
        raise ValueError("the baselines need every gap's length: not interp")
    if cfg.data != "toy" and not args.length:
        raise ValueError("the baselines of a latent preset need --length")
    law = toy_data.sample_toy_videos(args.num, torch.Generator().manual_seed(HELD_OUT + args.seed))[1]
    default = law if source_lengths is None else source_lengths  # the data law, or the context's videos'
    lengths = torch.full((args.num,), args.length) if args.length else default
    given = 0 if frames is None else frames.shape[1]  # context frames
    if (lengths <= given).any() or lengths.max() > args.max_frames:
        got = args.length or f"none: the videos have {int(lengths.min())} to {int(lengths.max())} frames"
        raise ValueError(f"--length must be in [{given + 1}, {args.max_frames}] (given: {given}), got {got}")
    return lengths


def generate_all(model, args, cfg, frames, lengths=None):
    """args.num videos, args.batch_size at a time, from the context frames; with lengths, a baseline's."""
    shape, A = (cfg.channels, cfg.height, cfg.width), 0 if frames is None else frames.shape[1]
    flow = dict(steps=args.steps, gamma=args.gamma, device=args.device,
                generator=torch.Generator(args.device).manual_seed(args.seed), **args.text)
    kwargs = dict(kappa=fc.KAPPAS[cfg.kappa](), sampler=args.sampler, max_reveal_prob=args.max_reveal_prob,
                  max_frames=args.max_frames, rate_guidance=args.rate_guidance, cfg_scale=args.cfg, **flow)
    index, B = torch.arange(args.num), args.batch_size
    if lengths is None:  # Flowception: n_start start frames, or one after the context
        jobs = [(rows, cfg.n_start if frames is None else 1) for rows in index.split(B)]
    else:
        jobs = [(rows, n) for n in lengths.unique().tolist() for rows in index[lengths == n].split(B)]
    samples = [None] * args.num
    for rows, n in tqdm(jobs, desc="sampling", unit="batch"):
        context = torch.zeros(len(rows), 0, *shape) if frames is None else frames[rows]
        if cfg.paradigm.startswith("ar"):  # n frames, one at a time
            cache = fc.KVCache(cfg.depth) if cfg.paradigm == "ar_causal" and args.kv_cache else None
            videos, nfe = fc.generate_ar(model, context.to(args.device), n, cache, **flow)
            out = [fc.Sample(v, torch.zeros(n), nfe, 0, torch.arange(n) < A) for v in videos]
        else:  # Flowception with n start frames, or the full-sequence baseline's n frames
            net, n_start = (model, n) if lengths is None else (fc.never_inserts(model), n - A)
            start = None if frames is None else fc.make_start(args.task, context, n_start)
            out = fc.generate(net, len(rows), shape, n_start=n_start, start=start, **kwargs)
        for i, s in zip(rows.tolist(), out):
            samples[i] = fc.Sample(s.frames.cpu(), s.insert_time.cpu(), s.nfe, s.refused, s.context.cpu())
    return samples


def print_histogram(lengths, width=50):
    """One row per length: the generated count as '#', the data law's expected count as '|'."""
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


def picture(videos, under, width, bar=None):
    """Toy videos (F_i, 3, 1, 3) -> an image (5 rows per video, width): frames left to right, their 3 pixels
    stacked, under them a row of colours (F_i, 3), then a gap; above them, a black bar of `bar` x width."""
    img = torch.ones(5 * len(videos), width, 3)
    for r, (frames, colours) in enumerate(zip(videos, under)):
        img[5 * r: 5 * r + 3, : len(frames)] = ((frames[:, :, 0, :].permute(2, 0, 1) + 1) / 2).clamp(0, 1)
        img[5 * r + 3, : len(frames)] = colours
    if bar is not None:  # two rows, black up to bar x width
        img = torch.cat([(torch.arange(width) >= bar * width).float()[None, :, None].expand(2, -1, 3), img])
    return img.numpy()


def draw_videos(samples, path):
    """Figures 5/6: 8 videos, frames left to right, the 3 pixels stacked and a row for the insertion time."""
    try:  # optional (requirements-optional.txt); it brings Pillow, which draws generation.gif
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no pictures (pip install matplotlib)")
    plt.switch_backend("Agg")  # to files
    videos, cmap = samples[:8], plt.get_cmap("viridis")
    colours = [torch.tensor(cmap(s.insert_time.numpy())[:, :3]) for s in videos]  # (F_i, 3) insertion times
    img = picture([s.frames for s in videos], colours, max(len(s.frames) for s in videos))
    fig, ax = plt.subplots(figsize=(img.shape[1] * 0.25 + 2.5, len(videos) * 1.25 + 1))
    ax.imshow(img, interpolation="nearest")
    for r, s in enumerate(videos):
        for f in s.context.nonzero().flatten().tolist():
            ax.add_patch(plt.Rectangle((f - 0.5, 5 * r - 0.5), 1, 3, fill=False, linestyle="--"))
    ax.set(xlabel="frame", yticks=[], title="Sampled toy videos (3 pixels per frame; bar: insertion time)")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, label="insertion time tau_g", fraction=0.03)
    fig.tight_layout()
    fc.write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    print(f"wrote {path}")
    return True  # drawn: Pillow is there for generation.gif


def draw_generation(model, args, cfg, path, n=4):
    """generation.gif: n videos, a picture per step (bar: tau_g / 2; under each frame its t, white: clean)."""
    from PIL import Image

    states, shape = [], (cfg.channels, cfg.height, cfg.width)  # the sampler's state after every step
    generator = torch.Generator(args.device).manual_seed(args.seed)
    fc.generate(model, n, shape, kappa=fc.KAPPAS[cfg.kappa](), steps=args.steps, n_start=cfg.n_start,
                max_frames=args.max_frames, gamma=args.gamma, device=args.device, generator=generator,
                callback=states.append, **args.text)
    width, pictures = max(int(s.mask.sum(1).max()) for s in states), []
    for s in states:
        videos = [(x[m], t[m, None].expand(-1, 3)) for x, t, m in zip(s.x.cpu(), s.t.cpu(), s.mask.cpu())]
        img = (255 * picture(*zip(*videos), width, bar=float(s.tau_g.min()) / 2)).round().astype("uint8")
        pictures.append(Image.fromarray(img).resize((16 * width, 16 * len(img)), Image.NEAREST))
    gif = dict(format="GIF", save_all=True, append_images=pictures[1:], duration=80, loop=0)
    fc.write_atomically(path, lambda f: pictures[0].save(f, **gif))
    print(f"wrote {path}")


def latent_vae(args):
    """The VAE of the training latents (or --vae, of the same fingerprint) and their fps (or --fps)."""
    info, name = args.data_info, args.vae or args.data_info.get("vae")
    if name is None:
        raise ValueError(f"{args.ckpt} does not say which VAE made its latents: pass --vae")
    vae = fc.load_vae(name, args.device)
    fingerprint = fc.vae_identity(vae, name)["vae_fingerprint"]
    if info.get("vae_fingerprint") not in (None, fingerprint):
        raise ValueError(f"VAE {name} ({fingerprint}) is not the VAE that made the training latents, "
                         f"{info['vae']} ({info['vae_fingerprint']}): its latents would decode wrong")
    args.fps = args.fps or info.get("fps") or 24.0
    return vae


def main(argv=None):
    args = parse_args(argv)
    try:
        check_numbers(args)
        args.device = fc.get_device(args.device)
        model, cfg, label = load_model(args)
        args.text = encode_prompt(args, cfg)
        args.gamma = cfg.gamma if args.gamma is None else args.gamma
        args.max_frames = args.max_frames or (2 if cfg.data == "toy" else 1) * cfg.max_frames
        frames, source_lengths = context_frames(args, cfg)
        baseline = cfg.paradigm != "flowception"  # --steps steps per frame, at --length or the context's
        lengths = baseline_lengths(args, cfg, frames, source_lengths) if baseline else None
        args.max_reveal_prob = 1.0 if baseline else args.max_reveal_prob  # exactly --steps steps per frame
        out = args.out or os.path.dirname(args.ckpt) or "."
        lock = fc.hold_lock(out, ".sample.lock")  # until main returns: two samplers never mix their files
        vae = latent_vae(args) if cfg.data != "toy" else None  # fail before sampling
        t0 = time.time()
        samples = generate_all(model, args, cfg, frames, lengths)
        lengths, nfe = torch.tensor([len(s.frames) for s in samples]), torch.tensor([s.nfe for s in samples])
        print(f"{label}: {args.num} videos, task {args.task}, {cfg.paradigm}, {args.sampler}, {args.steps} "
              f"steps, max_reveal_prob {args.max_reveal_prob}, guidance {args.rate_guidance}/{args.cfg}, "
              f"gamma {args.gamma} | NFE per video {nfe.float().mean():.0f}, {time.time() - t0:.0f} s")
        result = {"lengths": lengths, "insert_time": [s.insert_time for s in samples], "nfe": nfe,
                  "frames": [s.frames for s in samples], "context": [s.context for s in samples],
                  "source_lengths": source_lengths}
        fc.write_atomically(os.path.join(out, "samples.pt"), lambda f: torch.save(result, f))
        if vae:  # latents: mp4s, one clip at a time
            for i, s in enumerate(tqdm(samples, desc="decoding")):
                video = ((fc.decode_latents(vae, s.frames) + 1) * 127.5).round().to(torch.uint8)
                path = os.path.join(out, "videos", f"sample_{i:04d}.mp4")
                fc.write_atomically(path, lambda f: fc.write_video(f, video, args.fps))
            return print(f"wrote {args.num} mp4s at {args.fps:g} fps to {os.path.join(out, 'videos')}")
        print_histogram(lengths)
        m = result["metrics"] = toy_data.length_metrics(lengths)
        print(f"length TV {m['tv']:.3f} | within +-1 of a mode {m['within1']:.1%} | mode-binned TV "
              f"{m['binned_tv']:.3f} | mean length {lengths.float().mean():.2f} | refused "
              f"{sum(s.refused for s in samples)}")
        q = result["quality"] = toy_data.quality([s.frames for s in samples])
        content = " | ".join(f"{k} {q[k]:.3g} ({q['data'][k]:.3g})" for k in q["data"])  # toy_data.summary
        print(f"content (data): {content} | FD {q['fd']:.3g} (data vs data {q['fd_floor']:.3g})")
        if args.prompt:  # what the prompt asks for, done by how many
            follows = result["follows"] = toy_data.follows(args.prompt, result["frames"])
            print(f"prompt {args.prompt!r}: " + " | ".join(f"{k} {v:.1%}" for k, v in follows.items()))
        fc.write_atomically(os.path.join(out, "samples.pt"), lambda f: torch.save(result, f))
        drawn = draw_videos(samples, os.path.join(out, "videos.png"))  # None without matplotlib
        if drawn and cfg.paradigm == "flowception" and args.task == "uncond":
            draw_generation(model, args, cfg, os.path.join(out, "generation.gif"))
    except (ValueError, OSError, ImportError) as e:  # a user's error, a missing package too: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: files are written whole (fc.write_atomically), old or new
        print("interrupted: no file is half-written (each is the old one or the new one)")
        sys.exit(130)


if __name__ == "__main__":
    main()
