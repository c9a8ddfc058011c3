"""The 3-pixel toy videos of Appendix F, the length metrics of Figure 10 and the content metrics.

A video has n frames, n uniform over LENGTHS; a frame is (C, H, W) = (3, 1, 3): three RGB pixels in [-1, 1].
Per video: colours a, b ~ U([-1, 1]^3) and a phase phi_f = phi_0 + 2 pi f / n, phi_0 ~ U(0, 2 pi): ONE turn
per clip, so the speed tells the length. The outer pixels are the ends of a colour gradient turning around a
ring through a and b: left_f = a + (b - a)(1 + cos phi_f) / 2, right_f = a + (b - a)(1 - cos phi_f) / 2. The
middle pixel is grey: g_0 before frame j, g_1 from it on (j ~ U{1..n-1}, g_0, g_1 ~ U(-1, 1)), one jump."""
import math

import torch

LENGTHS = (15, 20, 25, 30)
FRAME_SHAPE = (3, 1, 3)  # (C, H, W)
WORDS = (*map(str, LENGTHS), "frames", "jumps", "up", "down")  # the captions' vocabulary
EMBED_DIM = 16  # the width of embed_caption's vectors: a toy preset's prompt_dim


def length_probs():
    """The data law P(n) as a tensor indexed by n (zero outside LENGTHS)."""
    p = torch.zeros(max(LENGTHS) + 1, dtype=torch.float64)
    p[list(LENGTHS)] = 1 / len(LENGTHS)
    return p


def sample_toy_videos(batch_size, generator=None):
    """-> videos (B, 30, 3, 1, 3) float32, zero beyond each length; lengths (B,) long. Vectorised."""
    B, F, g = batch_size, max(LENGTHS), dict(generator=generator)
    lengths = torch.tensor(LENGTHS)[torch.randint(len(LENGTHS), (B,), **g)]  # (B,)
    f = torch.arange(F, dtype=torch.float32)  # (F,)
    a, b = torch.rand(2, B, 1, 3, **g) * 2 - 1  # (B, 1, 3) colours, broadcast over frames
    phi = torch.rand(B, 1, **g) * 2 * math.pi + 2 * math.pi * f / lengths[:, None]  # (B, F)
    w = ((1 + torch.cos(phi)) / 2)[..., None]  # (B, F, 1) weight of b at the left pixel
    left, right = a + (b - a) * w, a + (b - a) * (1 - w)  # (B, F, 3)
    jump = 1 + (torch.rand(B, **g) * (lengths - 1)).long()  # (B,) in 1..n-1
    g0, g1 = torch.rand(2, B, 1, **g) * 2 - 1  # (B, 1)
    middle = torch.where(f < jump[:, None], g0, g1)[..., None].expand(B, F, 3)  # (B, F, 3)
    videos = torch.stack([left, middle, right], dim=-1)[:, :, :, None, :]  # (B, F, C=3, H=1, W=3)
    return videos * (f < lengths[:, None])[:, :, None, None, None], lengths  # zero beyond each length


def jumps_up(video):
    """Whether the grey middle pixel of a toy video (F, 3, 1, 3) ends above where it starts."""
    return bool(video[-1, 0, 0, 1] > video[0, 0, 0, 1])


def caption(video, generator=None):
    """A caption of a toy video (F, 3, 1, 3): its length ('25 frames'), its jump ('jumps up'), both or neither
    (the empty prompt), each part with probability 1/2: every prompt a user may give is trained."""
    parts = [f"{len(video)} frames", "jumps " + ("up" if jumps_up(video) else "down")]
    return ", ".join(part for part, say in zip(parts, torch.rand(2, generator=generator) < 0.5) if say)


def embed_caption(text):
    """A caption -> (words, EMBED_DIM): a fixed random vector per word, the toy's frozen text encoder."""
    words = text.replace(",", " ").split()
    if unknown := set(words) - set(WORDS):
        raise ValueError(f"the toy's prompts use the words {' '.join(WORDS)}, not {' '.join(unknown)}")
    table = torch.randn(len(WORDS), EMBED_DIM, generator=torch.Generator().manual_seed(0))
    return table[[WORDS.index(w) for w in words]]


