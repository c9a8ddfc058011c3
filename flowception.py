"""Flowception (arXiv 2512.11438): variable-length video generation that interleaves flow-matching denoising
of frames with learned frame insertions. Read top to bottom: config -> scheduler kappa -> training state in
extended time (Algorithm 2) -> tasks -> losses -> the DiT -> the samplers (Algorithm 1) -> LTX latents.

time     t = 0 is noise, t = 1 is data: x_t = t x_1 + (1 - t) x_0; the velocity target is x_1 - x_0.
shapes   B batch, F frames, C channels, H, W height and width, L patch tokens per frame, D model width;
         every frame also carries one rate token in the DiT, so a video is N = F (L + 1) tokens.
batches  variable-length videos are a padded tensor (B, F, C, H, W) and a bool mask (B, F), True = real.
extended time (Section 3.3): frame i has an insertion time s_i = kappa^-1(U(0, 1)) (0 for start and
         context frames). The global time tau_g in [0, 2) gives it tau_i = tau_g - s_i and its flow time
         t_i = clip(tau_i, 0, 1): tau_i < 0 not inserted yet, 0 <= tau_i < 1 active (flowing), tau_i >= 1
         clean. Insertions happen while tau_g < 1 (the paper's t_g = clip(tau_g, 0, 1)); a video is done
         at tau_g = 1 + max_i s_i, when every frame is clean.
rates    the model predicts log lam_j for every visible frame j: lam_j estimates K_j, the number of
         frames still pending between j and the next visible frame (Corollary B.3).
"""
import collections
import fractions
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as nnf
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

#################################### Config #####################################


PARADIGMS = ("flowception", "full_sequence", "ar", "ar_causal")  # Flowception and Section 4.1's baselines
ROPES = ("axial", "videorope")  # rope_angles
BLOCKS = ("dit", "v1")  # DiTBlock
SPEEDS = ("fused", "compile", "flex")  # GPU speed paths (train.py), off by default: unmeasured (README)


@dataclass(frozen=True)
class Config:
    """Everything a run needs: data geometry, model size, Flowception knobs and the training schedule."""

    data: str = "toy"  # what train.py reads: "toy", "synthetic" (random full-length clips), a latent folder
    channels: int = 3
    height: int = 1
    width: int = 3
    max_frames: int = 30  # longest video in the data (sample.py caps toy generation at twice this)
    patch: tuple = (1, 3)  # the model (Section 3.4): (ph, pw) patches, one token per toy frame
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    block: str = "dit"  # DiT's block, or "v1": the official FlowceptionV1's (SwiGLU, two-layer adaLN)
    prompt_dim: int = 0  # width of the prompt's embeddings (T5-XXL: 4096; toy_data.embed_caption); 0: none
    window: int = 0  # attention within +-window frames (Figure 8); 0 = the whole video
    rope: str = "axial"  # RoPE over (frame, row, column): "axial" or "videorope", the paper's (rope_angles)
    rope_frame_base: float = 100.0  # axial: the frame axis turns 1 .. 1/base rad per frame
    rope_delta: float = 2.0  # videorope: the frames' spacing (its adjustable temporal spacing)
    count_embedding: bool = True  # the frame count in every frame's adaLN input (not the paper's: README)
    kappa: str = "linear"  # Flowception: a name in KAPPAS
    n_start: int = 1  # frames present at tau_g = 0 in a video without context
    tau_density: str = "uniform"  # law of tau_g on [0, 2): "uniform", "logit_normal" or "late"
    rate_weight: float = 1.0  # loss = velocity + rate_weight * insertion
    tasks: str = "uncond"  # the mix of TASKS training draws from, e.g. "uncond:2,i2v:1"
    cond_dropout: float = 0.0  # P(a video's context and prompt are dropped), for guidance (Eq. 13)
    paradigm: str = "flowception"  # or a baseline of Section 4.1: a name in PARADIGMS (baseline_state)
    gamma: float = 1.0  # per-frame time t = clip(tau, 0, 1)^gamma (Appendix E), training and sampling
    steps: int = 3000  # training
    batch_size: int = 64  # videos per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per process and step
    pack: int = 0  # rows of this many frames holding several videos each (train.pack_batch); 0: pad
    checkpointing: bool = False  # activation checkpointing: recompute each block in backward
    fsdp: bool = False  # shard parameters, gradients, optimizer state and EMA per block (FSDP2)
    speed: str = ""  # of SPEEDS, comma-separated: fused AdamW, torch.compile per block, FlexAttention
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 250
    ckpt_every: int = 1000  # 0: never write a checkpoint

    def __post_init__(self):  # train.py's numbers land here (argparse checks the names, parse_tasks the mix)
        counts = ("channels", "height", "width", "max_frames", "dim", "depth", "heads", "n_start", "steps",
                  "batch_size", "grad_accum", "log_every")
        rules = ((">= 1", lambda x: x >= 1, counts),
                 (">= 0", lambda x: x >= 0, ("window", "pack", "prompt_dim", "warmup", "weight_decay",
                                            "grad_clip", "rate_weight", "ckpt_every")),
                 ("in (0, 1e3]", lambda x: 0 < x <= 1e3, ("lr", "mlp_ratio", "gamma", "rope_delta")),
                 ("in [0, 1)", lambda x: 0 <= x < 1, ("ema_decay", "cond_dropout")))
        for rule, ok, names in rules:
            for name in names:
                if not (ok(getattr(self, name)) and math.isfinite(getattr(self, name))):
                    raise ValueError(f"{name} must be {rule} and finite, got {getattr(self, name)}")
        if self.height % self.patch[0] or self.width % self.patch[1] or self.dim % (2 * self.heads):
            raise ValueError(f"patch {self.patch} must divide the frame {self.height}x{self.width}, and dim "
                             f"{self.dim} split into {self.heads} heads of even size")
        if self.n_start > self.max_frames:
            raise ValueError(f"n_start {self.n_start} must be <= max_frames {self.max_frames}")
        for name, value, choices in (("paradigm", self.paradigm, PARADIGMS), ("rope", self.rope, ROPES),
                                     ("block", self.block, BLOCKS)):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
        if set(self.speed.split(",")) - {"", *SPEEDS}:
            raise ValueError(f"speed {self.speed!r}: the speed paths are {', '.join(SPEEDS)}")
        if self.paradigm.startswith("ar") and (self.tasks != "uncond" or self.window or self.prompt_dim):
            raise ValueError(f"the AR baselines take tasks 'uncond', window 0 and no prompt, got tasks "
                             f"{self.tasks!r}, window {self.window}, prompt_dim {self.prompt_dim}")

    @classmethod
    def from_dict(cls, d):
        """A checkpoint's config; another version's is refused, naming the keys: a default would change it."""
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"its config has unknown keys {sorted(set(d) - names)} and lacks "
                             f"{sorted(names - set(d))}: written by another version? (retrain it)")
        return cls(**{**d, "patch": tuple(d["patch"])})


PRESETS = {
    # the quickstart, Appendix F's 3-pixel videos: 354,506 parameters, 5-10 min on 2 CPU cores (sweep: README)
    "toy": Config(steps=6000, batch_size=32, lr=2e-3, tau_density="late", pack=30),
    # text-to-video on the toy: captions of the length and the jump (toy_data.caption), 431,530 parameters
    "toy_t2v": Config(steps=6000, batch_size=32, lr=2e-3, tau_density="late", pack=30, prompt_dim=16,
                      cond_dropout=0.1),
    # the toy at the size that learns the content: 1,933,578 parameters, 4 min on one GPU, 2 hours on 2 cores
    "toy_full": Config(dim=128, depth=6, steps=2310, batch_size=512, lr=2e-3, tau_density="late"),
    # Figure 4's tasks, cond. dropout for guidance: 9,936,650 parameters, 4 min on one GPU, 6-10 h on 2 cores
    "toy_tasks": Config(dim=256, depth=8, heads=8, steps=2310, batch_size=512, lr=2e-3, tau_density="late",
                        tasks="uncond:1,i2v:1,interp:1,extend:1", cond_dropout=0.1),
    # the latent path end to end on a CPU: LTX latents of 64 px clips (2x2, up to 65 frames), tiny DiT
    "latent_tiny": Config(data="latents", channels=128, height=2, width=2, max_frames=9, patch=(1, 1),
                          dim=64, depth=2, steps=200, batch_size=8, warmup=20, pack=9, rope="videorope"),
    # the paper's 2.1B config at 256 px over 128-channel LTX latents at 8x8, prompts from LTX-Video's T5-XXL:
    # 2,084,865,409 parameters, the official FlowceptionV1's 2,089,529,985 within 0.3% (README)
    "taichi256": Config(data="latents", channels=128, height=8, width=8, max_frames=19, patch=(1, 1),
                        dim=1536, depth=38, heads=24, block="v1", prompt_dim=4096, cond_dropout=0.1,
                        batch_size=8, lr=1e-4, warmup=1000, steps=300_000, tau_density="logit_normal",
                        ema_decay=0.9999, pack=19, fsdp=True, checkpointing=True, rope="videorope"),
}

###################### Scheduler kappa (Eq. 3, Lemma B.1) #######################


class Kappa:
    """kappa(t) = P(a frame is visible at global time t) (Eq. 3); subclasses give kappa, dkappa, inverse."""

    def hazard(self, t):
        """The rate at which a pending frame is revealed: dkappa / (1 - kappa) (Eq. 19)."""
        return self.dkappa(t) / (1 - self.kappa(t))

    def reveal_prob(self, t0, t1):
        """P(a frame still pending at t0 is revealed by t1) = (kappa(t1) - kappa(t0)) / (1 - kappa(t0)): exact
        for any step; for linear kappa h / (1 - t), the paper's h dkappa / (1 - kappa). 1 at t0 = 1."""
        k0, k1 = self.kappa(torch.as_tensor(t0)), self.kappa(torch.as_tensor(t1))
        return torch.where(k0 < 1, (k1 - k0) / (1 - k0).clamp_min(1e-30), 1.0)


@dataclass(frozen=True)
class PolyKappa(Kappa):
    """kappa(t) = t^p: p > 1 inserts late (most frames appear near t = 1), p < 1 early."""

    p: float = 2.0

    def kappa(self, t):
        return torch.as_tensor(t) ** self.p

    def dkappa(self, t):
        return self.p * torch.as_tensor(t) ** (self.p - 1)

    def inverse(self, u):
        return torch.as_tensor(u) ** (1 / self.p)


@dataclass(frozen=True)
class LinearKappa(PolyKappa):
    """kappa(t) = t, the paper's default: insertion times are uniform on [0, 1]."""

    p: float = 1.0


KAPPAS = {"linear": LinearKappa, "poly": PolyKappa}

######### Training state in extended time (Eqs. 6-10, 27, Algorithm 2) ##########


@dataclass
class TrainingState:
    """Where every frame of a batch of videos stands at global time tau_g. Indexed by ORIGINAL frame."""

    tau_g: torch.Tensor  # (B,)      global extended time in [0, 2)
    tau: torch.Tensor  # (B, F)      per-frame extended time tau_g - s_i
    t: torch.Tensor  # (B, F)        per-frame flow time clip(tau, 0, 1)^gamma; 1 on context frames
    visible: torch.Tensor  # (B, F)  bool, inserted by tau_g (tau >= 0)
    active: torch.Tensor  # (B, F)   bool, visible and still flowing (tau < 1, not context)
    K: torch.Tensor  # (B, F)        long, pending frames right of each visible frame (0 elsewhere)
    valid: torch.Tensor  # (B, F)    bool, i < n_b
    context: torch.Tensor  # (B, F)  bool, a clean frame given to the model (sample_context)
    passive: torch.Tensor  # (B, F)  bool, a context frame that may not insert to its right


TAU_DENSITIES = ("uniform", "logit_normal", "late")


def sample_tau_g(n, density="uniform", generator=None, device=None):
    """Global time tau_g in [0, 2): uniform, logit-normal (2 sigmoid(N(0, 1))) or 'late': half on [0, 1) with
    density 1 / (2 sqrt(1 - t)), near 1 where the last insertions decide a length, half on [1, 2). The law
    of the state GIVEN tau_g, which the sampler must match, is the same for all: only how often differs."""
    if density == "uniform":
        return 2 * torch.rand(n, generator=generator, device=device)
    if density == "logit_normal":
        return 2 * torch.sigmoid(torch.randn(n, generator=generator, device=device))
    assert density == "late", density
    u, coin = torch.rand(2, n, generator=generator, device=device)
    return torch.where(coin < 0.5, 1 - (1 - u) ** 2, 1 + u)


def pending_counts(visible, valid):
    """K_j: the deleted frames between visible frame j and the next visible one (or the video's end). Every
    deleted frame belongs to the last visible frame on its left (frame 0 is always visible)."""
    index = torch.arange(visible.shape[1], device=visible.device).expand_as(visible)  # (B, F)
    owner = torch.where(visible, index, -1).cummax(dim=1).values  # (B, F) last visible frame at or before i
    deleted = (valid & ~visible).long()
    return torch.zeros_like(deleted).scatter_add_(1, owner.clamp_min(0), deleted)


def choose(allowed, k, generator=None):
    """(B, F) bool: k[b] of row b's allowed frames, a uniform subset (frame 0 always, if allowed)."""
    score = torch.rand(allowed.shape, generator=generator, device=allowed.device)  # (B, F)
    score = torch.where(allowed, score.index_fill(1, torch.tensor([0], device=allowed.device), -1.0), 2.0)
    return allowed & (score.argsort(dim=1).argsort(dim=1) < k[:, None])  # the k lowest scores: a random order


def sample_training_state(lengths, kappa=LinearKappa(), n_start=1, tau_g=None, generator=None,
                          tau_density="uniform", context=None, passive=None, gamma=1.0):
    """Algorithm 2: the extended-time state of videos of these lengths (B,) at tau_g (None: drawn from
    tau_density; or a float or (B,) tensor). Start frames (s_i = 0): frame 0 (nothing is inserted left of it)
    and n_start - 1 uniform others; with context (B, F), which begins a video, one uniform among the free
    frames before more context: the model's clock (t = tau_g), where make_start puts it. Rows with no active
    frame, never visited by the sampler, redraw s (and tau_g unless fixed); the paper's tau_g ~ U(0, max_i
    s_i + 1) instead tilts the law of s by 1 / (max_i s_i + 1) (tested)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    device, B, F = lengths.device, len(lengths), int(lengths.max())
    valid = torch.arange(F, device=device) < lengths[:, None]  # (B, F)
    context, passive = (valid & (p if p is not None else torch.zeros_like(valid)) for p in (context, passive))
    free = valid & ~context  # the frames the model generates
    has_context = context.any(dim=1)  # (B,)
    assert (context[:, 0] | ~has_context).all(), "context begins a video (sample_context, make_start)"
    assert (lengths >= n_start).all(), f"videos shorter than n_start={n_start}"
    first_gap = free & ((context & (free.cumsum(dim=1) > 0)).cumsum(dim=1) == 0)  # free, before more context
    may_start = torch.where(has_context[:, None], first_gap, free)
    n_starts = torch.where(has_context, 1, n_start)  # (B,)
    fixed = tau_g is not None
    tau_g = torch.as_tensor(tau_g if fixed else 0.0, device=device).float().expand(B).clone()
    s, redraw = torch.empty(B, F, device=device), torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(10_000):  # rejection: a shrinking set of rows, vectorised within each round
        if not redraw.any():
            break
        rows = redraw.nonzero().squeeze(1)
        s_new = kappa.inverse(torch.rand(len(rows), F, generator=generator, device=device))  # Eq. (27)
        start = choose(may_start[rows], n_starts[rows], generator)
        s[rows] = torch.where(start | context[rows], 0.0, s_new)
        if not fixed:
            tau_g[rows] = sample_tau_g(len(rows), tau_density, generator, device)
        tau = tau_g[rows, None] - s[rows]
        redraw[rows] = ~(free[rows] & (tau >= 0) & (tau < 1)).any(dim=1)  # no active frame: draw again
    assert not redraw.any(), "10,000 rounds of rejection left a video without an active frame"
    tau = tau_g[:, None] - s  # (B, F)                                                     Eq. (8)
    visible = valid & (tau >= 0)  # deleted frames: not inserted yet                      Eq. (9)
    t = torch.where(context, 1.0, tau.clamp(0, 1) ** gamma)  # (B, F)       Eq. (9); Appendix E
    return TrainingState(tau_g=tau_g, tau=tau, t=t, visible=visible, active=visible & (tau < 1) & ~context,
                         K=pending_counts(visible, valid), valid=valid, context=context, passive=passive)


def baseline_state(lengths, context=None, passive=None, generator=None):
    """The baselines' state, without extended time (Appendix C.1): every frame is there, those not given flow
    at one time t = sigmoid(N(0, 1)) (the 'lognorm' schedule), K = 0 (no rate is trained). The AR baselines
    are full sequences cut after the frame that flows (train.global_batch)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    valid = torch.arange(int(lengths.max()), device=lengths.device) < lengths[:, None]  # (B, F)
    context, passive = (valid & (p if p is not None else torch.zeros_like(valid)) for p in (context, passive))
    t = torch.sigmoid(torch.randn(len(lengths), generator=generator, device=lengths.device))  # (B,)
    tau = torch.where(context, 1.0, t[:, None])  # (B, F)
    return TrainingState(tau_g=t, tau=tau, t=tau, visible=valid, active=valid & ~context, passive=passive,
                         K=torch.zeros_like(valid, dtype=torch.long), valid=valid, context=context)


@dataclass
class TrainingBatch:
    """What the model sees (each video's visible frames first) and the targets; all per frame (pack_batch)."""

    x_t: torch.Tensor  # (B, F', C, H, W)    noisy visible frames, Eq. (10)
    cond: torch.Tensor  # (B, F', C, H, W)   conditioning stream: clean context frames, zeros elsewhere
    t: torch.Tensor  # (B, F')               per-frame flow time
    mask: torch.Tensor  # (B, F')            bool, a real frame
    target: torch.Tensor  # (B, F', C, H, W) velocity target x_1 - x_0
    active: torch.Tensor  # (B, F')          bool, still flowing: in the velocity loss
    can_insert: torch.Tensor  # (B, F')      bool, a slot in the rate loss (not passive, tau_g < 1)
    K: torch.Tensor  # (B, F')               long, pending frames right of each slot
    video: torch.Tensor  # (B, F')           long, which video of the row (0; several once packed); -1 padding
    position: torch.Tensor  # (B, F')        long, the frame's index in its video
    prompt: torch.Tensor  # (B, P, E)        the prompt tokens' embeddings (P = 0: no prompt)
    prompt_video: torch.Tensor  # (B, P)     long, each prompt token's video; -1: padding, or dropped


def make_training_batch(x_1, state, generator=None, cond_dropout=0.0, prompt=None, prompt_mask=None):
    """Noise the clean videos x_1 (B, F, C, H, W) to the state's times and strip the deleted frames. Context
    frames are clean (t = 1), in both streams. With probability cond_dropout a video's context and prompt
    (B, P, E), prompt_mask (B, P) are dropped: the context zeros in both streams, same place and t = 1, the
    prompt empty, for the unconditional model of guidance (Eq. 13)."""
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
    t = state.t.to(x_1.dtype)[:, :, None, None, None]  # (B, F, 1, 1, 1)
    x_t = t * x_1 + (1 - t) * x_0  # (B, F, C, H, W)                            Eq. (10)
    context, B = state.context, x_1.shape[0]
    prompt = x_1.new_zeros(B, 0, 0) if prompt is None else prompt
    prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.bool) if prompt_mask is None else prompt_mask
    if cond_dropout > 0:
        drop = torch.rand(B, generator=generator, device=x_1.device) < cond_dropout  # (B,)
        x_t = torch.where((context & drop[:, None])[:, :, None, None, None], 0.0, x_t)
        context, prompt_mask = context & ~drop[:, None], prompt_mask & ~drop[:, None].to(prompt_mask.device)
    cond = torch.where(context[:, :, None, None, None], x_1, 0.0)  # (B, F, C, H, W)
    # f_strip of Algorithm 2: the visible frames of each row to the front, in order
    n = state.visible.sum(dim=1)
    index = torch.sort((~state.visible).byte(), dim=1, stable=True).indices[:, : int(n.max())]  # (B, F')
    mask = torch.arange(index.shape[1], device=index.device) < n[:, None]  # (B, F')
    strip = lambda z: z[torch.arange(len(z), device=z.device)[:, None], index]  # noqa: E731  (B, F', ...)
    return TrainingBatch(x_t=strip(x_t), cond=strip(cond), t=strip(state.t), mask=mask,
                         target=strip(x_1 - x_0), active=strip(state.active) & mask, K=strip(state.K) * mask,
                         can_insert=mask & ~strip(state.passive) & (state.tau_g < 1)[:, None],
                         video=torch.where(mask, 0, -1), prompt=prompt,
                         prompt_video=torch.where(prompt_mask, 0, -1),
                         position=torch.arange(mask.shape[1], device=mask.device).expand(mask.shape))


