"""
Flowception: variable-length video generation that interleaves continuous flow-matching denoising of
frames with discrete, learned frame insertions (arXiv 2512.11438). Read this file top to bottom:

    config -> scheduler kappa -> extended-time training state -> losses -> DiT -> sampler
    (with the exact posterior-mean oracle the tests use) -> checkpoints

Conventions, used everywhere
----------------------------
time    t = 0 is noise, t = 1 is data:  x_t = t * x_1 + (1 - t) * x_0,  velocity target  x_1 - x_0.
shapes  B batch, F frames, C channels, H height, W width, L tokens per frame, D model width;
        in the DiT every frame also carries one rate token, so a video is N = F * (L + 1) tokens.
batches a set of variable-length videos is a padded tensor (B, F, C, H, W) plus a bool mask (B, F),
        True = a real frame. There is never a sentinel value inside the data.
extended time
        every frame i of a video gets an insertion time s_i = kappa^-1(u_i), u_i ~ U(0, 1) (start
        frames: s_i = 0). A global time tau_g in [0, 2] gives each frame tau_i = tau_g - s_i and its
        own flow time t_i = clip(tau_i, 0, 1). tau_i < 0: not inserted yet; 0 <= tau_i < 1: active
        (flowing); tau_i >= 1: clean and frozen. Insertions stop at tau_g = 1; the video is done when
        every frame is clean, at tau_g = 1 + max_i s_i <= 2.
rates   the model predicts, for every visible frame j, log lam_j, where lam_j estimates K_j, the number
        of frames still pending between frame j and the next visible frame (Corollary B.3). A pending
        frame is revealed between global times a < b with probability reveal_prob(a, b).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from einops import rearrange
from torch import nn

#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass(frozen=True)
class Config:
    """Everything a run needs: data geometry, model size, Flowception knobs and training schedule."""

    # data: frames are (channels, height, width); `data` names the source train.py reads
    data: str = "toy"
    channels: int = 3
    height: int = 1
    width: int = 3
    max_frames: int = 30  # longest video in the data (sample.py caps generation at 2x this)
    # model (Section 6)
    patch: tuple = (1, 3)  # (ph, pw): one token per toy frame
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    window: int = 0  # local attention over +-window frames; 0 = full attention
    # Not in the paper: add an embedding of the current frame count m to every frame's adaLN input.
    # The exact rate of an uninformative video is a sharp function of m and t_g (PosteriorMeanOracle);
    # with relative (RoPE) positions only, the DiT must learn to count, and on the toy it did not
    # within minutes: its late rates came out flat in m. False gives the paper's architecture.
    count_embedding: bool = True
    # Flowception
    kappa: str = "linear"  # a name in KAPPAS
    n_start: int = 1
    tau_density: str = "uniform"  # law of tau_g on [0, 2]: "uniform", "logit_normal" or "late"
    rate_weight: float = 1.0  # total loss = velocity + rate_weight * insertion
    hazard_weight: bool = False
    # training
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 250
    ckpt_every: int = 1000

    def __post_init__(self):
        positive = ("channels", "height", "width", "max_frames", "dim", "depth", "heads", "n_start",
                    "steps", "batch_size", "log_every", "ckpt_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "mlp_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("window", "warmup", "weight_decay", "grad_clip", "rate_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.n_start > self.max_frames:
            raise ValueError(f"n_start={self.n_start} exceeds max_frames={self.max_frames}")

    def make_kappa(self):
        if self.kappa not in KAPPAS:
            raise ValueError(f"kappa must be one of {sorted(KAPPAS)}, got {self.kappa!r}")
        return KAPPAS[self.kappa]()

    @classmethod
    def from_dict(cls, d):
        """Inverse of dataclasses.asdict, for configs stored in checkpoints."""
        return cls(**{**d, "patch": tuple(d["patch"])})


PRESETS = {
    # 3-pixel toy videos of Appendix F; 0.35M parameters; trains on 2 CPU cores in about 4 minutes.
    "toy": Config(steps=2000, batch_size=32, lr=2e-3, tau_density="late"),
    # the paper's 256 px Tai-Chi config over 128-channel LTX latents at 8x8: 1,627,827,073 parameters
    # (1,625,074,561 without the count embedding; the paper's "2.1B" adds a joint-attention text
    # stream and a SwiGLU MLP, see README).
    "taichi256": Config(data="latents", channels=128, height=8, width=8, max_frames=19, patch=(1, 1),
                        dim=1536, depth=38, heads=24, batch_size=8, lr=1e-4, warmup=1000,
                        steps=300_000, tau_density="logit_normal", ema_decay=0.9999),
}


#################################################################################
#                              Scheduler kappa                                  #
#################################################################################


def _check_unit(x, name):
    """Raise a ValueError naming `name` unless every entry of x lies in [0, 1]."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.numel() and (x.min() < 0 or x.max() > 1 or x.isnan().any()):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")