def follows(text, videos):
    """The share of toy videos that do what a caption asks: a length within +-1 of it, the jump's way."""
    words, out = text.replace(",", " ").split(), {}
    for n in (w for w in words if w.isdigit()):
        out[f"within +-1 of {n} frames"] = sum(abs(len(v) - int(n)) <= 1 for v in videos) / len(videos)
    for way in (w for w in words if w in ("up", "down")):
        out[f"jumps {way}"] = sum(jumps_up(v) == (way == "up") for v in videos) / len(videos)
    return out


def length_metrics(lengths):
    """Lengths vs the data law: tv, the total variation between their histogram and P(n); within1, the share
    within +-1 of a data length; binned_tv, the TV with each video binned to its nearest data length within
    +-2, else to "outside" (near misses forgiven)."""
    lengths = torch.as_tensor(lengths).long()
    P = length_probs()
    hist = torch.bincount(lengths, minlength=len(P)).double() / len(lengths)
    tv = 0.5 * (hist - torch.nn.functional.pad(P, (0, len(hist) - len(P)))).abs().sum()
    nearest = (lengths[:, None] - torch.tensor(LENGTHS)[None]).abs().min(dim=1)  # (N,) the nearest mode
    bins = torch.where(nearest.values <= 2, nearest.indices, len(LENGTHS))
    binned = torch.bincount(bins, minlength=len(LENGTHS) + 1).double() / len(lengths)
    target = torch.tensor([1 / len(LENGTHS)] * len(LENGTHS) + [0.0], dtype=torch.float64)
    return {"tv": float(tv), "within1": float((nearest.values <= 1).double().mean()),
            "binned_tv": float(0.5 * (binned - target).abs().sum())}


def features(frames):
    """A toy video (F, 3, 1, 3) -> what the data fix: the middle pixel's variation beyond one clean jump (0)
    and its steps over 0.2 (one unless g_0 ~ g_1), the outer pixels' roughness (mean |second difference|), the
    kink where the clip wraps to its start beyond it (about 0: frame 0 follows the last), and the length."""
    middle = frames[:, :, 0, 1].double().mean(dim=1)  # (F,) the grey level
    outer = frames[:, :, 0, [0, 2]].double()  # (F, 3, 2)
    loop = torch.cat([outer, outer[:2]])  # the clip, then its own start again
    second = (loop[2:] - 2 * loop[1:-1] + loop[:-2]).abs().mean(dim=(1, 2))  # (F,) the last two: the wrap
    excess = middle.diff().abs().sum() - (middle[-1] - middle[0]).abs()
    return torch.stack([excess, (middle.diff().abs() > 0.2).sum(), second[:-2].mean(),
                        second[-2:].mean() - second[:-2].mean(), torch.tensor(len(frames))]).double()


def summary(f):
    """Features (N, 5) -> shares: one clean jump, one big step, closed turn; median excess, mean roughness."""
    return {"one_clean_jump": float((f[:, 0] < 0.05).double().mean()), "excess": float(f[:, 0].median()),
            "one_big_step": float((f[:, 1] == 1).double().mean()), "roughness": float(f[:, 2].mean()),
            "closes": float((f[:, 3] < 0.05).double().mean())}  # a kink < 0.05: beyond every data video's


def frechet(a, b):
    """The Frechet distance between Gaussians fitted to the rows of a and b, |mu_a - mu_b|^2 +
    tr(C_a + C_b - 2 (C_a C_b)^(1/2)), where tr (C_a C_b)^(1/2) = tr (C_a^(1/2) C_b C_a^(1/2))^(1/2)."""
    if min(len(a), len(b)) < 2 or not (a.isfinite().all() and b.isfinite().all()):
        return math.nan  # one video, or videos too short for the features (fewer than 3 frames)
    ca, cb = a.T.cov(), b.T.cov()
    w, V = torch.linalg.eigh(ca)
    root = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T  # C_a^(1/2)
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross)


def quality(videos, seed=1_000_002):
    """Generated toy videos against as many data videos (two at least): the summary of both, and the Frechet
    distance of their features standardised by the data's spread, beside two data samples': its floor."""
    data = [sample_toy_videos(max(len(videos), 2), torch.Generator().manual_seed(seed + k)) for k in (0, 1)]
    ref, other = (torch.stack([features(v[:n]) for v, n in zip(*d)]) for d in data)
    gen = torch.stack([features(v) for v in videos])
    mu, sd = ref.mean(0), ref.std(0).clamp_min(0.05)
    fd = [frechet((f - mu) / sd, (ref - mu) / sd) for f in (gen, other)]
    return {**summary(gen), "data": summary(ref), "fd": fd[0], "fd_floor": fd[1]}