def pad_prompts(prompts):
    """Prompts, each (P_i, E) -> (B, P, E) zero-padded and their mask (B, P) bool."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return pad_sequence(prompts, batch_first=True), torch.arange(int(lengths.max())) < lengths[:, None]


#################### Context patterns: the tasks of Figure 4 ####################

# A context frame is clean (t = 1), is given in both the noisy and the conditioning stream, never moves,
# and is active (it may insert to its right) or passive (it may not).
TASKS = ("uncond", "i2v", "interp", "extend")  # sample_context says what each gives


def parse_tasks(spec):
    """'uncond:2,i2v:1' -> {'uncond': 2.0, 'i2v': 1.0}; a bare name weighs 1. A user types it: ValueErrors."""
    mix = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            mix[name] = float(weight or 1)
        except ValueError:
            mix[name] = math.nan  # not a number
        if name not in TASKS or not 0 <= mix[name] < math.inf:
            raise ValueError(f"bad task {item!r} in {spec!r}: tasks are {', '.join(TASKS)}, weights >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError(f"task mix {spec!r} has no positive weight")
    return mix


def sample_context(lengths, tasks="uncond", generator=None):
    """A task per video, drawn from the mix, and its pattern: context, passive (B, F) bool (on the CPU).
    uncond: none. i2v: frame 0, active. interp: the first and last frame (passive), 0-2 active anchors
    between, never frame 1 (the start frame's gap). extend: the first 2..n/2 frames, passive but the last."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    B, F = len(lengths), int(lengths.max())
    none = torch.zeros(B, F, dtype=torch.bool)
    mix = parse_tasks(tasks)
    if {name for name, w in mix.items() if w > 0} == {"uncond"}:
        return none, none.clone()
    assert lengths.min() >= 3, "context tasks need videos of at least 3 frames"
    names = list(mix)
    task = torch.multinomial(torch.tensor(list(mix.values())), B, replacement=True, generator=generator)
    is_task = lambda name: (task == names.index(name) if name in names else none[:, 0])[:, None]  # noqa: E731
    i, n = torch.arange(F), lengths[:, None]  # (F,), (B, 1)
    anchors = choose((i >= 2) & (i <= n - 2), torch.randint(0, 3, (B,), generator=generator), generator)
    interp = is_task("interp") & ((i == 0) | (i == n - 1) | anchors)
    j = 2 + (torch.rand(B, 1, generator=generator) * ((n // 2).clamp_min(2) - 1)).long()
    extend = is_task("extend") & (i < j)
    context = (is_task("i2v") & (i == 0)) | interp | extend
    passive = (interp & (i == n - 1)) | (extend & (i < j - 1))
    return context & (i < n), passive & (i < n)  # nothing beyond a video's end


########################### Losses (Eqs. 11, 12, 20) ############################


def velocity_loss(v, batch, count=None):
    """Squared error to x_1 - x_0 on the active frames, mean over ALL of them (Eq. 12; a per-video mean biases
    towards under-insertion, Appendix E). count: the divisor (train.py: the global batch's active frames)."""
    err = (v.float() - batch.target.float()).pow(2).flatten(2).mean(dim=2)  # (B, F')
    err = torch.where(batch.active, err, 0.0)  # where, not a product: padding may hold inf
    return err.sum() / (batch.active.sum().clamp_min(1) if count is None else count)


def rate_loss(log_lam, batch, count=None):
    """Poisson NLL lam - K log lam on the slots that may insert, while tau_g < 1 (Eqs. 11, 20); its minimiser
    is E[K_j | x_t] (Corollary B.3). From log lam in fp32, never log(exp(x) + eps), which loses every rate
    below e^-18. Unweighted: Eq. (19)'s hazard weight is off, as the paper keeps it."""
    log_lam = log_lam.float()
    nll = torch.where(batch.can_insert, log_lam.exp() - batch.K.float() * log_lam, 0.0)  # (B, F') Eq. (11)
    return nll.sum() / (batch.can_insert.sum().clamp_min(1) if count is None else count)


################## The DiT, with per-frame time (Section 3.4) ###################


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """A scalar -> D: sinusoidal features of scale * value, then an MLP (DiT's); scale 1 for frame counts."""

    def __init__(self, dim, scale=1000.0, freq_dim=256):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (...) -> (..., D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)  # (half,)
        angles = self.scale * t.float()[..., None] * freqs  # (..., half)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def rope_split(head_dim, rows=2, cols=2):
    """Head channels per RoPE axis (frame, h, w), each even: h and w get about a third each, unless a frame is
    one patch high (rows = 1) or wide: a constant position rotates nothing, so the frame axis takes them."""
    hw = 2 * (head_dim // 6)
    h, w = hw * (rows > 1), hw * (cols > 1)
    return head_dim - h - w, h, w


def rope_angles(pos, cfg):
    """RoPE positions (..., 3) over (frame, row, column) -> angles (..., head_dim / 2) for cfg's heads. axial:
    a block of channels per axis (rope_split), frames at 1 .. 1/rope_frame_base rad, rows and columns at
    1 .. 1/10,000. videorope (Wei et al. 2025, the paper's): frequencies 1 .. 1/10,000, the lowest quarter
    for the frame (low-frequency temporal allocation), the others for rows and columns in turn, at (delta f,
    delta f + row, delta f + column) from the frame's centre (diagonal layout; delta: temporal spacing)."""
    head_dim, rows, cols = cfg.dim // cfg.heads, cfg.height // cfg.patch[0], cfg.width // cfg.patch[1]
    if cfg.rope == "videorope":
        freqs = 10_000 ** (-torch.arange(0, head_dim, 2, device=pos.device) / head_dim)  # (hd/2,) high to low
        spatial = 2 * (3 * head_dim // 16)  # frequencies for rows and columns, in turn; the rest: the frame
        axis = torch.tensor([1, 2] * (spatial // 2) + [0] * (head_dim // 2 - spatial), device=pos.device)
        f = cfg.rope_delta * pos[..., :1].float()  # (..., 1)
        centred = pos[..., 1:].float() - torch.tensor([(rows - 1) / 2, (cols - 1) / 2], device=pos.device)
        return torch.cat([f, f + centred], dim=-1)[..., axis] * freqs  # (..., hd/2)
    out = []
    for axis, d in enumerate(rope_split(head_dim, rows, cols)):
        base = cfg.rope_frame_base if axis == 0 else 10_000.0  # a video has tens of frames, a frame few rows
        freqs = base ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)  # (d/2,)
        out.append(pos[..., axis, None].float() * freqs)
    return torch.cat(out, dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the channel pairs of x (B, heads, N, hd) by the angles given as cos, sin (B, 1, N, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, N, hd/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE; who attends to whom is the caller's mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, attn_mask, kv=None):  # x (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # (B, h, N, hd)
        if kv is not None:  # a KV cache (generate_ar): the earlier frames' keys and values, then these
            k, v = kv(k, v)
        if isinstance(attn_mask, BlockMask):  # speed "flex": FlexAttention skips the blocks nobody sees
            return self.proj(rearrange(flex_attention(q, k, v, block_mask=attn_mask), "b h n d -> b n (h d)"))
        out = nnf.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


def norm_mlp(d_in, dim, d_out):
    """Linear, RMSNorm, SiLU, Linear: the official code's adaLN (d_in = dim) and prompt projector."""
    return nn.Sequential(nn.Linear(d_in, dim), nn.RMSNorm(dim), nn.SiLU(), nn.Linear(dim, d_out))


class SwiGLU(nn.Module):
    """The official block's MLP: w2(silu(w1 x) * w3 x), without biases (w1 and w3 as one matrix)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w13, self.w2 = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(nnf.silu(a) * b)


class DiTBlock(nn.Module):
    """adaLN-Zero: each frame's conditioning sets shift, scale and gate for all its tokens, rate token too.
    block 'dit': DiT's GELU MLP and one-layer adaLN; 'v1': the official FlowceptionV1's SwiGLU (2/3 of the
    hidden width, no biases) and two-layer adaLN. Prompt tokens y (prompt=True) join the attention (the same
    q, k, v: joint attention), modulated by a shift, scale and gate computed from each token; no MLP."""

    def __init__(self, dim, heads, mlp_ratio, block="dit", prompt=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if block == "dit":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU("tanh"), nn.Linear(hidden, dim))
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        else:
            self.mlp, self.adaLN_modulation = SwiGLU(dim, 2 * hidden // 3), norm_mlp(dim, dim, 6 * dim)
        self.prompt_modulation = norm_mlp(dim, dim, 3 * dim) if prompt else None

    def forward(self, x, c, cos, sin, attn_mask, kv=None, y=None):  # x (B, F, L+1, D), c (B, F, D), y (B,P,D)
        mod = self.adaLN_modulation(c)[:, :, None].chunk(6, dim=-1)  # 6 x (B, F, 1, D): once per frame
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(self.norm1(x), shift_msa, scale_msa).flatten(1, 2)  # (B, N, D) what attention sees
        if y is not None:  # the prompt tokens after the video's
            shift_y, scale_y, gate_y = self.prompt_modulation(y).chunk(3, dim=-1)  # (B, P, D) each
            h = torch.cat([h, modulate(self.norm1(y), shift_y, scale_y)], dim=1)  # (B, N + P, D)
        out = self.attn(h, cos, sin, attn_mask, kv)  # (B, N + P, D)
        N = x.shape[1] * x.shape[2]
        x = x + gate_msa * out[:, :N].view_as(x)
        y = None if y is None else y + gate_y * out[:, N:]
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), y


class Flowception(nn.Module):
    """model(x_t, t, mask, cond) -> (v, log_lam): a velocity for every frame, a log insertion rate per slot.
    Each frame: L patch tokens over 2C channels (noisy and conditioning stream) and one learned rate token
    (shared). Attention over the tokens of the real frames of a video (or within +-window frames) and of its
    prompt (prompt_dim > 0): the encoder's embeddings projected to D, their mean added to every frame's
    conditioning. A final adaLN layer, then a linear map gives v from the patch tokens, a small MLP log lam
    from the rate token."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        ph, pw = cfg.patch
        self.x_embedder = nn.Linear(2 * cfg.channels * ph * pw, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.count_embedder = TimestepEmbedder(cfg.dim, scale=1.0) if cfg.count_embedding else None
        self.rate_token = nn.Parameter(torch.zeros(cfg.dim))
        self.prompt_projector = norm_mlp(cfg.prompt_dim, cfg.dim, cfg.dim) if cfg.prompt_dim else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.block, cfg.prompt_dim > 0)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final_linear = nn.Linear(cfg.dim, cfg.channels * ph * pw)
        self.rate_head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 1))
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears, then adaLN-Zero (every gate and both heads' last layer start at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.rate_token, std=0.02)
        for embedder in (e for e in (self.t_embedder, self.count_embedder) if e is not None):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [b.prompt_modulation[-1] for b in self.blocks if b.prompt_modulation is not None]
        zero += [self.final_modulation[-1], self.final_linear]
        for layer in zero + [self.rate_head[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def positions(self, position):
        """RoPE positions (B, F, L+1, 3): (frame index in its video, row, column); rate tokens centred."""
        hp, wp = self.cfg.height // self.cfg.patch[0], self.cfg.width // self.cfg.patch[1]
        h, w = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        hw = torch.stack([h, w], -1).flatten(0, 1).float()  # (L, 2) patch tokens
        hw = torch.cat([hw, torch.tensor([[(hp - 1) / 2, (wp - 1) / 2]])])  # (L+1, 2) and the rate token
        hw = hw.to(position.device).expand(*position.shape, -1, -1)  # (B, F, L+1, 2)
        return torch.cat([position[:, :, None, None].float().expand(*hw.shape[:3], 1), hw], dim=-1)

    def attention_mask(self, video, position, L1, prompt_video):
        """(B, 1, N + P, N + P) bool: a token sees its video's tokens and prompt tokens; a frame's tokens see
        another frame's within +-window frames only (ar_causal: up to their own frame)."""
        position = position.repeat_interleave(L1, dim=1)  # (B, N)
        video = torch.cat([video.repeat_interleave(L1, dim=1), prompt_video], dim=1)  # (B, N + P)
        allowed = video[:, :, None] == video[:, None, :]  # (B, N + P, N + P)
        frames = allowed[:, : position.shape[1], : position.shape[1]]  # (B, N, N) a view: between frames
        if self.cfg.window:
            frames &= (position[:, :, None] - position[:, None, :]).abs() <= self.cfg.window
        if self.cfg.paradigm == "ar_causal":
            frames &= position[:, None, :] <= position[:, :, None]
        return allowed[:, None]

    def forward(self, x_t, t, mask, cond, video=None, position=None, cache=None, prompt=None,
                prompt_video=None):
        """video, position (B, F): each frame's video in a packed row (-1: padding) and index in it, as in
        TrainingBatch (default: one video per row). cache: a KVCache, one frame per row. prompt (B, P, E):
        the encoder's embeddings of each row's prompt tokens, prompt_video (B, P) their video (-1: padding;
        default 0: all real); no prompt, or every token padding, is the empty prompt."""
        cfg, (B, F), (ph, pw) = self.cfg, mask.shape, self.cfg.patch
        if video is None:
            video, position = torch.where(mask, 0, -1), torch.arange(F, device=mask.device).expand(B, F)
        z = torch.cat([x_t, cond], dim=2)  # (B, F, 2C, H, W)
        tokens = rearrange(z, "b f c (h p) (w q) -> b f (h w) (p q c)", p=ph, q=pw)
        x = self.x_embedder(tokens.to(self.x_embedder.weight.dtype))  # (B, F, L, D)
        x = torch.cat([x, self.rate_token.to(x.dtype).expand(B, F, 1, -1)], dim=2)  # (B, F, L+1, D)
        c = self.t_embedder(t)  # (B, F, D) per-frame conditioning
        if self.count_embedder is not None:  # the frames a frame sees: its video's (causal: up to its own)
            same = video[:, :, None] == video[:, None, :]  # (B, F, F)
            c = c + self.count_embedder(position + 1 if cfg.paradigm == "ar_causal" else same.sum(2))
        y, P = None, 0 if prompt is None or self.prompt_projector is None else prompt.shape[1]
        if not P or prompt_video is None:  # no prompt tokens; or, by default, every one real
            prompt_video = torch.zeros(B, P, dtype=torch.long, device=mask.device)
        if P:
            y = self.prompt_projector(prompt.to(x.dtype))  # (B, P, D)
            mine = (video[:, :, None] == prompt_video[:, None, :]).to(y.dtype)  # (B, F, P) its video's tokens
            c = c + mine @ y / mine.sum(dim=2, keepdim=True).clamp_min(1)  # (B, F, D) + the mean prompt token
        angles = rope_angles(self.positions(position).flatten(1, 2), cfg)  # (B, N, hd/2)
        angles = nnf.pad(angles, (0, 0, 0, prompt_video.shape[1]))  # (B, N + P, hd/2) prompt tokens unturned
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, N + P, hd/2)
        assert cache is None or F == 1, "a KV cache runs one frame per row"
        attn_mask = self.attention_mask(video, position, x.shape[2], prompt_video) if cache is None else None
        if "flex" in cfg.speed and cache is None:  # the same mask as FlexAttention's blocks
            allowed, N = attn_mask, attn_mask.shape[-1]
            attn_mask = create_block_mask(lambda b, h, q, k: allowed[b, 0, q, k], B, None, N, N, mask.device)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else functools.partial(cache.attend, i)  # block i's part of the cache
            if cfg.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                block = functools.partial(torch.utils.checkpoint.checkpoint, block, use_reentrant=False)
            x, y = block(x, c, cos, sin, attn_mask, kv, y)  # (B, F, L+1, D), (B, P, D)
        shift, scale = self.final_modulation(c)[:, :, None].chunk(2, dim=-1)  # (B, F, 1, D)
        x = modulate(self.final_norm(x), shift, scale)  # (B, F, L+1, D) final adaLN, rate token too
        out = self.final_linear(x[:, :, :-1])  # (B, F, L, ph pw C)
        v = rearrange(out, "b f (h w) (p q c) -> b f c (h p) (w q)", h=cfg.height // ph, p=ph, q=pw)
        log_lam = self.rate_head(x[:, :, -1]).squeeze(-1)  # (B, F)
        return v.to(x_t.dtype, copy=True), log_lam.to(torch.float32, copy=True)  # not views: FSDP2's hooks


build_model = Flowception  # the DiT for a config; under `with torch.device("meta")` it costs no memory


@functools.cache
def forward_flops(cfg, frames, seen=None, prompt=0):
    """Matmul FLOPs of a forward pass over ONE video of `frames` frames and `prompt` prompt tokens, counted
    for MFU as torchtitan does (training: 3x): 2 per weight per token it acts on (adaLN, embedders, rate head:
    once per frame), 4 D per query-key pair per block. seen: the frames that frames see, summed (None: their
    video, window, causal); prompt tokens see and are seen by every token of their video."""
    D, C, (ph, pw), hidden = cfg.dim, cfg.channels, cfg.patch, int(cfg.dim * cfg.mlp_ratio)
    L = (cfg.height // ph) * (cfg.width // pw)  # patch tokens per frame; L + 1 with the rate token
    mlp, adaln = (3 * D * (2 * hidden // 3), 7 * D * D) if cfg.block == "v1" else (2 * D * hidden, 6 * D * D)
    per_token = cfg.depth * (4 * D * D + mlp)  # qkv, projection, MLP
    per_patch = 2 * C * ph * pw * D + D * C * ph * pw  # patch embedding (2C channels in), velocity head
    embedders = (256 * D + D * D) * (1 + cfg.count_embedding)  # time (and count) embedding
    per_frame = embedders + cfg.depth * adaln + 2 * D * D + (D * D + D) + prompt * D  # final, rate head, mean
    per_prompt = cfg.depth * 8 * D * D + cfg.prompt_dim * D + D * D  # qkv, projection, its adaLN; projector
    w, causal = cfg.window or frames, cfg.paradigm == "ar_causal"
    if seen is None:  # frame i sees frames max(0, i - w) .. min(frames - 1, i + w), or up to i
        seen = sum(min(frames, i + 1 if causal else i + w + 1) - max(0, i - w) for i in range(frames))
    N = frames * (L + 1)  # seen x (L + 1)^2 query-key pairs, and with the prompt 2 N prompt + prompt^2
    attention = 4 * cfg.depth * D * (seen * (L + 1) ** 2 + 2 * N * prompt + prompt**2)
    video = frames * ((L + 1) * per_token + L * per_patch + per_frame)
    return 2 * video + 2 * prompt * per_prompt + attention


################## The sampler (Algorithm 1, Appendix B.3, E) ###################


@dataclass
class Start:
    """What generation starts from, in order: clean context frames and noise start frames (Figure 4)."""

    frames: torch.Tensor  # (B, F0, C, H, W) the values of start frames are ignored (drawn as noise)
    context: torch.Tensor  # (B, F0) bool, True: a context frame (t = 1); False: a start frame (t = 0)
    passive: torch.Tensor  # (B, F0) bool, context frames that may not insert to their right


def make_start(task, frames, n_start=1):
    """A task's start from its context frames (B, A, C, H, W) and n_start start frames (> 1: the baseline),
    placed where sample_training_state puts its start frame. i2v: the frame (active), start. interp: the
    first anchor, start, the middle anchors (active), the last (passive); the gaps' sizes are the model's.
    extend: the clip (passive but its last frame), start."""
    B, A = frames.shape[:2]
    assert A == 1 if task == "i2v" else A >= (2 if task == "interp" else 1), f"{task} with {A} context frames"
    assert n_start == 1 or task != "interp", "the baseline of interp would need the length of every gap"
    passive = [task == "extend"] * (A - 1) + [task == "interp"]  # of the context frames
    at = A if task == "extend" else 1  # where the start frames go
    starts = torch.zeros_like(frames[:, :1]).expand(-1, n_start, -1, -1, -1)
    frames = torch.cat([frames[:, :at], starts, frames[:, at:]], dim=1)
    i = torch.arange(A + n_start, device=frames.device)
    context = (i < at) | (i >= at + n_start)
    passive = torch.tensor(passive[:at] + [False] * n_start + passive[at:], device=frames.device)
    return Start(frames=frames, context=context.expand(B, -1).clone(), passive=passive.expand(B, -1).clone())


def next_time(kappa, tau_g, pending, steps, max_reveal_prob=0.1, floor=1e-4):
    """Each video's next global time (B,) from tau_g < 1: h = 1 / steps, or less where h would reveal more
    than max_reveal_prob (c) of the pending frames; 1 once the model expects fewer than c^2 frames still to
    come (pending: its sum of lam; more steps for an error of order c^2), or 1 - kappa < floor. c = 1:
    Algorithm 1's uniform steps, whose last reveals every pending frame at once, unseen."""
    k0, uniform = kappa.kappa(tau_g), torch.where(tau_g + 1 / steps > 1 - 1e-9, 1.0, tau_g + 1 / steps)
    if max_reveal_prob >= 1:
        return uniform
    capped = kappa.inverse(1 - (1 - max_reveal_prob) * (1 - k0))  # 1 - kappa shrinks by 1 - c: reveals c
    done = (1 - k0 < floor) | (pending < max_reveal_prob**2)
    return torch.where(done, 1.0, torch.minimum(uniform, capped))


@dataclass
class SamplerState:
    """The videos being generated; `callback` gets it after every step. Training's names: mask is valid,
    insert_time is s_i, and every frame that is not context is at t_i = clip(tau_g - s_i, 0, 1)^gamma."""

    x: torch.Tensor  # (B, F, C, H, W)
    t: torch.Tensor  # (B, F)           per-frame flow time (1 on context frames)
    mask: torch.Tensor  # (B, F)        bool, a real frame
    context: torch.Tensor  # (B, F)     bool, a clean context frame (never moves)
    passive: torch.Tensor  # (B, F)     bool, a context frame that may not insert to its right
    insert_time: torch.Tensor  # (B, F) the global time at which the frame was inserted (0: start frame)
    tau_g: torch.Tensor  # (B,)     each video's global extended time (past 1 while its last frames finish)
    step: int  # sampler steps so far
    refused: torch.Tensor  # (B,)       insertions refused so far by the max_frames cap

    @property
    def t_g(self):
        """The paper's global time t_g = clip(tau_g, 0, 1) (for callbacks)."""
        return self.tau_g.clamp(max=1)


@dataclass
class Sample:
    """One generated video."""

    frames: torch.Tensor  # (F_i, C, H, W)
    insert_time: torch.Tensor  # (F_i,)
    nfe: int  # model evaluations until this video was done (two per step with guidance)
    refused: int  # insertions refused by the max_frames cap
    context: torch.Tensor = None  # (F_i,) bool, the start's context frames


def insert_frames(state, n_new, tau_g, max_frames, generator=None):
    """Algorithm 1's ins(X, j, eps): n_new[b, j] noise frames (t = 0) right after frame j of row b, all at
    once; insertions past max_frames are refused (leftmost slots first), no frame is evicted."""
    x, mask, (B, F) = state.x, state.mask, state.mask.shape
    n_new = n_new.long() * mask
    n = mask.sum(dim=1)  # (B,)
    before = n_new.cumsum(dim=1) - n_new  # (B, F) insertions asked for left of slot j
    kept = ((max_frames - n).clamp_min(0)[:, None] - before).clamp_min(0).minimum(n_new)  # (B, F)
    n_total = n + kept.sum(dim=1)
    F_new = int(n_total.max())
    mask_new = torch.arange(F_new, device=x.device) < n_total[:, None]  # (B, F_new)
    rows = torch.arange(B, device=x.device)[:, None].expand(B, F)[mask]
    pos = (torch.arange(F, device=x.device) + kept.cumsum(dim=1) - kept)[mask]  # where each old frame goes

    def move(old, new):  # old (B, F, ...) -> (B, F_new, ...): old frames to their new places, `new` elsewhere
        if not torch.is_tensor(new) or new.ndim < 2:  # a number, or one per row (B,)
            new = torch.as_tensor(new, dtype=old.dtype, device=x.device).view(-1, 1).expand(B, F_new).clone()
        new[rows, pos] = old[mask]
        return torch.where(mask_new.view(B, F_new, *[1] * (new.ndim - 2)), new, torch.zeros_like(new))

    noise = torch.randn((B, F_new, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
    return SamplerState(x=move(x, noise), t=move(state.t, 0), mask=mask_new,
                        context=move(state.context, False), passive=move(state.passive, False),
                        insert_time=move(state.insert_time, tau_g), tau_g=tau_g, step=state.step,
                        refused=state.refused + (n_new - kept).sum(dim=1))


def guided_forward(model, state, rate_guidance=1.0, cfg_scale=1.0, text=None):
    """The model on the sampler state -> (v, log_lam). text: the model's prompt arguments (prompt,
    prompt_video), or None. With guidance, also without context and prompt, as conditioning dropout trains
    it: the context blanked in both streams, in place and at t = 1, the prompt empty. Rate guidance log lam =
    w log lam_c + (1 - w) log lam_u (Eq. 13); velocity CFG v = v_u + s (v_c - v_u). One batch for both."""
    ctx = state.context[:, :, None, None, None]  # (B, F, 1, 1, 1)
    x, cond, text = state.x, torch.where(ctx, state.x, 0.0), text or {}
    if (rate_guidance == 1 and cfg_scale == 1) or not (state.context.any() or text):
        return model(x, state.t, state.mask, cond, **text)
    if text:  # the unconditional pass has the empty prompt: every token padding
        prompt, owner = text["prompt"], text["prompt_video"]
        empty = torch.full_like(owner, -1)
        text = dict(prompt=prompt.repeat(2, 1, 1), prompt_video=torch.cat([owner, empty]))
    v, log_lam = model(torch.cat([x, torch.where(ctx, 0.0, x)]), state.t.repeat(2, 1),
                       state.mask.repeat(2, 1), torch.cat([cond, torch.zeros_like(cond)]), **text)
    (v_c, v_u), (log_lam_c, log_lam_u) = v.chunk(2), log_lam.chunk(2)
    return v_u + cfg_scale * (v_c - v_u), rate_guidance * log_lam_c + (1 - rate_guidance) * log_lam_u


@torch.no_grad()
def generate(model, num_videos, frame_shape, kappa=LinearKappa(), n_start=1, steps=100, sampler="poisson",
             max_reveal_prob=0.1, max_frames=64, generator=None, callback=None, device=None,
             dtype=torch.float32, start=None, rate_guidance=1.0, cfg_scale=1.0, gamma=1.0, prompt=None,
             prompt_mask=None, after=0.6):
    """Variable-length videos (a list of Sample): Euler steps interleaved with insertions (Algorithm 1).

    model: any callable model(x_t, t, mask, cond) -> (v, log_lam). start: the context and start frames to
    begin from (make_start); None: n_start start frames. prompt (B, P, E), prompt_mask (B, P): the text (the
    model's prompt_dim) each video is asked for; None: the empty prompt. Each video's global time tau_g walks
    next_time to 1 (max_reveal_prob = 1: Algorithm 1's uniform steps), then, only denoising, steps of
    1 / (after steps) until its frames are clean. Each step, from tau_g to the next tau', for every video:
      1. one forward pass -> v, log lam (two with guidance: rate_guidance w, Eq. 13; cfg_scale s);
      2. flow (Eq. 4): x_i += (t_i' - t_i) v_i, to t_i' = clip(tau' - s_i, 0, 1)^gamma, its training time at
         tau_g = tau' (Appendix E: exact if trained with that gamma); context frames stay at t = 1;
      3. while tau_g < 1, right of every frame that may insert, with p = reveal_prob(tau_g, tau'),
         Poisson(lam_j p) new frames (Appendix B.3, Eq. 34) or, 'bernoulli', one w.p. min(1, lam_j p)
         (Algorithm 1, which draws p at t_g after the update: ours is exact for the step it covers); new
         frames are N(0, I) noise with s_i = tau', t_i = 0; lam_j <= e^30, beyond any real rate."""
    assert sampler in ("poisson", "bernoulli"), sampler
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    B = num_videos
    if start is None:  # unconditional: n_start start frames
        none = torch.zeros(B, n_start, dtype=torch.bool)
        start = Start(frames=torch.zeros(B, n_start, *frame_shape), context=none, passive=none)
    ctx = start.context.to(device)  # (B, F0)
    noise = torch.randn((B, ctx.shape[1], *frame_shape), generator=generator, device=device, dtype=dtype)
    x = torch.where(ctx[..., None, None, None], start.frames.to(device, dtype), noise)  # (B, F0, C, H, W)
    state = SamplerState(x=x, t=ctx.float(), mask=torch.ones_like(ctx), context=ctx,
                         passive=start.passive.to(device), insert_time=torch.zeros(ctx.shape, device=device),
                         tau_g=torch.zeros(B, dtype=torch.float64, device=device), step=0,
                         refused=torch.zeros(B, dtype=torch.long, device=device))
    text = None
    if prompt is not None:  # (1, P, E): the same prompt for every video
        text = dict(prompt=prompt.to(device).expand(B, -1, -1),
                    prompt_video=torch.where(prompt_mask, 0, -1).to(device).expand(B, -1))
    guided = bool(ctx.any() or text) and (cfg_scale != 1 or rate_guidance != 1)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    capped = math.ceil(math.log(1e-4) / math.log(1 - min(max_reveal_prob, 0.5)))  # steps shrinking 1 - kappa
    for _ in range(steps + capped + 2 + math.ceil(after * steps)):
        tau_g, unfinished = state.tau_g, ((state.t < 1) & state.mask).any(dim=1)  # (B,)
        working = unfinished | (tau_g < 1)  # (B,) the videos not done yet
        if not working.any():
            break
        v, log_lam = guided_forward(model, state, rate_guidance, cfg_scale, text)  # 1. (two with guidance)
        nfe += working * (2 if guided else 1)  # evaluations until a video is done
        lam = torch.where(state.mask & ~state.passive, log_lam.float().clamp(max=30).exp(), 0.0)  # (B, F)
        pending = lam.double().sum(1)  # (B,) the frames the model expects still to come
        tau_next = torch.where(tau_g < 1, next_time(kappa, tau_g, pending, steps, max_reveal_prob),
                               tau_g + 1 / (after * steps))  # 2. flow to it, Eq. (4)
        u = (tau_next[:, None].float() - state.insert_time).clamp(0, 1)  # (B, F) clip(tau_i) at tau_next
        u = torch.where(u > 1 - 1e-6, 1.0, u)  # float slack, so that k steps of h land on 1
        t = torch.where(state.context | ~state.mask, state.t, u**gamma)  # (B, F)              Appendix E
        dt = (t - state.t)[..., None, None, None]  # 0 for frozen frames: context, finished, padded
        x = torch.where(dt > 0, state.x + dt.to(state.x.dtype) * v, state.x)  # frozen: v ignored, even NaN
        state = replace(state, x=x, t=t, tau_g=tau_next, step=state.step + 1)
        if (tau_g < 1).any():  # 3. insertions right of every frame that may insert (Algorithm 1, line 9)
            p = torch.where(tau_g < 1, kappa.reveal_prob(tau_g, tau_next), 0.0)[:, None].float()  # (B, 1)
            if sampler == "poisson":
                n_new = torch.poisson(lam * p, generator=generator)  # Eq. (34)
            else:
                n_new = torch.bernoulli((lam * p).clamp(max=1), generator=generator)
            state = insert_frames(state, n_new, tau_next, max_frames, generator)
        if callback is not None:
            callback(state)
    else:
        raise AssertionError("a frame did not finish `steps` steps after tau_g = 1")
    return [Sample(frames=state.x[b, m], insert_time=state.insert_time[b, m], nfe=int(nfe[b]), refused=int(n),
                   context=state.context[b, m]) for b, (m, n) in enumerate(zip(state.mask, state.refused))]


def never_inserts(model):
    """The model with lam = 0: generate then runs the full-sequence baseline (max_reveal_prob=1)."""

    def no_insertions(*inputs, **kwargs):
        v, log_lam = model(*inputs, **kwargs)
        return v, torch.full_like(log_lam, -1e4)

    return no_insertions


class KVCache:
    """A causal model's keys and values of its clean frames, per block (Appendix D): they never change, as a
    frame never sees the later ones. attend puts them first; with keep, the call's frame joins them."""

    def __init__(self, depth):
        self.kv, self.keep, self.frames = [None] * depth, False, 0

    def attend(self, block, k, v):  # (B, heads, L+1, hd) each
        if self.kv[block] is not None:
            k, v = torch.cat([self.kv[block][0], k], dim=2), torch.cat([self.kv[block][1], v], dim=2)
        if self.keep:
            self.kv[block] = (k, v)
        return k, v


def generate_ar(model, context, length, cache=None, **kwargs):
    """The AR baselines (Section 4.1): one frame after another up to `length`, each flowed from noise in
    exactly `steps` Euler steps (generate's kwargs) with every earlier frame as clean context (an extend
    start). context (B, A, C, H, W): the given frames, A >= 0. cache: an empty KVCache, for an ar_causal
    model: each evaluation then runs the new frame alone, O(j L^2) at frame j. -> (B, length, ...), NFE."""
    frames, nfe, B = context, 0, len(context)

    def new_frame(x_t, t, mask, cond):  # generate's state: the cached frames, then the new one
        j = x_t.shape[1] - 1
        position = torch.full_like(mask[:, j:], j, dtype=torch.long)  # (B, 1)
        v, log_lam = model(x_t[:, j:], t[:, j:], mask[:, j:], cond[:, j:], position * 0, position, cache)
        return nnf.pad(v, (0, 0, 0, 0, 0, 0, j, 0)), nnf.pad(log_lam, (j, 0))  # zeros for the cached frames

    for j in range(context.shape[1], length):
        while cache is not None and cache.frames < j:  # the clean frames not cached yet join the cache
            i, cache.keep, ones = cache.frames, True, torch.ones(B, cache.frames + 1, device=frames.device)
            new_frame(frames[:, : i + 1], ones, ones.bool(), frames[:, : i + 1])
            cache.keep, cache.frames = False, i + 1
        out = generate(never_inserts(model if cache is None else new_frame), B, frames.shape[2:],
                       start=make_start("extend", frames) if j else None, max_reveal_prob=1.0, **kwargs)
        frames = torch.cat([frames, torch.stack([s.frames[-1] for s in out])[:, None]], dim=1)
        nfe += out[0].nfe
    return frames, nfe


######## LTX-Video latents: files, a folder, VAE encode and decode, mp4 #########

def why(e):
    """An exception as a short line, for the one-line errors of files a user hands in."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"


def write_atomically(path, write):
    """write(f) to a binary file path + ".tmp", synced, renamed over path: if it fails, path is as it was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch.save's "unexpected pos"
        raise ValueError(f"cannot write {path} ({why(e)}); the file it would replace is untouched") from None
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


LTX_TEMPORAL, LTX_SPATIAL = 8, 32  # the LTX VAE: 1 + 8k frames of H x W px -> 1 + k of 128 x H/32 x W/32
LTX_T5 = "Lightricks/LTX-Video"  # its text encoder: T5-XXL in text_encoder/, the tokenizer in tokenizer/


def save_latents(path, z, fps, vae=None, prompt=None, text_encoder=None):
    """Normalised latents (F, C, h, w) -> LTX-Video-Trainer's file, atomically: a dict with the latents packed
    as (F h w, C) tokens in (frame, row, column) order, the fps and the VAE that made them (vae_identity);
    a caption's embeddings (P, E) as the trainer's condition files hold them, and their encoder's identity."""
    F, _, h, w = z.shape
    d = {"latents": rearrange(z.cpu(), "f c h w -> (f h w) c"), "num_frames": F, "height": h, "width": w}
    if prompt is not None:
        d |= {"prompt_embeds": prompt, "prompt_attention_mask": torch.ones(len(prompt), dtype=torch.bool)}
    d |= {"fps": float(fps), **(vae or {}), **(text_encoder or {})}
    write_atomically(path, lambda f: torch.save(d, f))


def load_latents(path, channels=None, size=None):
    """One latent file (ours, LTX-Video-Trainer's, LTX-2's) -> (F, C, h, w) and its {fps, vae,
    vae_fingerprint, prompt: the real tokens' embeddings (P, E), text_encoder, text_encoder_fingerprint}
    (None where it does not say). A trainer's latents/x.pt has its prompt in conditions/x.pt."""
    head, sep, tail = path.rpartition(f"{os.sep}latents{os.sep}")  # LTX-Video-Trainer's .precomputed layout
    conditions = f"{head}{os.sep}conditions{os.sep}{tail}" if sep else None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        z = d["latents"].float()
        fps = None if d.get("fps") is None else float(d["fps"])  # a number, or a 0-d tensor
        if z.ndim == 2:  # packed (F h w, C)
            F, h, w = (int(torch.as_tensor(d[k]).flatten()[0]) for k in ("num_frames", "height", "width"))
            z = rearrange(z, "(f h w) c -> f c h w", f=F, h=h, w=w)
        else:  # LTX-2's trainer: (C, F, h, w)
            z = z.permute(1, 0, 2, 3)
        text = d  # the caption's embeddings: in d, or in the trainer's conditions/x.pt, by LTX-Video's T5
        if conditions and os.path.isfile(conditions):
            text = {**torch.load(conditions, map_location="cpu", weights_only=True), "text_encoder": LTX_T5}
        real = text.get("prompt_attention_mask")  # (P,) bool, with prompt_embeds (P, E)
        prompt = None if real is None else text["prompt_embeds"][real.bool()]
    except Exception as e:  # unreadable, not a dict, missing keys, inconsistent shapes
        raise ValueError(f"latent file {path} is not readable ({why(e)})") from None
    if channels is not None and z.shape[1] != channels:
        raise ValueError(f"latent file {path} has {z.shape[1]} channels, the preset wants {channels}")
    if size is not None and tuple(z.shape[2:]) != tuple(size):
        raise ValueError(f"latent file {path} is {z.shape[2]}x{z.shape[3]} latents, the preset wants "
                         f"{size[0]}x{size[1]}")
    if not z.isfinite().all() or (prompt is not None and not prompt.isfinite().all()):
        raise ValueError(f"latent file {path} holds NaN or inf")
    if fps is not None and not 0 < fps < math.inf:
        raise ValueError(f"latent file {path} has fps {fps}, not a positive finite number")
    return z, {"fps": fps, "prompt": prompt, **{k: d.get(k) for k in ("vae", "vae_fingerprint")},
               **{k: text.get(k) for k in ("text_encoder", "text_encoder_fingerprint")}}


def load_latent_folder(folder, cfg):
    """The latent files (*.pt) under a folder, checked -> the clips and their prompts (P, E), held in memory
    (a clip without one: the empty prompt), and their fps, VAE and text encoder. Folders named conditions are
    LTX-Video-Trainer's prompts, read with their latents."""
    files = sorted(path for d, _, fs in os.walk(folder) for f in fs  # regular files: a FIFO hangs torch.load
                   if f.endswith(".pt") and os.path.isfile(path := os.path.join(d, f))
                   and "conditions" not in os.path.relpath(d, folder).split(os.sep))
    if not files:
        raise ValueError(f"no latent files (*.pt) in {folder} (encode videos: train.py --encode-videos)")
    shortest, size = cfg.n_start + 2, (cfg.height, cfg.width)
    loaded = [load_latents(f, cfg.channels, size) for f in tqdm(files, disable=len(files) < 100)]
    vaes = {(i["vae"], i["vae_fingerprint"]) for _, i in loaded}
    prompted = [i for _, i in loaded if i["prompt"] is not None]
    encoders = {(i["text_encoder"], i["text_encoder_fingerprint"]) for i in prompted}
    for what, found in (("VAEs", vaes), ("text encoders", encoders)):
        if len(found) > 1:
            raise ValueError(f"the latents in {folder} come from {len(found)} {what}: "
                             f"{sorted(map(str, found))}")
    if cfg.prompt_dim and {i["prompt"].shape[1] for i in prompted} - {cfg.prompt_dim}:
        raise ValueError(f"the prompts in {folder} are {prompted[0]['prompt'].shape[1]}-d embeddings, the "
                         f"preset's prompt_dim is {cfg.prompt_dim}")
    clips = [(z[: cfg.max_frames], torch.zeros(0, cfg.prompt_dim) if i["prompt"] is None else i["prompt"])
             for z, i in loaded if len(z) >= shortest]
    if not clips:
        raise ValueError(f"no clip in {folder} has {shortest} latent frames or more")
    lengths = collections.Counter(len(z) for z, _ in clips)
    print(f"{folder}: {len(clips)} clips ({len(loaded) - len(clips)} shorter than {shortest} frames "
          f"skipped); clips per latent length: {dict(sorted(lengths.items()))}; {len(prompted)} prompts")
    if len(lengths) == 1:
        print(f"warning: every clip has {len(clips[0][0])} latent frames, the only length the model will "
              "learn (a trainer cache cuts clips to its bucket's length: encode the videos instead)")
    names = ("vae", "vae_fingerprint", "text_encoder", "text_encoder_fingerprint")
    return clips, dict(zip(names, vaes.pop() + (encoders or {(None, None)}).pop()), fps=loaded[0][1]["fps"])


def from_pretrained(what, name_or_path, load):
    """load(name_or_path, subfolder) of a hub id or a local folder, flat or in the hub's subfolders (vae/,
    text_encoder/, ...); what fails is one line naming `what`."""
    if name_or_path.startswith((os.sep, ".")) and not os.path.isdir(name_or_path):
        raise ValueError(f"{what} folder {name_or_path} does not exist")
    flat = os.path.isfile(os.path.join(name_or_path, "config.json"))
    try:
        return load(name_or_path, lambda sub: "" if flat else sub)
    except Exception as e:  # offline without a cache, a wrong path, not that model
        raise ValueError(f"cannot load the {what} from {name_or_path!r} ({why(e)})") from None


def load_vae(name_or_path, device="cpu", dtype=torch.float32):
    """diffusers' AutoencoderKLLTXVideo from a hub id or a folder (flat, or with a vae/ subfolder)."""
    from diffusers import AutoencoderKLLTXVideo  # optional (requirements-optional.txt): imported where used

    return from_pretrained("LTX VAE", name_or_path, lambda name, sub: AutoencoderKLLTXVideo.from_pretrained(
        name, subfolder=sub("vae"), torch_dtype=dtype)).to(device).eval()


def identity(kind, model, name, extra=b""):
    """{kind: the hub id or folder of a diffusers or transformers model, kind_fingerprint: a hash of its
    config (and extra)}: a checkpoint records the VAE and the text encoder its latents and prompts need."""
    config = {k: v for k, v in dict(model.config.items() if isinstance(model.config, dict) else
                                    model.config.to_dict().items()).items()
              if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    config = json.dumps(config, sort_keys=True, default=str)
    name = os.path.abspath(name) if os.path.isdir(name) else name  # a folder: from wherever sample.py runs
    return {kind: name, f"{kind}_fingerprint": hashlib.sha256(config.encode() + extra).hexdigest()[:16]}


def vae_identity(vae, name):
    """The VAE's identity: latents go right only through a VAE of that fingerprint (0.9.0, 0.9.1, 0.9.5 differ
    in config, 0.9.7 in its latent statistics)."""
    stats = torch.cat([vae.latents_mean, vae.latents_std]).double().cpu().numpy().tobytes()
    return identity("vae", vae, name, stats)


def load_text_encoder(name_or_path, device="cpu"):
    """transformers' T5 encoder (bf16) and tokenizer from a hub id or folder: LTX-Video's layout (LTX_T5,
    whose T5 is google/t5-v1_1-xxl) or both in one folder."""
    from transformers import AutoTokenizer, T5EncoderModel  # optional: imported where used

    def load(name, sub):
        encoder = T5EncoderModel.from_pretrained(name, subfolder=sub("text_encoder"), dtype=torch.bfloat16)
        return AutoTokenizer.from_pretrained(name, subfolder=sub("tokenizer")), encoder.to(device).eval()

    return from_pretrained("T5 text encoder", name_or_path, load)


@torch.no_grad()
def encode_text(text_encoder, texts):
    """Captions -> their embeddings (P_i, E) bf16, as LTX-Video-Trainer makes them: 256 tokens (padded, cut,
    the end token), encoded without the mask, the real ones kept. An empty caption: no token at all."""
    tokenizer, encoder = text_encoder
    ids = tokenizer(texts, max_length=256, padding="max_length", truncation=True, add_special_tokens=True,
                    return_tensors="pt")
    embeds = encoder(ids.input_ids.to(encoder.device))[0].to(torch.bfloat16).cpu()  # (B, 256, E)
    return [e[m] if text else e[:0] for e, m, text in zip(embeds, ids.attention_mask.bool(), texts)]


def vae_frames(n):
    """The number of video frames the VAE takes from a clip of n: the largest 1 + 8k <= n."""
    return 1 + (n - 1) // LTX_TEMPORAL * LTX_TEMPORAL


@torch.no_grad()
def encode_video(vae, pixels):
    """pixels (F, 3, H, W) in [-1, 1], sides multiples of 32 -> latents (1 + (F - 1) // 8, 128, H/32, W/32),
    cut to 1 + 8k frames, normalised as diffusers does: (z - latents_mean) * scaling_factor / latents_std."""
    assert pixels.shape[2] % LTX_SPATIAL == 0 and pixels.shape[3] % LTX_SPATIAL == 0, pixels.shape
    p = next(vae.parameters())
    x = pixels[: vae_frames(len(pixels))].to(p.device, p.dtype).permute(1, 0, 2, 3)[None]  # (1, 3, F', H, W)
    z = vae.encode(x).latent_dist.mode()[0]  # (C, f, h, w)
    mean, std = vae.latents_mean.view(-1, 1, 1, 1), vae.latents_std.view(-1, 1, 1, 1)
    return ((z - mean) * vae.config.scaling_factor / std).permute(1, 0, 2, 3).float().cpu()  # (f, C, h, w)


@torch.no_grad()
def decode_latents(vae, z, generator=None):
    """Normalised latents (f, C, h, w) of ONE clip (the VAE's temporal convolutions would mix padding into a
    batch) -> pixels (1 + 8 (f - 1), 3, 32 h, 32 w) in [-1, 1]. A timestep-conditioned VAE (0.9.1 on) decodes
    at timestep 0.05 after mixing in noise 0.025, as diffusers' docs advise (its pipelines' default: 0)."""
    p = next(vae.parameters())
    mean, std = vae.latents_mean.view(-1, 1, 1, 1), vae.latents_std.view(-1, 1, 1, 1)
    z = z.to(p.device, p.dtype).permute(1, 0, 2, 3)[None]  # (1, C, f, h, w)
    z = z * std / vae.config.scaling_factor + mean
    temb = None
    if vae.config.timestep_conditioning:
        z = 0.975 * z + 0.025 * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        temb = torch.tensor([0.05], device=z.device, dtype=z.dtype)
    return vae.decode(z, temb).sample[0].permute(1, 0, 2, 3).float().clamp(-1, 1).cpu()  # (F, 3, H, W)


VIDEO_FILES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")


def read_video(path, size=None, max_frames=None):
    """A video (any ffmpeg reads) -> its first max_frames frames (F, 3, H, W) uint8 (no more decoded) and fps.
    size (H, W): each frame scaled (bicubic, antialiased) to cover it, centre-cropped, as LTX trainers do."""
    import av  # PyAV, optional: imported where used

    frames = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for f in container.decode(stream):
                frame = torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)  # (3, h, w)
                if size is not None:
                    scale = max(size[0] / frame.shape[1], size[1] / frame.shape[2])
                    cover = [max(n, round(m * scale)) for n, m in zip(size, frame.shape[1:])]
                    frame = nnf.interpolate(frame[None].float(), cover, mode="bicubic", antialias=True)[0]
                    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
                    frame = frame[:, top: top + size[0], left: left + size[1]].clamp(0, 255).round().byte()
                frames.append(frame)
                if len(frames) == max_frames:
                    break
            fps = float(stream.average_rate or stream.guessed_rate or 24)
    except Exception as e:
        raise ValueError(f"video {path} cannot be decoded ({why(e)})") from None
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return torch.stack(frames), fps


def write_video(file, frames, fps):
    """frames (F, 3, H, W) uint8 -> an H.264 mp4 (yuv420p: plays everywhere), to a path or a binary file."""
    import av

    with av.open(file, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.height, stream.width, stream.pix_fmt = frames.shape[2], frames.shape[3], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames.permute(0, 2, 3, 1).contiguous().numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


############################ Checkpoints and devices ############################


def load_checkpoint(path):
    """-> (checkpoint, its Config), checked; memory-mapped (26 GB for taichi256): drop it once copied."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist (train one with `python train.py`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, an unsafe pickle...
        raise ValueError(f"checkpoint {path} is not a readable checkpoint ({why(e)})") from None
    missing = {"model", "ema", "config", "step", "preset"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    try:
        cfg = Config.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    for key in ("model", "ema"):
        if {k: v.shape for k, v in ckpt[key].items()} != shapes:
            raise ValueError(f"checkpoint {path}: its {key} weights do not fit its config (names, shapes)")
        if not all(v.isfinite().all() for v in ckpt[key].values()):
            raise ValueError(f"checkpoint {path}: its {key} weights hold NaN or inf")
    return ckpt, cfg


def get_device(name):
    """--device: None (a CUDA GPU when there is one, else the CPU), or a device this torch can use."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    usable = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name.split(":")[0] not in usable:
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)")
    if not usable[name.split(":")[0]]:
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no such device")
    return torch.device(name)


def hold_lock(folder, name):
    """Lock folder/name (flock) till the file returned is closed or the process ends; if held: an error."""
    import fcntl  # not on Windows: imported where used

    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, name), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ValueError(f"another run is using {folder} (it holds {os.path.join(folder, name)})") from None
    return lock
