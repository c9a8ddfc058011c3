"""
Flowception: variable-length video generation that interleaves continuous flow-matching denoising of
frames with discrete, learned frame insertions (arXiv 2512.11438). Read this file top to bottom:

    config -> scheduler kappa -> extended-time training state (with context patterns) -> losses
    -> DiT -> sampler (prompts, guidance, gamma, insertion orders; the exact posterior-mean oracle
    the tests use) -> LTX-Video latents and mp4 -> checkpoints

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
import fractions
import functools
import glob
import heapq
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from tqdm import tqdm

#################################################################################
#                                   Config                                      #
#################################################################################


# Context patterns (Figure 4). A context frame is clean (t = 1), is given in both the noisy and the
# conditioning stream, never moves, and is active (may insert to its right) or passive (may not).
TASKS = {
    "uncond": "no context",
    "i2v": "frame 0 is an active context frame",
    "interp": "first and last frame (passive) and 0-2 active anchors in between (not frame 1); the gaps are not given",
    "extend": "a given first clip of 2..n/2 frames, passive except its last frame (video continuation)",
}


def parse_tasks(spec):
    """'uncond:2,i2v:1' -> {'uncond': 2.0, 'i2v': 1.0}; a bare name has weight 1."""
    mix = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in {spec!r}; tasks are {', '.join(TASKS)}")
        try:
            mix[name] = float(weight or 1)
        except ValueError:
            raise ValueError(f"task weight {weight!r} in {spec!r} is not a number") from None
        if mix[name] < 0:
            raise ValueError(f"task weights must be >= 0, got {spec!r}")
    if sum(mix.values()) <= 0:
        raise ValueError(f"task mix {spec!r} has no positive weight")
    return mix


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
    attention: str = "sdpa"  # "sdpa": a dense bool mask; "flex": FlexAttention with a BlockMask (for CUDA)
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
    # tasks (Section 3.4): the context pattern of each training video is drawn from this mix of
    # TASKS, e.g. "uncond:2,i2v:1,interp:1"; cond_dropout blanks the context (for guidance, Eq. 13)
    tasks: str = "uncond"
    cond_dropout: float = 0.0
    full_sequence: bool = False  # the baseline: every frame a start frame, no insertions
    gamma: float = 1.0  # per-frame time t = clip(tau, 0, 1)^gamma in training and sampling (Appendix E)
    # training
    steps: int = 3000
    batch_size: int = 64  # videos per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per process and step
    pack: int = 0  # pack the training videos into rows of this many frames, several per row; 0: pad each
    #                (one video per row, padded to the batch's longest). Rows grow to the longest video.
    compile: bool = False  # torch.compile every block (for CUDA; on CPU it needs a C++ compiler)
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward
    fsdp: bool = False  # shard parameters, gradients, optimizer state and EMA block by block (FSDP2)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 250
    ckpt_every: int = 1000  # 0: never write checkpoints (measurements)

    def __post_init__(self):
        positive = ("channels", "height", "width", "max_frames", "dim", "depth", "heads", "n_start",
                    "steps", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "mlp_ratio", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("window", "pack", "warmup", "weight_decay", "grad_clip", "rate_weight", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        parse_tasks(self.tasks)
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {self.attention!r}")
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
    # 3-pixel toy videos of Appendix F; 0.35M parameters; trains on 2 CPU cores in about 3 minutes.
    "toy": Config(steps=2000, batch_size=32, lr=2e-3, tau_density="late", pack=30),
    # the same toy trained on every task of Figure 4 (unconditional, image-to-video, interpolation,
    # continuation), with conditioning dropout for guidance; about 7 minutes on 2 CPU cores.
    "toy_tasks": Config(steps=3000, batch_size=32, lr=2e-3, tau_density="late", pack=30,
                        tasks="uncond:1,i2v:1,interp:1,extend:1", cond_dropout=0.1),
    # the paper's 256 px Tai-Chi config over 128-channel LTX latents at 8x8: 1,627,827,073 parameters
    # (1,625,074,561 without the count embedding; the paper's "2.1B" adds a joint-attention text
    # stream and a SwiGLU MLP, see README).
    # the latent path end to end on a CPU: LTX latents of 64 px clips (2x2, up to 65 frames), tiny DiT
    "latent_tiny": Config(data="latents", channels=128, height=2, width=2, max_frames=9, patch=(1, 1), dim=64,
                          depth=2, heads=4, steps=200, batch_size=8, lr=1e-3, warmup=20, pack=9),
    "taichi256": Config(data="latents", channels=128, height=8, width=8, max_frames=19, patch=(1, 1),
                        dim=1536, depth=38, heads=24, batch_size=8, lr=1e-4, warmup=1000, fsdp=True, checkpointing=True,
                        pack=19, steps=300_000, tau_density="logit_normal", ema_decay=0.9999),
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
    tau: torch.Tensor  # (B, F)    per-frame extended time tau_g - s_i (context frames: s_i = 0)
    t: torch.Tensor  # (B, F)      per-frame flow time clip(tau, 0, 1); 1 on context frames
    visible: torch.Tensor  # (B, F) bool, inserted by tau_g (tau >= 0)
    active: torch.Tensor  # (B, F) bool, visible and still flowing (tau < 1, not context)
    K: torch.Tensor  # (B, F)      long, pending frames right of each visible frame (0 elsewhere)
    valid: torch.Tensor  # (B, F)  bool, i < n_b
    context: torch.Tensor  # (B, F) bool, clean context frame given to the model
    passive: torch.Tensor  # (B, F) bool, context frame that may not insert to its right


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


def sample_context(lengths, tasks="uncond", generator=None):
    """Draw a task per video from the mix and return its context pattern: context, passive (B, F) bool.

    Frame 1 is never an interpolation anchor: the start frame lies between the first two anchors (see
    sample_training_state), where the sampler puts it. sample_context draws on the CPU; pass a CPU
    generator.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    B, F, device = lengths.numel(), int(lengths.max()), lengths.device
    none = torch.zeros(B, F, dtype=torch.bool, device=device)
    mix = parse_tasks(tasks)
    if set(k for k, w in mix.items() if w > 0) == {"uncond"}:
        return none, none.clone()
    if lengths.min() < 3:
        raise ValueError("context tasks need videos of at least 3 frames")
    names = list(mix)
    task = torch.multinomial(torch.tensor(list(mix.values())), B, replacement=True, generator=generator).to(device)
    is_task = lambda name: (task == names.index(name))[:, None] if name in names else none[:, :1]  # noqa: E731
    i, n = torch.arange(F, device=device), lengths[:, None]  # (F,), (B, 1)
    # interp: anchors 0 and n-1 (the end: passive), plus k ~ U{0, 1, 2} anchors among frames 2..n-2
    score = torch.rand(B, F, generator=generator).to(device)
    inner = (i >= 2) & (i <= n - 2)
    rank = torch.where(inner, score, 2.0).argsort(dim=1).argsort(dim=1)
    k = torch.randint(0, 3, (B, 1), generator=generator).to(device)
    interp = is_task("interp") & ((i == 0) | (i == n - 1) | (inner & (rank < k)))
    # extend: the first j frames, j ~ U{2, ..., max(2, n // 2)}
    j = 2 + (torch.rand(B, 1, generator=generator).to(device) * ((n // 2).clamp_min(2) - 1)).long()
    extend = is_task("extend") & (i < j)
    context = (is_task("i2v") & (i == 0)) | interp | extend
    passive = (interp & (i == n - 1)) | (extend & (i < j - 1))
    valid = i < n
    return context & valid, passive & valid


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
                          tau_density="uniform", context=None, passive=None, full_sequence=False, gamma=1.0):
    """Draw the extended-time state of a batch of videos (Section 4 of the spec; Algorithm 2).

    lengths: (B,) long, n_b >= n_start. tau_g: None (drawn from `tau_density`), a float or a (B,)
    tensor fixing the global time, e.g. to compare laws at a given time in the tests.
    context, passive: (B, F) bool context pattern (sample_context); default none.

    1. s_i = kappa^-1(u_i) (Eq. 6). Start frames and context frames have s_i = 0. Without context,
       frame 0 is a start frame (nothing can ever be inserted left of it) and n_start - 1 more are
       uniform among frames 1..n-1. A video that begins with context has exactly one start frame,
       uniform among the free frames of its first gap (up to the next context frame): it is the
       model's clock (its t is t_g), and the sampler knows where it goes, right after the leading
       context frames, which insert to its left (they are active). full_sequence: every free frame
       is a start frame (the baseline).
    2. tau_i = tau_g - s_i, t_i = clip(tau_i, 0, 1) (Eqs. 7-8); context frames have t_i = 1.
       gamma != 1: t_i = clip(tau_i, 0, 1)^gamma, the reparameterisation of Appendix E, so that a
       sampler run with the same gamma visits exactly the states trained on.
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
    valid = torch.arange(F, device=device) < lengths[:, None]  # (B, F)
    context = valid & (context if context is not None else torch.zeros_like(valid))
    passive = valid & (passive if passive is not None else torch.zeros_like(valid))
    free = valid & ~context  # frames the model generates
    if (passive & ~context).any():
        raise ValueError("passive frames must be context frames")
    if (passive[:, :-1] & valid[:, 1:] & ~context[:, 1:]).any():
        raise ValueError("a passive frame must be followed by a context frame or end the video: "
                         "the frames after it could never be inserted")
    if not free.any(dim=1).all():
        raise ValueError("every video needs at least one frame that is not context")
    leading = context[:, 0]  # (B,) the video begins with context
    n_starts = torch.where(context.any(dim=1), 1, n_start)  # (B,)
    if full_sequence:
        n_starts = torch.full_like(n_starts, F)
    after_free = free.cumsum(dim=1) > 0  # (B, F) at or after the first free frame
    first_gap = free & ((context & after_free).cumsum(dim=1) == 0)  # free frames before the next context
    eligible = free if full_sequence else torch.where(leading[:, None], first_gap, free)  # (B, F) may start
    first_free = free & (free.cumsum(dim=1) == 1) & ~leading[:, None]  # a free frame 0 (or first) must start
    fixed = tau_g is not None
    if fixed:
        tau_g = torch.as_tensor(tau_g, dtype=torch.float32, device=device).expand(B).clone()
        if tau_g.min() < 0 or tau_g.max() >= 2:
            raise ValueError("a fixed tau_g must lie in [0, 2)")
        if ((tau_g >= 1) & (free.sum(dim=1) <= n_starts)).any():  # every free frame starts: all clean
            raise ValueError("a fixed tau_g >= 1 needs lengths > n_start: otherwise no frame is active")
    else:
        tau_g = torch.empty(B, device=device)
    s = torch.empty(B, F, device=device)
    redraw = torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(10_000):  # rejection: a shrinking set of rows, vectorised within each round
        if not redraw.any():
            break
        rows = redraw.nonzero().squeeze(1)
        R = rows.numel()
        s_r = kappa.inverse(torch.rand(R, F, generator=generator, device=device))  # Eq. (6)
        score = torch.rand(R, F, generator=generator, device=device)  # uniform start subset
        score[first_free[rows]] = -1.0  # a free first frame always ranks first
        score[~eligible[rows]] = 2.0  # context, padding and frames that cannot start rank last
        rank = score.argsort(dim=1).argsort(dim=1)  # (R, F) each frame's rank by score
        start = eligible[rows] & (rank < n_starts[rows, None])
        s[rows] = torch.where(start | context[rows], 0.0, s_r)
        if not fixed:
            tau_g[rows] = sample_tau_g(R, tau_density, generator, device)
        tau_r = tau_g[rows, None] - s[rows]  # (R, F)
        redraw[rows] = ~(free[rows] & (tau_r >= 0) & (tau_r < 1)).any(dim=1)
    assert not redraw.any(), "10,000 rounds of rejection left rows without an active frame: is kappa.inverse right?"
    tau = tau_g[:, None] - s  # (B, F)  Eq. (7)
    visible = valid & (tau >= 0)
    return TrainingState(tau_g=tau_g, tau=tau, t=torch.where(context, 1.0, tau.clamp(0, 1) ** gamma), visible=visible,
                         active=visible & (tau < 1) & ~context, K=pending_counts(visible, valid), valid=valid,
                         context=context, passive=passive)


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
    """What the model sees: the visible frames of each video, stripped to the front and padded.

    Every field is per frame, so that rows can be cut into micro-batches or packed (pack_batch) by
    moving frames: a row holds one video (video = 0 on its frames), or several after packing.
    """

    x_t: torch.Tensor  # (B, F', C, H, W) noisy visible frames, Eq. (10)
    cond: torch.Tensor  # (B, F', C, H, W) conditioning stream (clean context frames, else zeros)
    t: torch.Tensor  # (B, F')           per-frame flow time
    mask: torch.Tensor  # (B, F')        bool, real frame
    target: torch.Tensor  # (B, F', C, H, W) velocity target x_1 - x_0
    active: torch.Tensor  # (B, F')      bool, frame still flowing: velocity loss
    can_insert: torch.Tensor  # (B, F')  bool, slot that may insert, rate loss while tau_g < 1
    K: torch.Tensor  # (B, F')           long, pending count right of each slot
    tau_g: torch.Tensor  # (B, F')       the video's global time, on each of its frames
    video: torch.Tensor  # (B, F')       long, a frame's video: 0 (one per row), or its batch index after
    #                                    pack_batch; -1: padding. Attention stays within a video
    position: torch.Tensor  # (B, F')    long, the frame's index in its video


def make_training_batch(x_1, state, generator=None, cond_dropout=0.0):
    """Noise the clean videos x_1 (B, F, C, H, W) at the state's times and strip deleted frames.

    Context frames are clean (t = 1) and appear in both streams. With probability cond_dropout a
    video's context is dropped: its context frames become zeros in both streams but keep their place
    and t = 1, which trains the unconditional model that guidance needs (Eq. 13).
    """
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
    t = state.t.to(x_1.dtype)[:, :, None, None, None]  # (B, F, 1, 1, 1)
    x_t = t * x_1 + (1 - t) * x_0  # (B, F, C, H, W)  Eq. (10); x_1 itself where t = 1
    context = state.context
    if cond_dropout > 0:
        drop = torch.rand(x_1.shape[0], generator=generator, device=x_1.device) < cond_dropout  # (B,)
        x_t = torch.where((context & drop[:, None])[:, :, None, None, None], 0.0, x_t)
        context = context & ~drop[:, None]
    cond = torch.where(context[:, :, None, None, None], x_1, 0.0)  # (B, F, C, H, W)
    index, mask = strip_index(state.visible)
    visible_only = lambda z: gather_frames(z, index)  # noqa: E731  (B, F, ...) -> (B, F', ...)
    return TrainingBatch(x_t=visible_only(x_t), cond=visible_only(cond), t=visible_only(state.t), mask=mask,
                         target=visible_only(x_1 - x_0), active=visible_only(state.active) & mask,
                         can_insert=mask & ~visible_only(state.passive) & (state.tau_g < 1)[:, None],
                         K=visible_only(state.K) * mask, tau_g=state.tau_g[:, None].expand(mask.shape),
                         video=torch.where(mask, 0, -1),  # one video per row
                         position=torch.arange(mask.shape[1], device=mask.device).expand(mask.shape))


def pack_rows(lengths, capacity):
    """First-fit decreasing: lists of video indices, one per row, each row holding <= capacity frames."""
    rows, free = [], []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        r = next((r for r, room in enumerate(free) if room >= lengths[b]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(capacity)
        rows[r].append(b)
        free[r] -= lengths[b]
    return rows


def pack_batch(batch, capacity):
    """A padded TrainingBatch (one video per row) -> the same frames in rows of `capacity` frames (at least
    the longest video), several videos per row, one after another; `video` tags each frame with its
    video's batch index, and the model's attention stays within a video (Flowception.attention_mask).
    The losses only sum over frames, so they are unchanged; the model runs on fewer padding frames."""
    lengths = batch.mask.sum(dim=1).tolist()
    capacity = max(capacity, max(lengths))
    rows = pack_rows(lengths, capacity)
    # packed frame [r, f] is frame src_f[r, f] of video src_b[r, f]; -1: padding
    src_b = torch.full((len(rows), capacity), -1, dtype=torch.long, device=batch.mask.device)
    src_f = torch.zeros_like(src_b)
    for r, row in enumerate(rows):
        f = 0
        for b in row:
            src_b[r, f: f + lengths[b]], src_f[r, f: f + lengths[b]] = b, torch.arange(lengths[b])
            f += lengths[b]
    real = src_b >= 0

    def move(v):  # (B, F', ...) -> (R, capacity, ...): gather every packed frame's source, zero (False) on padding
        real_ = real.view(*real.shape, *[1] * (v.dim() - 2))  # (R, capacity, 1, ...) broadcasts over v's frame dims
        return torch.where(real_, v[src_b, src_f], torch.zeros((), dtype=v.dtype, device=v.device))
    moved = {k: move(v) for k, v in vars(batch).items() if k not in ("video", "position")}
    return TrainingBatch(**moved, video=src_b, position=src_f)


#################################################################################
#                             Losses (Eqs. 12, 20, 24)                          #
#################################################################################


def velocity_loss(v, batch, count=None):
    """Squared error to x_1 - x_0 on active frames, mean over ALL active frames of the batch (Eq. 12).

    A per-video mean over-weights videos with few active frames and biases towards under-insertion
    (paper, Appendix E). count: the number of active frames to divide by (default: this batch's);
    train.py passes the global batch's, so micro-batches and processes add up to the global mean.
    """
    err = (v.float() - batch.target.float()).pow(2).flatten(2).mean(dim=2)  # (B, F')
    err = torch.where(batch.active, err, 0.0)  # where, not a product: padding may hold inf
    return err.sum() / (batch.active.sum().clamp_min(1) if count is None else count)


def rate_loss(log_lam, batch, kappa=None, hazard_weight=False, count=None):
    """Poisson NLL lam - K log lam on insertion-capable slots while tau_g < 1 (Eqs. 20, 24).

    Computed from log lam in fp32 (lam = exp(log lam), Eq. 11): no log(exp(x) + eps). Its minimiser
    is E[K_j | x_t] (Corollary B.3). hazard_weight multiplies each slot by dkappa/(1-kappa) at tau_g
    (Eq. 19); off by default, as the paper recommends. count: as in velocity_loss, for the slots.
    """
    log_lam = log_lam.float()
    nll = log_lam.exp() - batch.K.float() * log_lam  # (B, F')
    if hazard_weight:
        kappa = kappa or LinearKappa()
        nll = nll * kappa.hazard(batch.tau_g.clamp(0, 1 - 1e-4).float())
    nll = torch.where(batch.can_insert, nll, 0.0)  # where, not a product: padding may hold inf
    return nll.sum() / (batch.can_insert.sum().clamp_min(1) if count is None else count)


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


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once, for CUDA. Off CUDA, Attention runs the uncompiled reference (slow, forward
    only; for tests): in torch 2.13 the compiled CPU kernel gave NaN rows and failed to recompile."""
    return torch.compile(flex_attention)


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
        if isinstance(attn_mask, BlockMask):
            flex = compiled_flex_attention() if q.is_cuda else flex_attention
            out = flex(q.to(v.dtype), k.to(v.dtype), v, block_mask=attn_mask)  # (B, h, N, hd); autocast keeps
            # the RMSNorm-ed q, k in fp32 while v is bf16: flex wants one dtype
        else:
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

    def positions(self, position):
        """RoPE positions (B, F, L+1, 3) of every token: (its frame's index in its own video, h, w); the rate
        token sits at the frame's centre."""
        hp, wp = self.cfg.height // self.cfg.patch[0], self.cfg.width // self.cfg.patch[1]
        h, w = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        hw = torch.cat([torch.stack([h, w], -1).flatten(0, 1).float(), torch.tensor([[(hp - 1) / 2, (wp - 1) / 2]])])
        hw = hw.to(position.device).expand(*position.shape, -1, -1)  # (B, F, L+1, 2)
        return torch.cat([position[:, :, None, None].float().expand(*hw.shape[:3], 1), hw], dim=-1)

    def attention_mask(self, video, position, L1):
        """Who attends to whom: the tokens of the same video (and within +-window frames of each other).

        attention="sdpa": a (B, 1, N, N) bool mask. "flex": a FlexAttention BlockMask, built once per
        forward pass and shared by every block, that skips the blocks between different videos of a
        packed row (so long rows cost no more than their videos). One rule, `allowed`, defines both.
        """
        window = self.cfg.window
        video, position = video.repeat_interleave(L1, dim=1), position.repeat_interleave(L1, dim=1)  # (B, N)

        def allowed(b, h, q, k):  # FlexAttention's mask_mod: batch, head, query and key token indices
            same = video[b, q] == video[b, k]
            return same & ((position[b, q] - position[b, k]).abs() <= window) if window else same

        (B, N), device = video.shape, video.device
        if self.cfg.attention == "flex":  # compiled on CUDA: no (B, N, N) tensor is materialised
            return create_block_mask(allowed, B, None, N, N, device=device, _compile=device.type == "cuda")
        i = torch.arange(N, device=device)  # the same rule on index grids that broadcast to (B, N, N)
        return allowed(torch.arange(B, device=device)[:, None, None], None, i[:, None], i)[:, None]  # (B, 1, N, N)

    def forward(self, x_t, t, mask, cond, video=None, position=None):
        """video, position (B, F) long: which video of the row each frame belongs to (-1: padding) and its
        index in that video, for rows packed with several videos (pack_batch); by default one video per row."""
        cfg = self.cfg
        B, F = mask.shape
        ph, pw = cfg.patch
        if (video is None) != (position is None):
            raise ValueError("give both video and position (pack_batch makes them), or neither")
        if video is None:
            video = torch.where(mask, 0, -1)
            position = torch.arange(F, device=mask.device).expand(B, F)
        z = torch.cat([x_t, cond], dim=2)  # (B, F, 2C, H, W)
        tokens = rearrange(z, "b f c (h p) (w q) -> b f (h w) (p q c)", p=ph, q=pw)
        x = self.x_embedder(tokens.to(self.x_embedder.weight.dtype))  # (B, F, L, D)
        x = torch.cat([x, self.rate_token.to(x.dtype).expand(B, F, 1, -1)], dim=2)  # (B, F, L+1, D)
        L1 = x.shape[2]
        c = self.t_embedder(t)  # (B, F, D) per-frame time embedding
        if self.count_embedder is not None:  # how many frames each frame's video has now (see Config)
            c = c + self.count_embedder((video[:, :, None] == video[:, None, :]).sum(dim=2))  # (B, F, D)
        angles = rope_angles(self.positions(position).flatten(1, 2), cfg.dim // cfg.heads)  # (B, N, hd/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, N, hd/2)
        attn_mask = self.attention_mask(video, position, L1)
        for block in self.blocks:
            if cfg.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, c, cos, sin, attn_mask, use_reentrant=False)
            else:
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


def forward_flops(cfg, frames):
    """Matmul FLOPs of one forward pass over ONE video of `frames` real frames (padding excluded).

    As torchtitan and nanoGPT count: 2 per parameter per token it touches, plus attention's two
    matmuls, 4 * D per query-key pair per block. Block linears run on every token (the rate token
    too); the patch embedding and velocity head on patch tokens; adaLN, the time and count embeddings
    and the rate head once per frame. Training costs 3x this
    (forward + backward), recomputation under activation checkpointing aside.
    """
    D, C, (ph, pw) = cfg.dim, cfg.channels, cfg.patch
    L = (cfg.height // ph) * (cfg.width // pw)  # patch tokens per frame; L + 1 with the rate token
    hidden = int(D * cfg.mlp_ratio)
    per_token = cfg.depth * (4 * D * D + 2 * D * hidden)  # qkv, projection, MLP
    per_patch = 2 * C * ph * pw * D + D * C * ph * pw  # patch embedding (2C channels in), velocity head
    per_frame = (256 * D + D * D) * (1 + cfg.count_embedding) + cfg.depth * 6 * D * D + 2 * D * D + (D * D + D)
    near = sum(min(frames, i + cfg.window + 1) - max(0, i - cfg.window) for i in range(frames)) if cfg.window else frames**2
    pairs = near * (L + 1) ** 2  # query-key pairs that attention computes for real tokens
    return 2 * frames * ((L + 1) * per_token + L * per_patch + per_frame) + 4 * cfg.depth * D * pairs


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
    # at most `steps` steps of h, and capped steps that each shrink 1 - kappa by (1 - cap) down to the floor
    most = steps + 10 + (2 * math.ceil(math.log(floor) / math.log(1 - max_reveal_prob)) if max_reveal_prob < 1 else 0)
    grid = [0.0]
    while grid[-1] < 1:
        assert len(grid) <= most, f"time_grid took over {most} steps: is kappa.inverse the inverse of kappa?"
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
    t: torch.Tensor  # (B, F)           per-frame flow time (1 on context frames)
    u: torch.Tensor  # (B, F)           per-frame solver coordinate, t = u^gamma (Appendix E)
    mask: torch.Tensor  # (B, F)        bool, real frame
    context: torch.Tensor  # (B, F)     bool, clean context frame (never moves)
    passive: torch.Tensor  # (B, F)     bool, context frame that may not insert to its right
    insert_time: torch.Tensor  # (B, F) global time at which the frame was inserted (0: start frame)
    t_g: float  # global time after this step (keeps growing past 1 while frames finish)
    step: int  # number of sampler steps so far
    refused: torch.Tensor  # (B,)       insertions refused so far by the max_frames cap


@dataclass
class Sample:
    """One generated video."""

    frames: torch.Tensor  # (F_i, C, H, W)
    insert_time: torch.Tensor  # (F_i,)
    nfe: int  # model evaluations until this video was finished (two per step with guidance)
    refused: int  # insertions refused by the max_frames cap
    context: torch.Tensor = None  # (F_i,) bool, the prompt's context frames


@dataclass
class Prompt:
    """What generation starts from, in order: clean context frames and noise start frames (Figure 4).

    The values of start frames are ignored (they are drawn as noise). make_prompt builds the tasks'.
    """

    frames: torch.Tensor  # (B, F0, C, H, W)
    context: torch.Tensor  # (B, F0) bool, True: context frame (t = 1); False: start frame (t = 0)
    passive: torch.Tensor  # (B, F0) bool, context frames that may not insert to their right


def make_prompt(task, frames):
    """The prompt of a task from its context frames (B, A, C, H, W), with the one start frame where
    sample_training_state puts it: the first frame that is not context.

    i2v:    A = 1: the frame (active), then the start frame;
    interp: A >= 2 anchors in order: the first, the start frame, the middle anchors (active), the
            last (passive). How many frames go between the anchors is left to the model;
    extend: a clip given frame by frame (passive, but its last frame active), then the start frame.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 5:
        raise ValueError(f"context frames must be (B, A, C, H, W), got shape {tuple(frames.shape)}")
    B, A = frames.shape[:2]
    if task == "i2v" and A == 1:
        passive, at = [False], 1
    elif task == "interp" and A >= 2:
        passive, at = [False] * (A - 1) + [True], 1
    elif task == "extend" and A >= 1:
        passive, at = [True] * (A - 1) + [False], A
    elif task in ("i2v", "interp", "extend"):
        need = {"i2v": "exactly 1 frame", "interp": "at least 2 anchors (first and last)", "extend": "at least 1 frame"}
        raise ValueError(f"{task} needs {need[task]}, got {A}")
    else:
        raise ValueError(f"task must be 'i2v', 'interp' or 'extend', got {task!r}")
    frames = torch.cat([frames[:, :at], torch.zeros_like(frames[:, :1]), frames[:, at:]], dim=1)  # (B, A+1, ...)
    context = torch.arange(A + 1, device=frames.device) != at
    passive = torch.tensor(passive[:at] + [False] + passive[at:], device=frames.device)
    return Prompt(frames=frames, context=context.expand(B, -1).clone(), passive=passive.expand(B, -1).clone())


def check_prompt(prompt, B, frame_shape):
    """Raise a ValueError unless the prompt is one that training can produce (sample_training_state)."""
    frames, ctx, passive = prompt.frames, prompt.context, prompt.passive
    if frames.ndim != 5 or frames.shape[0] != B or tuple(frames.shape[2:]) != tuple(frame_shape):
        raise ValueError(f"prompt frames must be ({B}, F0, {', '.join(map(str, frame_shape))}), got {tuple(frames.shape)}")
    for name, m in (("context", ctx), ("passive", passive)):
        if m.dtype != torch.bool or tuple(m.shape) != tuple(frames.shape[:2]):
            raise ValueError(f"prompt.{name} must be a bool tensor of shape {tuple(frames.shape[:2])}, got {m.dtype} {tuple(m.shape)}")
    free = (~ctx).sum(dim=1)  # (B,)
    if (free == 0).any():
        raise ValueError("a prompt needs a start frame (a frame that is not context)")
    if (ctx.any(dim=1) & (free != 1)).any():
        raise ValueError("a prompt with context frames has exactly one start frame (make_prompt places it)")
    if (passive & ~ctx).any() or (passive[:, :-1] & ~ctx[:, 1:]).any():
        raise ValueError("passive frames must be context frames followed by context frames or the end")


def insert_frames(state, n_new, t_g, max_frames, generator=None):
    """Insert n_new[b, j] pure-noise frames (t = 0) right after frame j of row b, all rows at once.

    This is Algorithm 1's ins(X, j, eps) for every slot in parallel; inserted frames record t_g.

    Insertions that would take a video past max_frames are refused, leftmost slots first served; real
    frames are never evicted. Returns the new state; state.refused counts what was refused.
    """
    x, mask = state.x, state.mask
    B, F = mask.shape
    n_new = n_new.long() * mask
    n = mask.sum(dim=1)  # (B,)
    budget = (max_frames - n).clamp_min(0)  # (B,)
    before = n_new.cumsum(dim=1) - n_new  # (B, F) insertions requested left of slot j
    kept = (budget[:, None] - before).clamp_min(0).minimum(n_new)  # (B, F)
    shift = kept.cumsum(dim=1) - kept  # (B, F) frames inserted before old frame j
    n_total = n + kept.sum(dim=1)
    F_new = int(n_total.max())
    mask_new = torch.arange(F_new, device=x.device) < n_total[:, None]  # (B, F_new)
    rows = torch.arange(B, device=x.device)[:, None].expand(B, F)[mask]
    pos = (torch.arange(F, device=x.device) + shift)[mask]  # where each old frame goes

    def move(old, new):  # old (B, F, ...) into new (B, F_new, ...), which holds the new frames' values
        new[rows, pos] = old[mask]
        return torch.where(mask_new.view(B, F_new, *[1] * (new.ndim - 2)), new, torch.zeros_like(new))

    fill = lambda old, value: torch.full((B, F_new), value, dtype=old.dtype, device=x.device)  # noqa: E731
    noise = torch.randn((B, F_new, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
    return SamplerState(x=move(x, noise), t=move(state.t, fill(state.t, 0)), u=move(state.u, fill(state.u, 0)),
                        mask=mask_new, context=move(state.context, fill(state.context, False)),
                        passive=move(state.passive, fill(state.passive, False)),
                        insert_time=move(state.insert_time, fill(state.insert_time, t_g)), t_g=t_g,
                        step=state.step, refused=state.refused + (n_new - kept).sum(dim=1))


# Where new frames go. 'learned' is Flowception: the rate head. The others are Table 2's
# data-independent baselines for a given target length; 'full_sequence' is full-sequence flow
# matching: every frame is there from t_g = 0 and nothing is inserted.
ORDERS = ("learned", "random", "hierarchical", "left_to_right", "full_sequence")


def bisection_order(first, last):
    """Positions first..last in Table 2's 'hierarchical' order: repeatedly the middle of the largest
    run of positions not inserted yet (ties: leftmost)."""
    order, runs = [], [(-(last - first + 1), first, last)]
    while runs:
        _, a, b = heapq.heappop(runs)
        mid = (a + b) // 2
        order.append(mid)
        runs += [(-(hi - lo + 1), lo, hi) for lo, hi in ((a, mid - 1), (mid + 1, b)) if lo <= hi]
        heapq.heapify(runs)
    return order


def insertion_plan(order, lengths, F0, generator=None):
    """(B, N) rank at which each final frame position is revealed under a data-independent order.

    Video b ends with lengths[b] frames: positions 0..F0-1 are the prompt (rank -1), positions
    F0..n-1 are revealed as the order says (rank 0, 1, ...), positions past n never (rank N).
    """
    B, N, device = lengths.numel(), int(lengths.max()), lengths.device
    pos = torch.arange(N, device=device).expand(B, N)
    pending = (pos >= F0) & (pos < lengths[:, None])  # (B, N)
    if order == "left_to_right":
        key = pos.float()
    elif order == "random":
        key = torch.rand(B, N, generator=generator, device=device)
    else:  # hierarchical
        key = torch.zeros(B, N)
        for b, n in enumerate(lengths.tolist()):
            key[b, bisection_order(F0, n - 1)] = torch.arange(float(n - F0))
        key = key.to(device)
    rank = torch.where(pending, key, math.inf).argsort(dim=1).argsort(dim=1)  # pending first, in order
    return torch.where(pending, rank, torch.where(pos < F0, -1, N))


def planned_insertions(plan, revealed, p, F, generator=None):
    """n_new (B, F) for a data-independent order, and the new count of revealed frames (B,).

    Binomial(pending, p) frames are revealed this step, the same count law as learned insertions;
    which ones the plan says. Each goes right of the last frame already there on its left.
    """
    B, N = plan.shape
    pending = (plan >= revealed[:, None]) & (plan < N)  # (B, N)
    coins = torch.rand(B, N, generator=generator, device=plan.device) < p
    count = (coins & (torch.arange(N, device=plan.device) < pending.sum(dim=1)[:, None])).sum(dim=1)  # (B,)
    old = plan < revealed[:, None]  # (B, N) prompt and earlier reveals: the frames there now
    new = pending & (plan < (revealed + count)[:, None])
    owner = old.long().cumsum(dim=1) - 1  # (B, N) index of the last present frame at or left of q
    n_new = torch.zeros(B, max(N, F), dtype=torch.long, device=plan.device)
    return n_new.scatter_add_(1, owner.clamp_min(0), new.long())[:, :F], revealed + count


def guided_forward(model, state, rate_guidance=1.0, cfg_scale=1.0):
    """The model on the sampler state -> (v, log_lam); with guidance also without the context.

    Conditional pass: context frames in both streams. Unconditional pass: context frames blanked in
    both, keeping their place and t = 1, as conditioning dropout does in training. Then
    rate guidance (Eq. 13) in log space, log lam = w log lam_c + (1 - w) log lam_u, and
    velocity CFG, v = v_u + s (v_c - v_u). Both passes run as one batch of 2B.
    """
    ctx = state.context[:, :, None, None, None]  # (B, F, 1, 1, 1)
    x, cond = state.x, torch.where(ctx, state.x, 0.0)
    if (rate_guidance == 1 and cfg_scale == 1) or not state.context.any():
        return model(x, state.t, state.mask, cond)
    two = lambda a, b: torch.cat([a, b])  # noqa: E731
    v, log_lam = model(two(x, torch.where(ctx, 0.0, x)), two(state.t, state.t), two(state.mask, state.mask),
                       two(cond, torch.zeros_like(cond)))
    (v_c, v_u), (log_lam_c, log_lam_u) = v.chunk(2), log_lam.chunk(2)
    return v_u + cfg_scale * (v_c - v_u), rate_guidance * log_lam_c + (1 - rate_guidance) * log_lam_u


@torch.no_grad()
def generate(model, num_videos, frame_shape, kappa=None, n_start=1, steps=100, sampler="poisson",
             max_reveal_prob=0.1, max_frames=64, generator=None, callback=None, device=None,
             dtype=torch.float32, prompt=None, rate_guidance=1.0, cfg_scale=1.0, gamma=1.0,
             order="learned", lengths=None):
    """Generate variable-length videos: interleave Euler flow steps with frame insertions (Alg. 1).

    model: any callable model(x_t, t, mask, cond) -> (v, log_lam), shapes as in the module docstring.
    prompt: the context and start frames to begin from (make_prompt); None: n_start start frames
    (n_start is only used then).
    Each step, for all videos at once:
      1. one forward pass -> v, log lam (two with guidance: rate_guidance w, Eq. 13; cfg_scale s);
      2. flow (Eq. 4): every unfinished frame advances its solver coordinate u_i by
         du_i = min(du, 1 - u_i) and moves x_i += (t_i' - t_i) v_i with t = u^gamma (Appendix E;
         gamma = 1: t = u). Context frames never move;
      3. while t_g < 1: insertions right of every active frame with p = reveal_prob(t_g, t_g + du):
         'bernoulli' (Alg. 1) one frame w.p. min(1, lam_j p); 'poisson' (App. B.3) Poisson(lam_j p);
         inserted frames are N(0, I) with t = u = 0;
      4. t_g advances along `time_grid` (steps of 1/steps, capped reveal probability), then by
         h = 1/steps once t_g >= 1; the loop ends when every frame is clean.
    max_reveal_prob = 1 gives exactly Algorithm 1's uniform grid.
    gamma != 1 gives new frames smaller flow steps (Appendix E). The model then sees per-frame times
    t = (t_g - s_i)^gamma: exact for a model trained with the same gamma (Config.gamma), a departure
    from the training law for one trained with gamma = 1 (measured in the README).
    order: 'learned', or one of ORDERS with target `lengths` (int or (B,)), see ORDERS. Planned
    orders keep the learned sampler's time grid, so that their frames get the same flow steps.
    Returns a list of `Sample`.
    """
    kappa = kappa or LinearKappa()
    if sampler not in ("poisson", "bernoulli"):
        raise ValueError(f"sampler must be 'poisson' or 'bernoulli', got {sampler!r}")
    if n_start < 1:
        raise ValueError(f"n_start must be >= 1, got {n_start}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if rate_guidance < 0 or cfg_scale < 0:
        raise ValueError(f"guidance scales must be >= 0, got rate_guidance={rate_guidance}, cfg_scale={cfg_scale}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order != "learned" and lengths is None:
        raise ValueError(f"order {order!r} needs target lengths")
    grid = time_grid(kappa, steps, max_reveal_prob)  # also validates steps and max_reveal_prob
    h, B = 1.0 / steps, num_videos
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    if prompt is None:  # unconditional: n_start start frames
        zeros = torch.zeros(B, n_start, dtype=torch.bool, device=device)
        prompt = Prompt(frames=torch.zeros(B, n_start, *frame_shape, device=device), context=zeros, passive=zeros)
    check_prompt(prompt, B, frame_shape)
    ctx, passive = prompt.context.to(device), prompt.passive.to(device)  # (B, F0)
    F0 = ctx.shape[1]
    if F0 > max_frames:
        raise ValueError(f"max_frames must be >= the prompt's {F0} frames, got {max_frames}")
    noise = torch.randn((B, F0, *frame_shape), generator=generator, device=device, dtype=dtype)
    state = SamplerState(x=torch.where(ctx[..., None, None, None], prompt.frames.to(device, dtype), noise),
                         t=ctx.float(), u=ctx.float(), mask=torch.ones_like(ctx), context=ctx, passive=passive,
                         insert_time=torch.zeros(B, F0, device=device), t_g=0.0, step=0,
                         refused=torch.zeros(B, dtype=torch.long, device=device))
    plan = None
    if order != "learned":
        lengths = torch.as_tensor(lengths, device=device).long().expand(B)
        if lengths.min() < F0 or lengths.max() > max_frames:
            raise ValueError(f"target lengths must lie in [{F0}, max_frames={max_frames}], got {lengths.min()}..{lengths.max()}")
        after_start = ctx & ((~ctx).long().cumsum(dim=1) > 0)  # context right of the first start frame
        if after_start.any():
            raise ValueError(f"order {order!r} puts new frames right of the prompt; prompts with context "
                             "after the start frame (interp) need order='learned'")
        if order == "full_sequence":  # every frame there from the start: the baseline
            grid = time_grid(kappa, steps, 1.0)
            n_new = torch.zeros(B, F0, dtype=torch.long, device=device)
            n_new[:, -1] = lengths - F0
            state = insert_frames(state, n_new, 0.0, max_frames, generator)
        else:
            plan, revealed = insertion_plan(order, lengths, F0, generator), torch.zeros_like(lengths)
    guided = bool(ctx.any()) and (cfg_scale != 1 or (rate_guidance != 1 and order == "learned"))
    rate_guidance = rate_guidance if order == "learned" else 1.0  # planned orders ignore the rate
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    k = 0  # grid index: grid[k] == state.t_g while t_g < 1 (the insertion phase)
    while True:
        unfinished = ((state.t < 1) & state.mask).any(dim=1)  # (B,)
        if state.t_g >= 1 and not unfinished.any():
            break
        assert state.step <= len(grid) + steps, "a frame did not finish `steps` steps after t_g = 1"
        # 1. one forward pass (two with guidance)
        v, log_lam = guided_forward(model, state, rate_guidance, cfg_scale)
        if v.shape != state.x.shape or log_lam.shape != state.mask.shape:
            raise ValueError(f"model returned v {tuple(v.shape)} and log_lam {tuple(log_lam.shape)}; "
                             f"expected {tuple(state.x.shape)} and {tuple(state.mask.shape)}")
        nfe += (unfinished | (state.t_g < 1)) * (2 if guided else 1)  # evaluations until a video is clean
        # 2. flow step, Eq. (4), on the solver coordinate; a frame reaching u = 1 takes exactly 1 - u_i
        t_next = grid[k + 1] if state.t_g < 1 else state.t_g + h
        du = t_next - state.t_g
        mask = state.mask
        finishes = (du >= (1 - state.u) - 1e-6) & mask  # 1e-6: float slack so k * h lands on 1
        u = torch.where(finishes, 1.0, torch.where(mask, state.u + du, 0.0))  # (B, F)
        t = u**gamma  # (B, F)  Appendix E; exactly u for gamma = 1
        dt_i = t - state.t  # (B, F)  0 for context, finished and padded frames
        moving = (dt_i > 0)[..., None, None, None]  # frozen and padded frames ignore v (even NaN)
        x = torch.where(moving, state.x + dt_i[..., None, None, None].to(state.x.dtype) * v, state.x)
        state = replace(state, x=x, t=t, u=u, t_g=t_next, step=state.step + 1)
        # 3. insertions to the right of every active frame, while t_g < 1 (Alg. 1 line 9; Eq. (34))
        if k + 1 < len(grid):
            if order != "full_sequence":  # the baseline inserts nothing
                p = float(kappa.reveal_prob(torch.tensor(grid[k]), torch.tensor(grid[k + 1])))
                if plan is not None:
                    n_new, revealed = planned_insertions(plan, revealed, p, mask.shape[1], generator)
                else:
                    rate = torch.where(mask & ~state.passive, log_lam.float().exp() * p, 0.0)  # (B, F) expected insertions
                    if sampler == "poisson":
                        n_new = torch.poisson(rate, generator=generator)
                    else:
                        n_new = torch.bernoulli(rate.clamp(max=1), generator=generator)
                state = insert_frames(state, n_new, t_next, max_frames, generator)
            k += 1
        if callback is not None:
            callback(state)
    return [Sample(frames=state.x[b, state.mask[b]], insert_time=state.insert_time[b, state.mask[b]],
                   nfe=int(nfe[b]), refused=int(state.refused[b]), context=state.context[b, state.mask[b]])
            for b in range(B)]


class PosteriorMeanOracle:
    """The exact rate for videos whose frames carry no information: lam_j = E[K_j | m visible, t_g].

    For a known length law P(n), a state with m visible frames at t_g < 1, of which f were there
    from the start (n_start; or the prompt's n_context context frames plus its start frame), has
    P(n | m, t_g) ∝ P(n) Binom(m - f; n - f, kappa(t_g)). Because the inserted frames are a uniform
    subset, the n - m pending frames are spread exchangeably over the m - n_passive slots that may
    insert: E[K_j | m, t_g] = E[(n - m) / (m - n_passive) | m, t_g]. This holds without context and
    for prompts whose context all comes first (i2v, extend), not between free frames (interp).
    t_g is read off the input as the largest frame time below 1 (the start frame has t = t_g before
    1, t_g^gamma for a model trained with gamma; context frames have t = 1). The velocity is 0.
    Used by the tests and `sample.py --oracle`.
    """

    def __init__(self, length_probs, kappa=None, n_start=1, gamma=1.0, n_context=0, n_passive=0):
        self.p = torch.as_tensor(length_probs, dtype=torch.float64)  # (N_max + 1,) P(n)
        self.p = self.p / self.p.sum()
        self.kappa, self.gamma, self.n_passive = kappa or LinearKappa(), gamma, n_passive
        self.n_fixed = n_context + 1 if n_context else n_start  # frames there from t_g = 0

    def __call__(self, x_t, t, mask, cond):
        m = mask.sum(dim=1).double()[:, None]  # (B, 1)
        t_max = torch.where(mask & (t < 1), t, 0.0).amax(dim=1).double()  # (B,) the start frame's t
        t_g = (t_max ** (1 / self.gamma)).clamp(1e-9, 1 - 1e-9)  # the model's training law: t = t_g^gamma
        k = self.kappa.kappa(t_g)[:, None]  # (B, 1)
        p = self.p.to(t.device)
        n = torch.arange(len(p), dtype=torch.float64, device=t.device)[None]  # (1, N) candidate lengths
        trials, hits = n - self.n_fixed, m - self.n_fixed  # Binom(hits; trials, kappa(t_g))
        ok = (hits <= trials) & (p[None] > 0)
        logpost = (p.log()[None] + torch.lgamma(trials.clamp_min(0) + 1) - torch.lgamma(hits + 1)
                   - torch.lgamma((trials - hits).clamp_min(0) + 1) + torch.xlogy(hits, k) + torch.xlogy(trials - hits, 1 - k))
        post = torch.softmax(torch.where(ok, logpost, -math.inf), dim=1).nan_to_num(0.0)  # (B, N)
        lam = (post * (n - m).clamp_min(0) / (m - self.n_passive)).sum(dim=1)  # (B,)
        log_lam = lam.clamp_min(1e-12).log().float()[:, None].expand(mask.shape)
        return torch.zeros_like(x_t), log_lam


#################################################################################
#            LTX-Video latents: files, a dataset, VAE encode and decode          #
#################################################################################

# The LTX-Video VAE maps 1 + 8k frames of H x W pixels to 1 + k latent frames of 128 x H/32 x W/32.
LTX_TEMPORAL, LTX_SPATIAL = 8, 32


def pack_latents(z):
    """(F, C, h, w) -> (F*h*w, C): LTX-Video-Trainer's layout, tokens in (frame, row, column) order."""
    return rearrange(z, "f c h w -> (f h w) c")


def unpack_latents(tokens, num_frames, height, width):
    """Inverse of pack_latents."""
    return rearrange(tokens, "(f h w) c -> f c h w", f=num_frames, h=height, w=width)


def save_latents(path, z, fps):
    """Write normalised latents (F, C, h, w) as LTX-Video-Trainer does (a torch.save'd dict), atomically."""
    F, _, h, w = z.shape
    torch.save({"latents": pack_latents(z.cpu()), "num_frames": F, "height": h, "width": w, "fps": float(fps)}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_latents(path, channels=None, size=None):
    """Read one latent file (ours or LTX-Video-Trainer's) -> (F, C, h, w); a one-line error naming the file."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        F, h, w = (int(torch.as_tensor(d[k]).flatten()[0]) for k in ("num_frames", "height", "width"))
        z = unpack_latents(d["latents"].float(), F, h, w)
    except Exception as e:  # unreadable, not a dict, missing keys, inconsistent shapes
        raise ValueError(f"latent file {path} is not readable ({type(e).__name__}: {str(e)[:80]})") from None
    if channels is not None and z.shape[1] != channels:
        raise ValueError(f"latent file {path} has {z.shape[1]} channels, the preset wants {channels}")
    if size is not None and tuple(z.shape[2:]) != tuple(size):
        raise ValueError(f"latent file {path} is {z.shape[2]}x{z.shape[3]} latents, the preset wants {size[0]}x{size[1]}")
    return z


class LatentFolder:
    """Every latent file of a folder (*.pt, recursively), checked and held in memory.

    Tai-Chi-HD at 256 px is 3,049 clips of at most 19 x 128 x 8 x 8 latents: about 0.5 GB.
    """

    def __init__(self, folder, cfg):
        files = sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True))
        if not files:
            raise ValueError(f"no latent files (*.pt) in {folder} (encode videos with `python train.py --encode-videos`)")
        self.clips, short = [], []
        for path in tqdm(files, desc=f"checking {folder}", disable=len(files) < 100):
            z = load_latents(path, cfg.channels, (cfg.height, cfg.width))
            (short if z.shape[0] < cfg.n_start + 2 else self.clips).append(z[: cfg.max_frames])  # the first max_frames
        if short:
            print(f"{folder}: skipped {len(short)} clips of fewer than {cfg.n_start + 2} latent frames")
        if not self.clips:
            raise ValueError(f"no clip in {folder} has {cfg.n_start + 2} latent frames or more")

    def __len__(self):
        return len(self.clips)

    def batch(self, index):
        """-> videos (B, F, C, h, w) zero-padded, lengths (B,)."""
        clips = [self.clips[i] for i in index.tolist()]
        lengths = torch.tensor([c.shape[0] for c in clips])
        out = torch.zeros(len(clips), int(lengths.max()), *clips[0].shape[1:])
        for b, c in enumerate(clips):
            out[b, : c.shape[0]] = c
        return out, lengths


def load_vae(name_or_path, device="cpu", dtype=torch.float32):
    """diffusers' AutoencoderKLLTXVideo from a hub id or a local folder (with or without a vae/ subfolder)."""
    try:
        from diffusers import AutoencoderKLLTXVideo
    except ImportError:
        raise ValueError("the LTX VAE needs diffusers: pip install diffusers") from None
    if name_or_path.startswith((os.sep, ".")) and not os.path.isdir(name_or_path):
        raise ValueError(f"VAE folder {name_or_path} does not exist")
    sub = "vae" if not os.path.isfile(os.path.join(name_or_path, "config.json")) else None
    try:
        vae = AutoencoderKLLTXVideo.from_pretrained(name_or_path, subfolder=sub, torch_dtype=dtype)
    except Exception as e:  # offline without a cache, wrong path, not a VAE
        raise ValueError(f"cannot load the LTX VAE from {name_or_path!r} ({type(e).__name__}: {str(e)[:120]})") from None
    return vae.to(device).eval()


def vae_frames(n):
    """The number of video frames the VAE takes from a clip of n: the largest 1 + 8k <= n."""
    return 1 + (n - 1) // LTX_TEMPORAL * LTX_TEMPORAL


@torch.no_grad()
def encode_video(vae, pixels):
    """pixels (F, 3, H, W) in [-1, 1] -> normalised latents (1 + (F-1)/8, 128, H/32, W/32).

    Clips are cut to 1 + 8k frames (never padded). Normalisation as diffusers' LTX pipelines:
    (z - latents_mean) * scaling_factor / latents_std, per channel.
    """
    F, _, H, W = pixels.shape
    if H % LTX_SPATIAL or W % LTX_SPATIAL:
        raise ValueError(f"frame size {H}x{W} is not a multiple of {LTX_SPATIAL}")
    p = next(vae.parameters())
    x = pixels[: vae_frames(F)].to(p.device, p.dtype).permute(1, 0, 2, 3)[None]  # (1, 3, F', H, W)
    z = vae.encode(x).latent_dist.mode()[0]  # (C, f, h, w)
    mean, std = vae.latents_mean.view(-1, 1, 1, 1), vae.latents_std.view(-1, 1, 1, 1)
    return ((z - mean) * vae.config.scaling_factor / std).permute(1, 0, 2, 3).float().cpu()  # (f, C, h, w)


@torch.no_grad()
def decode_latents(vae, z, decode_timestep=0.0, decode_noise_scale=None, generator=None):
    """Normalised latents (f, C, h, w) of ONE clip -> pixels (1 + 8(f-1), 3, 32h, 32w) in [-1, 1].

    One clip at a time: the VAE's temporal convolutions would otherwise mix padding into it. The
    newer LTX VAEs (timestep_conditioning) decode at a timestep after mixing in that much noise,
    as diffusers' pipelines do (decode_timestep 0.05 and noise scale 0.025 are their defaults).
    """
    p = next(vae.parameters())
    mean, std = vae.latents_mean.view(-1, 1, 1, 1), vae.latents_std.view(-1, 1, 1, 1)
    z = (z.to(p.device, p.dtype).permute(1, 0, 2, 3) * std / vae.config.scaling_factor + mean)[None]  # (1, C, f, h, w)
    temb = None
    if vae.config.timestep_conditioning:
        s = decode_timestep if decode_noise_scale is None else decode_noise_scale
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = (1 - s) * z + s * noise
        temb = torch.tensor([decode_timestep], device=z.device, dtype=z.dtype)
    return vae.decode(z, temb).sample[0].permute(1, 0, 2, 3).float().clamp(-1, 1).cpu()  # (F, 3, H, W)


def read_video(path):
    """An mp4 (any format ffmpeg reads) -> frames (F, 3, H, W) uint8 and fps. PyAV, imported here."""
    try:
        import av
    except ImportError:
        raise ValueError("reading videos needs PyAV: pip install av") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
            fps = float(stream.average_rate or 16)
    except Exception as e:
        raise ValueError(f"video {path} cannot be decoded ({type(e).__name__}: {str(e)[:80]})") from None
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return torch.stack(frames).permute(0, 3, 1, 2), fps


def write_video(path, frames, fps):
    """frames (F, 3, H, W) uint8 -> an H.264 mp4 (yuv420p, playable everywhere). PyAV, imported here."""
    try:
        import av
    except ImportError:
        raise ValueError("writing videos needs PyAV: pip install av") from None
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.height, stream.width, stream.pix_fmt = frames.shape[2], frames.shape[3], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames.permute(0, 2, 3, 1).contiguous().numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


#################################################################################
#                                 Checkpoints                                   #
#################################################################################


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict (plain tensors and data, loaded with weights_only=True) or a one-line error."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist (train one with `python train.py`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)  # 26 GB for taichi256
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise ValueError(f"checkpoint {path} is not a readable checkpoint ({type(e).__name__})") from None
    missing = {"model", "ema", "config", "step", "preset"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt
