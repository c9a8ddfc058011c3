"""The 3-pixel toy videos of Appendix F, and the length metrics of Figure 10.

A video has n frames, n uniform over LENGTHS = (15, 20, 25, 30). Each frame is (C, H, W) = (3, 1, 3):
three RGB pixels in a row, values in [-1, 1]. Per video, independently:

- outer pixels: two colours a, b ~ U([-1, 1]^3) and a start phase phi_0 ~ U(0, 2 pi). Frame f has
  phase phi_f = phi_0 + 2 pi f / n: exactly ONE rotation over the clip at constant speed, so the
  speed of the motion tells the length. The two outer pixels are the two ends of a colour gradient
  between a and b that rotates around a ring through them:
      left_f  = a + (b - a) (1 + cos phi_f) / 2,      right_f = a + (b - a) (1 - cos phi_f) / 2.
- middle pixel: grey (all three channels equal), g_0 for frames f < j and g_1 from frame j on, with
  the jump frame j ~ U{1, ..., n - 1} and g_0, g_1 ~ U(-1, 1): one discrete jump.

Batches are padded to 30 frames with zeros beyond n; the lengths, not the zeros, say what is real.
"""
import math

import torch

LENGTHS = (15, 20, 25, 30)
FRAME_SHAPE = (3, 1, 3)  # (C, H, W)


def length_probs():
    """The data law P(n) as a tensor indexed by n (zero outside LENGTHS)."""
    p = torch.zeros(max(LENGTHS) + 1, dtype=torch.float64)
    p[list(LENGTHS)] = 1 / len(LENGTHS)
    return p


def sample_toy_videos(batch_size, generator=None):
    """-> videos (B, 30, 3, 1, 3) float32, zero beyond each length; lengths (B,) long. Vectorised."""
    B, F = batch_size, max(LENGTHS)
    g = dict(generator=generator)
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
    valid = f < lengths[:, None]  # (B, F)
    return videos * valid[:, :, None, None, None], lengths


def length_metrics(lengths):
    """Generated lengths vs the data law. tv: total variation between the exact-length histogram and P(n);
    within1: the fraction of videos within +-1 frame of a data length; binned_tv: the TV after putting each
    video into its nearest data length if within +-2, else into an "outside" bin (near misses forgiven)."""
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


def roughness(frames):
    """Temporal roughness of a toy video (F, 3, 1, 3): mean |second difference| of the outer pixels.

    The data's outer pixels turn smoothly (about 0.01 to 0.05); a badly placed or badly denoised frame
    shows up as a kink. Lower is smoother.
    """
    outer = frames[:, :, 0, [0, 2]].double()  # (F, 3, 2)
    return float((outer[2:] - 2 * outer[1:-1] + outer[:-2]).abs().mean()) if len(outer) > 2 else 0.0


def jump_excess(frames):
    """How far the middle pixel is from one clean jump: total variation minus |last - first|.

    The data's middle pixel is grey g_0, then jumps once to g_1: exactly 0. Wobbles add to it.
    """
    middle = frames[:, :, 0, 1].double().mean(dim=1)  # (F,) grey level
    return float((middle[1:] - middle[:-1]).abs().sum() - (middle[-1] - middle[0]).abs())