class Kappa:
    """An insertion scheduler kappa: [0, 1] -> [0, 1], increasing, kappa(0) = 0, kappa(1) = 1 (Eq. 3).

    kappa(t) is the probability that a frame with insertion time s ~ kappa^-1(U) is visible at time
    t. Subclasses define kappa, dkappa and inverse; hazard and reveal_prob follow (Lemma B.1).
    All methods take and return tensors, elementwise.
    """

    def hazard(self, t):
        """Instantaneous reveal rate of a pending frame: dkappa / (1 - kappa) (Eq. 19)."""
        return self.dkappa(t) / (1 - self.kappa(t))

    def reveal_prob(self, t0, t1):
        """P(a frame still pending at t0 is revealed by t1) = (kappa(t1) - kappa(t0)) / (1 - kappa(t0)).

        Exact for any step size; for linear kappa it is h / (1 - t), which is the paper's
        h * dkappa / (1 - kappa). Defined as 1 at t0 = 1 (nothing can still be pending there).
        """
        t0, t1 = torch.as_tensor(t0), torch.as_tensor(t1)
        _check_unit(t0, "t0"), _check_unit(t1, "t1")
        k0, k1 = self.kappa(t0), self.kappa(t1)
        return torch.where(k0 < 1, (k1 - k0) / (1 - k0).clamp_min(1e-30), torch.ones_like(k0))


class LinearKappa(Kappa):
    """kappa(t) = t, the paper's default: insertion times are uniform on [0, 1]."""

    def kappa(self, t):
        _check_unit(t, "t")
        return torch.as_tensor(t) * 1.0

    def dkappa(self, t):
        _check_unit(t, "t")
        return torch.ones_like(torch.as_tensor(t) * 1.0)

    def inverse(self, u):
        _check_unit(u, "u")
        return torch.as_tensor(u) * 1.0


@dataclass(frozen=True)
class PolyKappa(Kappa):
    """kappa(t) = t^p. p > 1 inserts late (most frames appear near t = 1), p < 1 inserts early."""

    p: float = 2.0

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"PolyKappa: p must be > 0, got {self.p}")

    def kappa(self, t):
        _check_unit(t, "t")
        return torch.as_tensor(t) ** self.p

    def dkappa(self, t):
        _check_unit(t, "t")
        return self.p * torch.as_tensor(t) ** (self.p - 1)

    def inverse(self, u):
        _check_unit(u, "u")
        return torch.as_tensor(u) ** (1 / self.p)


class CosineKappa(Kappa):
    """kappa(t) = 1 - cos(pi t / 2): slow start, fast finish."""

    def kappa(self, t):
        _check_unit(t, "t")
        return 1 - torch.cos(torch.as_tensor(t) * math.pi / 2)

    def dkappa(self, t):
        _check_unit(t, "t")
        return math.pi / 2 * torch.sin(torch.as_tensor(t) * math.pi / 2)

    def inverse(self, u):
        _check_unit(u, "u")
        return torch.acos(1 - torch.as_tensor(u)) * 2 / math.pi


KAPPAS = {"linear": LinearKappa, "poly": PolyKappa, "cosine": CosineKappa}

#################################################################################
#                  Training state in extended time (Eqs. 6-10, Alg. 2)          #
#################################################################################


@dataclass
class TrainingState:
    """Where every frame of a batch of videos stands at global time tau_g. Indexed by ORIGINAL frame."""

    tau_g: torch.Tensor  # (B,)    global extended time in [0, 2)
    tau: torch.Tensor  # (B, F)    per-frame extended time tau_g - s_i
    t: torch.Tensor  # (B, F)      per-frame flow time clip(tau, 0, 1)
    visible: torch.Tensor  # (B, F) bool, inserted by tau_g (tau >= 0)
    active: torch.Tensor  # (B, F) bool, visible and still flowing (tau < 1)
    K: torch.Tensor  # (B, F)      long, pending frames right of each visible frame (0 elsewhere)
    valid: torch.Tensor  # (B, F)  bool, i < n_b


def sample_tau_g(n, density="uniform", generator=None, device=None):
    """Global time tau_g in [0, 2): uniform, logit-normal N(0, 1) through 2 sigmoid, or 'late'.

    The density only decides how often each time is trained: the law of the state GIVEN tau_g (what
    the sampler must match) is the same for all. 'late' puts more of the insertion phase near
    t_g = 1, where the last few insertions decide whether a video lands on a valid length.
    """
    if density == "uniform":
        return 2 * torch.rand(n, generator=generator, device=device)
    if density == "logit_normal":
        return 2 * torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if density == "late":  # half on [0, 1) with density 1 / (2 sqrt(1 - t)), half uniform on [1, 2)
        u, coin = torch.rand(2, n, generator=generator, device=device)
        return torch.where(coin < 0.5, 1 - (1 - u) ** 2, 1 + u)
    raise ValueError(f"tau_density must be 'uniform', 'logit_normal' or 'late', got {density!r}")


def pending_counts(visible, valid):
    """K_j: deleted frames between visible frame j and the next visible frame (or the video's end).

    Every deleted frame belongs to the last visible frame on its left (frame 0 is always visible).
    """
    B, F = visible.shape
    idx = torch.arange(F, device=visible.device).expand(B, F)
    owner = torch.where(visible, idx, -1).cummax(dim=1).values  # (B, F) last visible at or before i
    deleted = (valid & ~visible).long()
    return torch.zeros_like(deleted).scatter_add_(1, owner.clamp_min(0), deleted)


def sample_training_state(lengths, kappa=None, n_start=1, tau_g=None, generator=None,
                          tau_density="uniform"):
    """Draw the extended-time state of a batch of videos (Section 4 of the spec; Algorithm 2).

    lengths: (B,) long, n_b >= n_start. tau_g: None (drawn from `tau_density`), a float or a (B,)
    tensor fixing the global time, e.g. to compare laws at a given time in the tests.

    1. s_i = kappa^-1(u_i) (Eq. 6). Frame 0 and n_start - 1 further frames, uniformly among 1..n-1,
       are start frames with s_i = 0: nothing can ever be inserted left of frame 0.
    2. tau_i = tau_g - s_i, t_i = clip(tau_i, 0, 1) (Eqs. 7-8).
    3. A row where no frame is active is a state the sampler never visits (it stops once every frame
       is clean). Such rows redraw (tau_g, s) TOGETHER, which conditions the joint law on "not
       finished". The paper's shortcut tau_g ~ U(0, max_i s_i + 1) instead tilts the law of s by
       1 / (max_i s_i + 1), so that training and sampling marginals differ (tested).
    """
    kappa = kappa or LinearKappa()
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.ndim != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty 1-d tensor, got shape {tuple(lengths.shape)}")
    if n_start < 1:
        raise ValueError(f"n_start must be >= 1, got {n_start}")
    if lengths.min() < n_start:
        raise ValueError(f"lengths must all be >= n_start={n_start}, got min {lengths.min().item()}")
    device, B, F = lengths.device, lengths.numel(), int(lengths.max())
    fixed = tau_g is not None
    if fixed:
        tau_g = torch.as_tensor(tau_g, dtype=torch.float32, device=device).expand(B).clone()
        if tau_g.min() < 0 or tau_g.max() >= 2:
            raise ValueError("a fixed tau_g must lie in [0, 2)")
        if ((tau_g >= 1) & (lengths == n_start)).any():  # every frame is a start frame: all clean
            raise ValueError("a fixed tau_g >= 1 needs lengths > n_start: otherwise no frame is active")
    else:
        tau_g = torch.empty(B, device=device)
    valid = torch.arange(F, device=device) < lengths[:, None]  # (B, F)
    s = torch.empty(B, F, device=device)
    redraw = torch.ones(B, dtype=torch.bool, device=device)
    while redraw.any():  # rejection: a shrinking set of rows, vectorised within each round
        rows = redraw.nonzero().squeeze(1)
        R = rows.numel()
        s_r = kappa.inverse(torch.rand(R, F, generator=generator, device=device))  # Eq. (6)
        score = torch.rand(R, F, generator=generator, device=device)  # uniform start subset
        score[:, 0] = -1.0  # frame 0 always ranks first
        score[~valid[rows]] = 2.0  # padding ranks last
        rank = score.argsort(dim=1).argsort(dim=1)  # (R, F) each frame's rank by score
        start = rank < n_start  # frame 0 plus n_start - 1 random real frames
        s[rows] = torch.where(start, 0.0, s_r)
        if not fixed:
            tau_g[rows] = sample_tau_g(R, tau_density, generator, device)
        tau_r = tau_g[rows, None] - s[rows]  # (R, F)
        redraw[rows] = ~(valid[rows] & (tau_r >= 0) & (tau_r < 1)).any(dim=1)
    tau = tau_g[:, None] - s  # (B, F)  Eq. (7)
    visible = valid & (tau >= 0)
    return TrainingState(tau_g=tau_g, tau=tau, t=tau.clamp(0, 1), visible=visible,
                         active=visible & (tau < 1), K=pending_counts(visible, valid), valid=valid)


