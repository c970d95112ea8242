"""The LongNet language model (paper Sec. 4.1), readable top to bottom.

Decoder-only Transformer with MAGNETO sub-LayerNorm blocks (Wang et al., 2022: a LayerNorm at
each block input, one more before the attention output projection and one before the second FFN
linear; v/out/FFN weights scaled by ``sqrt(log(2L))`` at init), XPOS (or RoPE) on q and k, and
dilated attention; ``attention="dense"`` makes the same model its own Transformer baseline.
Sizes and attention patterns are data: :data:`PRESETS`, :data:`PATTERNS`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention.kernels import BACKENDS
from .attention.multihead import LayerNorm, MultiheadDilatedAttention
from .attention.settings import AttentionSettings
from .gelu_norm import gelu_layer_norm
from .loss import IGNORE_INDEX, linear_cross_entropy  # IGNORE_INDEX: a label that is not scored, everywhere


# Attention patterns (segment_lengths, dilation_rates).
PATTERNS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "paper": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)),  # LongNet Sec. 4.1
    "paper-8k": ((2048, 4096, 8192), (1, 2, 4)),
    "small": ((256, 512, 1024, 2048), (1, 2, 4, 8)),
    "tiny": ((32, 64, 128), (1, 2, 4)),
}

# Model sizes (paper Sec. 4.1 and its 350M/760M/2.7B scaling runs) plus small ones for CPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, ffn_dim=256, pattern="tiny"),
    "small": dict(n_layer=4, n_embd=256, n_head=8, ffn_dim=1024, pattern="small"),
    "24M": dict(n_layer=6, n_embd=576, n_head=12, ffn_dim=2304, pattern="paper"),  # the Table 2 reproduction
    "125M": dict(n_layer=12, n_embd=768, n_head=12, ffn_dim=3072, pattern="paper"),
    "350M": dict(n_layer=24, n_embd=1024, n_head=16, ffn_dim=4096, pattern="paper"),
    "760M": dict(n_layer=24, n_embd=1536, n_head=16, ffn_dim=6144, pattern="paper"),
    "2.7B": dict(n_layer=32, n_embd=2560, n_head=32, ffn_dim=10240, pattern="paper"),
}


@dataclass
class LongNetConfig:
    """Everything that defines a LongNet. ``LongNetConfig.from_name("125M", vocab_size=...)``."""

    vocab_size: int = 257
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    ffn_dim: int = 256
    attention: str = "dilated"  # "dilated" | "dense"
    segment_lengths: list[int] = field(default_factory=lambda: list(PATTERNS["tiny"][0]))
    dilation_rates: list[int] = field(default_factory=lambda: list(PATTERNS["tiny"][1]))
    position: str = "xpos"  # "xpos" | "rope" | "none"
    rope_theta: float = 10000.0
    xpos_scale_base: float = 512.0
    sub_layernorm: bool = True
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    attn_backend: str = "auto"
    attention_settings: AttentionSettings = field(default_factory=AttentionSettings)  # how attention runs
    loss_chunk_size: int = 4096  # tokens per chunk of the LM head + cross-entropy

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "ffn_dim", "loss_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.attention not in ("dilated", "dense"):
            raise ValueError(f"attention={self.attention!r} must be 'dilated' or 'dense'")
        if self.position not in ("xpos", "rope", "none"):
            raise ValueError(f"position={self.position!r} must be 'xpos', 'rope' or 'none'")
        if self.position != "none" and self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for position={self.position!r}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is not one of {list(BACKENDS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        self.segment_lengths, self.dilation_rates = list(self.segment_lengths), list(self.dilation_rates)
        self.attention_settings = AttentionSettings.of(self.attention_settings)
        if self.attention == "dilated":
            from .attention.pattern import DilationPattern

            DilationPattern(self.segment_lengths, self.dilation_rates)  # validates, warns if no r=1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LongNetConfig":
        """A preset of :data:`PRESETS` (``pattern=`` may name one of :data:`PATTERNS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
        kw = {**PRESETS[name], **overrides}
        pattern = kw.pop("pattern", None)
        if pattern is not None and "segment_lengths" not in overrides:
            if pattern not in PATTERNS:
                raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {list(PATTERNS)}")
            kw["segment_lengths"], kw["dilation_rates"] = map(list, PATTERNS[pattern])
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LongNetConfig settings {sorted(unknown)}")
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, embeddings: bool = True) -> int:
        e, f, l, v = self.n_embd, self.ffn_dim, self.n_layer, self.vocab_size
        biases = 4 * e + f + e if self.bias else 0
        norms = 4 * e + (2 * e + 2 * f if self.sub_layernorm else 0)
        per_layer = 4 * e * e + 2 * e * f + biases + norms
        emb = v * e * (1 if self.tie_embeddings else 2)
        return l * per_layer + 2 * e + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): matmuls ``6 * params``
        (non-embedding, plus the LM head) and attention as docs/semantics.md counts it (backward 2.5x)."""
        matmul = 6 * (self.num_params(embeddings=False) + self.vocab_size * self.n_embd)
        if self.attention == "dense":
            attn_fwd = 2.0 * seq_len * self.n_embd  # causal 2*N^2*H*D over N tokens
        else:
            w_eff = sum(min(w, seq_len) / r**2 for w, r in zip(self.segment_lengths, self.dilation_rates))
            attn_fwd = 2.0 * self.n_embd * w_eff
        return matmul + 3.5 * attn_fwd * self.n_layer


class FeedForward(nn.Module):
    """``fc1 -> GELU -> [LayerNorm] -> fc2``; the inner LayerNorm is MAGNETO's sub-LN."""

    def __init__(self, cfg: LongNetConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.inner_norm = LayerNorm(cfg.ffn_dim, eps=cfg.norm_eps) if cfg.sub_layernorm else None
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # [B, N, E] -> [B, N, E]
        n = self.inner_norm
        if n is None:
            h = F.gelu(self.fc1(x))  # [B, N, F]
        else:  # fc1's bias, GELU and sub-LN in one pass each way (gelu_norm.py); same parameters as the modules
            h = gelu_layer_norm(F.linear(x, self.fc1.weight), n.weight, n.bias, n.eps, in_bias=self.fc1.bias)
        return self.dropout(self.fc2(h))


class Block(nn.Module):
    def __init__(self, cfg: LongNetConfig):
        super().__init__()
        dilated = cfg.attention == "dilated"
        self.norm1 = LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = MultiheadDilatedAttention(
            cfg.n_embd, cfg.n_head,
            segment_lengths=cfg.segment_lengths if dilated else None,
            dilation_rates=cfg.dilation_rates if dilated else None,
            causal=True, dropout=cfg.dropout, bias=cfg.bias, sub_layernorm=cfg.sub_layernorm,
            layer_norm_eps=cfg.norm_eps, position=None if cfg.position == "none" else cfg.position,
            rope_theta=cfg.rope_theta, xpos_scale_base=cfg.xpos_scale_base, backend=cfg.attn_backend,
            settings=cfg.attention_settings,
        )
        self.norm2 = LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, start_pos: int = 0, group=None, lengths=None):  # [B, N, E] -> [B, N, E]
        x = x + self.attn(self.norm1(x), start_pos=start_pos, group=group, lengths=lengths)
        return x + self.ffn(self.norm2(x))


class LongNet(nn.Module):
    """Decoder-only LongNet. ``model(idx)`` → logits; ``model.loss(idx, labels)`` → chunked CE."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAGNETO init: Xavier everywhere, v/out/FFN weights scaled by ``sqrt(log(2L))``."""
        gain = math.sqrt(math.log(2 * self.config.n_layer)) if self.config.sub_layernorm else 1.0
        nn.init.normal_(self.embed.weight, std=self.config.n_embd**-0.5)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.n_embd**-0.5)
        for blk in self.blocks:
            blk.attn.reset_parameters(gain=gain)
            for lin in (blk.ffn.fc1, blk.ffn.fc2):
                nn.init.xavier_uniform_(lin.weight, gain=gain)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def hidden_states(self, idx: torch.Tensor, start_pos: int = 0, group=None) -> torch.Tensor:
        """Token ids ``[B, N]`` → final-normed hidden states ``[B, N, E]``.

        ``group``: a process group over which each sequence is split; ``idx`` is this rank's
        contiguous chunk (ranks in position order, lengths may differ) and the result its chunk of
        the hidden states, equal to those rows of one process on the whole sequence.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, N] token ids, got shape {tuple(idx.shape)}")
        # The range check reads the ids back (a host sync); a compiled model leaves it out.
        if not torch.compiler.is_compiling() and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, vocab_size={self.config.vocab_size}), got "
                f"[{int(idx.min())}, {int(idx.max())}]: the tokenizer and the model disagree"
            )
        lengths = None
        if group is not None:  # one exchange of the chunk lengths for all layers
            from .distributed.sequence import gather_lengths

            lengths = gather_lengths(group, idx.shape[1], idx.device, batch=idx.shape[0])
        x = self.drop(self.embed(idx))
        for blk in self.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, start_pos, group, lengths, use_reentrant=False)
            else:
                x = blk(x, start_pos, group, lengths)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, start_pos: int = 0, last_only: bool = False, group=None) -> torch.Tensor:
        """Logits ``[B, N, V]`` (``[B, 1, V]`` with ``last_only``). Prefer :meth:`loss` for training."""
        h = self.hidden_states(idx, start_pos, group)
        return self.lm_head(h[:, -1:] if last_only else h)

    def loss(self, idx: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", group=None):
        """Next-token cross-entropy, the LM head fused with it (:mod:`.loss`), ``loss_chunk_size`` tokens at a time.

        ``labels`` ``[B, N]`` (``IGNORE_INDEX`` = -100: not scored). ``reduction``: ``"mean"`` over scored
        tokens, ``"sum"``, or ``"none"`` (``[B, N]`` NLL, 0 where not scored). Logits are never
        materialised for more than one chunk, in the forward or the backward; ``"mean"`` and ``"sum"``
        need one GEMM fewer when trained (:func:`.loss.linear_cross_entropy`). With ``group``
        (see :meth:`hidden_states`) it is this rank's chunk's loss: sum it over the group.
        """
        if labels.shape != idx.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match idx {tuple(idx.shape)}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'sum', 'none'")
        out = linear_cross_entropy(self.hidden_states(idx, group=group), self.lm_head.weight, labels,
                                   self.config.loss_chunk_size, reduction="none" if reduction == "none" else "sum")
        if reduction == "mean":
            return out / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return out

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 max_context: int | None = None, eos_id: int | None = None) -> torch.Tensor:
        """Sample up to ``max_new_tokens`` after ``idx`` ``[B, N]`` → ``[B, N + n]``.

        ``max_context`` crops what the model sees to the last tokens (e.g. the training length);
        generation stops early once every row has produced ``eos_id``. No key-value cache: each
        step recomputes the visible context.
        """
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            ctx = idx if not max_context else idx[:, -max_context:]
            nxt = sample_next(self(ctx, last_only=True)[:, -1].float(), temperature, top_k, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if eos_id is not None:
                done |= nxt[:, 0] == eos_id
                if bool(done.all()):
                    break
        return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``[B, 1]`` from logits ``[B, V]``: greedy at ``temperature <= 0``, else sampled
    (top-k filtered) with ``generator`` on its own device."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).to(logits.device)