def strip_index(keep):
    """Indices that move the kept frames of each row to the front, in order, and their mask.

    keep: (B, F) bool -> index (B, F') long, mask (B, F') bool, F' = max kept count (f_strip, Alg. 2).
    """
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept frames first
    n = keep.sum(dim=1)
    Fp = max(int(n.max()), 1)
    return order[:, :Fp], torch.arange(Fp, device=keep.device) < n[:, None]


def gather_frames(x, index):
    """x (B, F, ...) gathered along frames with index (B, F') -> (B, F', ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


@dataclass
class TrainingBatch:
    """What the model sees: the visible frames of each video, stripped to the front and padded."""

    x_t: torch.Tensor  # (B, F', C, H, W) noisy visible frames, Eq. (10)
    cond: torch.Tensor  # (B, F', C, H, W) conditioning stream (clean context frames, else zeros)
    t: torch.Tensor  # (B, F')           per-frame flow time
    mask: torch.Tensor  # (B, F')        bool, real frame
    target: torch.Tensor  # (B, F', C, H, W) velocity target x_1 - x_0
    active: torch.Tensor  # (B, F')      bool, frame still flowing: velocity loss
    can_insert: torch.Tensor  # (B, F')  bool, slot that may insert, rate loss while tau_g < 1
    K: torch.Tensor  # (B, F')           long, pending count right of each slot
    tau_g: torch.Tensor  # (B,)


def make_training_batch(x_1, state, generator=None):
    """Noise the clean videos x_1 (B, F, C, H, W) at the state's times and strip deleted frames."""
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
    t = state.t.to(x_1.dtype)[:, :, None, None, None]  # (B, F, 1, 1, 1)
    x_t = t * x_1 + (1 - t) * x_0  # (B, F, C, H, W)  Eq. (10)
    index, mask = strip_index(state.visible)
    visible_only = lambda z: gather_frames(z, index)  # noqa: E731  (B, F, ...) -> (B, F', ...)
    x_t = visible_only(x_t)
    return TrainingBatch(x_t=x_t, cond=torch.zeros_like(x_t), t=visible_only(state.t), mask=mask,
                         target=visible_only(x_1 - x_0), active=visible_only(state.active) & mask,
                         can_insert=mask & (state.tau_g < 1)[:, None], K=visible_only(state.K) * mask,
                         tau_g=state.tau_g)


#################################################################################
#                             Losses (Eqs. 12, 20, 24)                          #
#################################################################################


def velocity_loss(v, batch):
    """Squared error to x_1 - x_0 on active frames, mean over ALL active frames of the batch (Eq. 12).

    A per-video mean over-weights videos with few active frames and biases towards under-insertion
    (paper, Appendix E).
    """
    err = (v.float() - batch.target.float()).pow(2).flatten(2).mean(dim=2)  # (B, F')
    err = torch.where(batch.active, err, 0.0)  # where, not a product: padding may hold inf
    return err.sum() / batch.active.sum().clamp_min(1)


def rate_loss(log_lam, batch, kappa=None, hazard_weight=False):
    """Poisson NLL lam - K log lam on insertion-capable slots while tau_g < 1 (Eqs. 20, 24).

    Computed from log lam in fp32 (lam = exp(log lam), Eq. 11): no log(exp(x) + eps). Its minimiser
    is E[K_j | x_t] (Corollary B.3). hazard_weight multiplies each slot by dkappa/(1-kappa) at tau_g
    (Eq. 19); off by default, as the paper recommends.
    """
    log_lam = log_lam.float()
    nll = log_lam.exp() - batch.K.float() * log_lam  # (B, F')
    if hazard_weight:
        kappa = kappa or LinearKappa()
        nll = nll * kappa.hazard(batch.tau_g.clamp(0, 1 - 1e-4).float())[:, None]
    nll = torch.where(batch.can_insert, nll, 0.0)  # where, not a product: padding may hold inf
    return nll.sum() / batch.can_insert.sum().clamp_min(1)


#################################################################################
#                  Model: a DiT with per-frame time (Section 3.4)               #
#################################################################################


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """A scalar -> D: sinusoidal features of scale * value, then an MLP (as in DiT).

    Used with scale 1000 for the per-frame flow time t in [0, 1] and scale 1 for frame counts.
    """

    def __init__(self, dim, scale=1000.0, freq_dim=256):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (...) -> (..., D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)  # (half,)
        angles = self.scale * t.float()[..., None] * freqs  # (..., half)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def rope_split(head_dim):
    """Head channels per RoPE axis (frame, h, w): each even; h and w get about a third each."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(pos, head_dim, base=10_000.0):
    """pos (..., 3) positions over (frame, h, w) -> angles (..., head_dim / 2), one block per axis."""
    out = []
    for axis, d in enumerate(rope_split(head_dim)):
        freqs = base ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)  # (d/2,)
        out.append(pos[..., axis, None].float() * freqs)
    return torch.cat(out, dim=-1)


def apply_rope(x, cos, sin):
    """Rotate channel pairs of x (B, heads, N, hd) by angles given as cos, sin (B, 1, N, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, h, N, hd/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE; masks come from the caller."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, attn_mask):  # x (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # (B, h, N, hd)
        out = nnf.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: each frame's time embedding sets shift, scale and gate for all its tokens."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin, attn_mask):  # x (B, F, L+1, D), c (B, F, D)
        mod = self.adaLN_modulation(c)[:, :, None].chunk(6, dim=-1)  # 6 x (B, F, 1, D), once per frame
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, F, L+1, D) what attention sees
        x = x + gate_msa * self.attn(h.flatten(1, 2), cos, sin, attn_mask).view_as(x)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class Flowception(nn.Module):
    """model(x_t, t, mask, cond) -> (v, log_lam): velocity for every frame and log insertion rate per slot.

    Each frame is patchified over 2C channels (noisy + conditioning stream) into L tokens, plus one
    learned rate token (shared, replicated per frame); attention runs over all tokens of all real
    frames (optionally only within +-window frames). A final adaLN layer modulates every token by its
    frame's conditioning; then a linear map gives v from the patch tokens and a small MLP gives
    log lam from the rate token (lam = exp, Eq. 11).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ph, pw = cfg.patch
        if cfg.height % ph or cfg.width % pw:
            raise ValueError(f"patch {cfg.patch} must divide the frame size {(cfg.height, cfg.width)}")
        if cfg.dim % cfg.heads or (cfg.dim // cfg.heads) % 2:
            raise ValueError(f"dim={cfg.dim} must split into {cfg.heads} heads of even size")
        patch_dim = 2 * cfg.channels * ph * pw
        self.x_embedder = nn.Linear(patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.count_embedder = TimestepEmbedder(cfg.dim, scale=1.0) if cfg.count_embedding else None
        self.rate_token = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final_linear = nn.Linear(cfg.dim, cfg.channels * ph * pw)
        self.rate_head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 1))
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears, then adaLN-Zero (every gate and the velocity head start at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.rate_token, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.count_embedder is not None:
            nn.init.normal_(self.count_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.count_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.final_linear, self.rate_head[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def positions(self, F, device):
        """RoPE positions (F, L+1, 3): (frame index, h, w); the rate token sits at the frame's centre."""
        hp, wp = self.cfg.height // self.cfg.patch[0], self.cfg.width // self.cfg.patch[1]
        f, h, w = torch.meshgrid(torch.arange(F), torch.arange(hp), torch.arange(wp), indexing="ij")
        patches = torch.stack([f, h, w], dim=-1).flatten(1, 2).float()  # (F, L, 3)
        centre = torch.stack([torch.arange(F).float(), torch.full((F,), (hp - 1) / 2), torch.full((F,), (wp - 1) / 2)], -1)
        return torch.cat([patches, centre[:, None]], dim=1).to(device)  # (F, L+1, 3)

    def attention_mask(self, mask, L1):
        """(B, 1, N, N) bool: keys must be real frames (and within +-window frames of the query)."""
        keys = mask.repeat_interleave(L1, dim=1)[:, None, None, :]  # (B, 1, 1, N)
        if not self.cfg.window:
            return keys
        frame = torch.arange(mask.shape[1], device=mask.device).repeat_interleave(L1)  # (N,)
        return keys & ((frame[:, None] - frame[None, :]).abs() <= self.cfg.window)  # (B, 1, N, N)

    def forward(self, x_t, t, mask, cond):
        cfg = self.cfg
        B, F = mask.shape
        ph, pw = cfg.patch
        z = torch.cat([x_t, cond], dim=2)  # (B, F, 2C, H, W)
        tokens = rearrange(z, "b f c (h p) (w q) -> b f (h w) (p q c)", p=ph, q=pw)
        x = self.x_embedder(tokens.to(self.x_embedder.weight.dtype))  # (B, F, L, D)
        x = torch.cat([x, self.rate_token.to(x.dtype).expand(B, F, 1, -1)], dim=2)  # (B, F, L+1, D)
        L1 = x.shape[2]
        c = self.t_embedder(t)  # (B, F, D) per-frame time embedding
        if self.count_embedder is not None:  # how many frames the video has now (see Config)
            c = c + self.count_embedder(mask.sum(dim=1))[:, None]  # (B, F, D)
        angles = rope_angles(self.positions(F, x.device), cfg.dim // cfg.heads).flatten(0, 1)  # (N, hd/2)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, N, hd/2)
        attn_mask = self.attention_mask(mask, L1)
        for block in self.blocks:
            x = block(x, c, cos, sin, attn_mask)  # (B, F, L+1, D)
        shift, scale = self.final_modulation(c)[:, :, None].chunk(2, dim=-1)  # (B, F, 1, D)
        x = modulate(self.final_norm(x), shift, scale)  # (B, F, L+1, D) final adaLN, rate token too
        out = self.final_linear(x[:, :, :-1])  # (B, F, L, p*q*C)
        v = rearrange(out, "b f (h w) (p q c) -> b f c (h p) (w q)", h=cfg.height // ph, p=ph, q=pw)
        log_lam = self.rate_head(x[:, :, -1]).squeeze(-1)  # (B, F)
        return v.to(x_t.dtype), log_lam.float()


def build_model(cfg):
    """The DiT for a config. Works under `with torch.device("meta")` to count parameters for free."""
    return Flowception(cfg)


#################################################################################
#                       Sampler (Algorithm 1, Appendix B.3)                     #
#################################################################################


def time_grid(kappa, steps, max_reveal_prob=0.1, floor=1e-4):
    """The global times t_0 = 0 < t_1 < ... = 1 at which the sampler evaluates the model before t_g = 1.

    Each step is h = 1 / steps, or shorter where a step of h would reveal more than `max_reveal_prob`
    of the still pending frames; once 1 - kappa < floor the last step goes to 1. With uniform steps
    (Algorithm 1, max_reveal_prob = 1) the last step reveals every pending frame at once without the
    model seeing any of them, which is what skews the length law at small budgets.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < max_reveal_prob <= 1:
        raise ValueError(f"max_reveal_prob must be in (0, 1], got {max_reveal_prob}")
    kap = lambda t: float(kappa.kappa(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    grid = [0.0]
    while grid[-1] < 1:
        t = grid[-1]
        nxt = t + 1 / steps
        nxt = 1.0 if nxt > 1 - 1e-9 else nxt  # no sliver step from accumulated rounding
        if max_reveal_prob < 1:
            if 1 - kap(t) < floor:
                nxt = 1.0
            elif (kap(nxt) - kap(t)) / (1 - kap(t)) > max_reveal_prob:  # cap binds: reveal exactly the cap,
                u = 1 - (1 - max_reveal_prob) * (1 - kap(t))  # i.e. 1 - kappa shrinks by (1 - cap)
                nxt = float(kappa.inverse(torch.tensor(min(u, 1.0), dtype=torch.float64)))
        grid.append(nxt)
    return grid


@dataclass
class SamplerState:
    """The batch being generated, handed to `callback` after every step."""

    x: torch.Tensor  # (B, F, C, H, W)
    t: torch.Tensor  # (B, F)           per-frame flow time
    mask: torch.Tensor  # (B, F)        bool, real frame
    insert_time: torch.Tensor  # (B, F) global time at which the frame was inserted (0: start frame)
    t_g: float  # global time after this step (keeps growing past 1 while frames finish)
    step: int  # number of model evaluations so far
    refused: torch.Tensor  # (B,)       insertions refused so far by the max_frames cap


@dataclass
class Sample:
    """One generated video."""

    frames: torch.Tensor  # (F_i, C, H, W)
    insert_time: torch.Tensor  # (F_i,)
    nfe: int  # model evaluations until this video was finished
    refused: int  # insertions refused by the max_frames cap


def insert_frames(state, n_new, t_g, max_frames, generator=None):
    """Insert n_new[b, j] pure-noise frames (t = 0) right after frame j of row b, all rows at once.

    This is Algorithm 1's ins(X, j, eps) for every slot in parallel; inserted frames record t_g.

    Insertions that would take a video past max_frames are refused, leftmost slots first served; real
    frames are never evicted. Returns the new state; state.refused counts what was refused.
    """
    x, t, mask = state.x, state.t, state.mask
    B, F = mask.shape
    n_new = n_new.long() * mask
    n = mask.sum(dim=1)  # (B,)
    budget = (max_frames - n).clamp_min(0)  # (B,)
    before = n_new.cumsum(dim=1) - n_new  # (B, F) insertions requested left of slot j
    kept = (budget[:, None] - before).clamp_min(0).minimum(n_new)  # (B, F)
    shift = kept.cumsum(dim=1) - kept  # (B, F) frames inserted before old frame j
    n_total = n + kept.sum(dim=1)
    F_new = int(n_total.max())
    rows = torch.arange(B, device=x.device)[:, None].expand(B, F)[mask]
    pos = (torch.arange(F, device=x.device) + shift)[mask]  # where each old frame goes
    x_new = torch.randn((B, F_new, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
    t_frames = torch.zeros(B, F_new, device=x.device, dtype=t.dtype)  # new frames start at t = 0
    ins = torch.full((B, F_new), t_g, device=x.device, dtype=state.insert_time.dtype)
    x_new[rows, pos], t_frames[rows, pos], ins[rows, pos] = x[mask], t[mask], state.insert_time[mask]
    mask_new = torch.arange(F_new, device=x.device) < n_total[:, None]
    return SamplerState(x=x_new * mask_new[..., None, None, None], t=t_frames, mask=mask_new,
                        insert_time=ins * mask_new, t_g=t_g, step=state.step,
                        refused=state.refused + (n_new - kept).sum(dim=1))


@torch.no_grad()
def generate(model, num_videos, frame_shape, kappa=None, n_start=1, steps=100, sampler="poisson",
             max_reveal_prob=0.1, max_frames=64, generator=None, callback=None, device=None,
             dtype=torch.float32):
    """Generate variable-length videos: interleave Euler flow steps with frame insertions (Alg. 1).

    model: any callable model(x_t, t, mask, cond) -> (v, log_lam), shapes as in the module docstring.
    Each step, for all videos at once:
      1. one forward pass -> v, log lam;
      2. flow (Eq. 4): every unfinished frame moves by dt_i = min(dt, 1 - t_i): x_i += dt_i v_i;
      3. while t_g < 1: insertions right of every frame with p = reveal_prob(t_g, t_g + dt):
         'bernoulli' (Alg. 1) one frame w.p. min(1, lam_j p); 'poisson' (App. B.3) Poisson(lam_j p);
         inserted frames are N(0, I) with t = 0;
      4. t_g advances along `time_grid` (steps of 1/steps, capped reveal probability), then by
         h = 1/steps once t_g >= 1; the loop ends when every frame is clean.
    max_reveal_prob = 1 gives exactly Algorithm 1's uniform grid. Returns a list of `Sample`.
    """
    kappa = kappa or LinearKappa()
    if sampler not in ("poisson", "bernoulli"):
        raise ValueError(f"sampler must be 'poisson' or 'bernoulli', got {sampler!r}")
    if n_start < 1:
        raise ValueError(f"n_start must be >= 1, got {n_start}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if max_frames < n_start:
        raise ValueError(f"max_frames must be >= n_start={n_start}, got {max_frames}")
    grid = time_grid(kappa, steps, max_reveal_prob)  # also validates steps and max_reveal_prob
    h = 1.0 / steps
    B = num_videos
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    shape = (B, n_start, *frame_shape)
    state = SamplerState(x=torch.randn(shape, generator=generator, device=device, dtype=dtype),
                         t=torch.zeros(B, n_start, device=device), mask=torch.ones(B, n_start, dtype=torch.bool, device=device),
                         insert_time=torch.zeros(B, n_start, device=device), t_g=0.0, step=0,
                         refused=torch.zeros(B, dtype=torch.long, device=device))
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    k = 0  # grid index: grid[k] == state.t_g while t_g < 1 (the insertion phase)
    while True:
        unfinished = ((state.t < 1) & state.mask).any(dim=1)  # (B,)
        if state.t_g >= 1 and not unfinished.any():
            break
        # 1. one forward pass
        x, t, mask = state.x, state.t, state.mask
        v, log_lam = model(x, t, mask, torch.zeros_like(x))
        if v.shape != x.shape or log_lam.shape != mask.shape:
            raise ValueError(f"model returned v {tuple(v.shape)} and log_lam {tuple(log_lam.shape)}; "
                             f"expected {tuple(x.shape)} and {tuple(mask.shape)}")
        nfe += unfinished | (state.t_g < 1)  # a video counts the evaluations until it is clean
        # 2. flow step, Eq. (4); a frame reaching t = 1 takes exactly the remaining 1 - t_i
        t_next = grid[k + 1] if state.t_g < 1 else state.t_g + h
        dt = t_next - state.t_g
        finishes = (dt >= (1 - t) - 1e-6) & mask  # 1e-6: float slack so k * h lands on 1
        dt_i = torch.where(finishes, 1 - t, torch.full_like(t, dt)) * mask  # (B, F)
        moving = (dt_i > 0)[..., None, None, None]  # frozen and padded frames ignore v (even NaN)
        x = torch.where(moving, x + dt_i[..., None, None, None].to(x.dtype) * v, x)
        t = torch.where(finishes, torch.ones_like(t), t + dt_i)
        state = SamplerState(x=x, t=t, mask=mask, insert_time=state.insert_time, t_g=t_next,
                             step=state.step + 1, refused=state.refused)
        # 3. insertions to the right of every frame, while t_g < 1 (Alg. 1 line 9; Eq. (34))
        if k + 1 < len(grid):
            p = float(kappa.reveal_prob(torch.tensor(grid[k]), torch.tensor(grid[k + 1])))
            rate = torch.where(mask, log_lam.float().exp() * p, 0.0)  # (B, F) expected insertions per slot
            if sampler == "poisson":
                n_new = torch.poisson(rate, generator=generator)
            else:
                n_new = torch.bernoulli(rate.clamp(max=1), generator=generator)
            state = insert_frames(state, n_new, t_next, max_frames, generator)
            k += 1
        if callback is not None:
            callback(state)
    return [Sample(frames=state.x[b, state.mask[b]], insert_time=state.insert_time[b, state.mask[b]],
                   nfe=int(nfe[b]), refused=int(state.refused[b])) for b in range(B)]


class PosteriorMeanOracle:
    """The exact rate for videos whose frames carry no information: lam_j = E[K_j | m visible, t_g].

    For a known length law P(n), a state with m visible frames at t_g < 1 has
    P(n | m, t_g) ∝ P(n) Binom(m - n_start; n - n_start, kappa(t_g)), and because the visible set is
    a uniform subset, the n - m pending frames are spread exchangeably over the m slots:
    E[K_j | m, t_g] = E[(n - m) / m | m, t_g]. t_g is read off the input as the largest frame time
    (a start frame has t = t_g before 1). The velocity is 0. Used by the tests and `sample.py --oracle`.
    """

    def __init__(self, length_probs, kappa=None, n_start=1):
        self.p = torch.as_tensor(length_probs, dtype=torch.float64)  # (N_max + 1,) P(n)
        self.p = self.p / self.p.sum()
        self.kappa, self.n_start = kappa or LinearKappa(), n_start

    def __call__(self, x_t, t, mask, cond):
        m = mask.sum(dim=1).double()[:, None]  # (B, 1)
        t_g = torch.where(mask, t, 0.0).amax(dim=1).double().clamp(1e-9, 1 - 1e-9)
        k = self.kappa.kappa(t_g)[:, None]  # (B, 1)
        p = self.p.to(t.device)
        n = torch.arange(len(p), dtype=torch.float64, device=t.device)[None]  # (1, N) candidate lengths
        trials, hits = n - self.n_start, m - self.n_start  # Binom(hits; trials, kappa(t_g))
        ok = (hits <= trials) & (p[None] > 0)
        logpost = (p.log()[None] + torch.lgamma(trials.clamp_min(0) + 1) - torch.lgamma(hits + 1)
                   - torch.lgamma((trials - hits).clamp_min(0) + 1) + torch.xlogy(hits, k) + torch.xlogy(trials - hits, 1 - k))
        post = torch.softmax(torch.where(ok, logpost, -math.inf), dim=1).nan_to_num(0.0)  # (B, N)
        lam = (post * (n - m).clamp_min(0) / m).sum(dim=1)  # (B,)
        log_lam = lam.clamp_min(1e-12).log().float()[:, None].expand(mask.shape)
        return torch.zeros_like(x_t), log_lam


#################################################################################
#                                 Checkpoints                                   #
#################################################################################


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict (plain tensors and data, loaded with weights_only=True) or a one-line error."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist (train one with `python train.py`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise ValueError(f"checkpoint {path} is not a readable checkpoint ({type(e).__name__})") from None
    missing = {"model", "ema", "config", "step", "preset"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt
