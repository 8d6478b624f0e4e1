"""Hypothesis strategies for testing fxquant passes: random transformer blocks, weights with outliers, specs.

Tensors are not drawn element by element (slow, and shrinking a 64x64 matrix value by value says little):
a strategy draws a *seed* and a few structural choices (shapes, where the outlier channels are, how large),
and builds the tensor from them. Hypothesis then shrinks towards small shapes, seed 0 and fewer, milder
outliers, which is the minimal failing example a pass author wants to read.

Blocks are small ``nn.Module`` s written here (pre-norm attention + MLP with residuals), captured with
:func:`fxquant.capture` like any model. Capturing costs ~0.2 s, so the capture of each *structure* is cached
and each example only swaps in freshly drawn weights.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from fxquant.capture import CapturedGraph, capture
from fxquant.quant import QuantSpec

__all__ = [
    "BlockConfig", "TransformerBlock", "Block", "block_configs", "blocks", "captured_blocks", "tiny_llama_configs",
    "tiny_llamas", "make_block", "make_tiny_llama", "TinyLlama", "weights", "activations", "scales", "quant_specs", "fp_quant_specs", "copy_captured",
    "outlier_tensor",
]

NormKind = Literal["rmsnorm", "rmsnorm_hf", "layernorm"]


# ---- the block ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    """The structure of one random transformer block (hashable: captures are cached per config)."""

    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    norm: NormKind = "rmsnorm"          # nn.RMSNorm (aten.rms_norm), HF-style decomposed RMSNorm, or LayerNorm
    mlp: Literal["swiglu", "gelu", "relu"] = "swiglu"
    bias: bool = False                 # biases on every linear (and LayerNorm)
    rope: bool = True                  # rotate-half rotary embedding on q and k
    attention: Literal["sdpa", "matmul"] = "sdpa"
    batch: int = 2
    seq: int = 8

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide into heads ({self.heads}) and heads into "
                             f"kv_heads ({self.kv_heads})")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linears(self) -> list[str]:
        """Names of the block's linear modules, in forward order."""
        mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] if self.mlp == "swiglu" else ["mlp.fc1", "mlp.fc2"]
        return ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", *mlp]


class _HFRMSNorm(nn.Module):
    """RMSNorm written out as Hugging Face LLaMA does (the decomposed form export records for real models)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _norm(kind: NormKind, dim: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "rmsnorm_hf":
        return _HFRMSNorm(dim)
    return nn.LayerNorm(dim, bias=bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.c = c
        kv = c.kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden, c.hidden, bias=c.bias)
        self.k_proj = nn.Linear(c.hidden, kv, bias=c.bias)
        self.v_proj = nn.Linear(c.hidden, kv, bias=c.bias)
        self.o_proj = nn.Linear(c.hidden, c.hidden, bias=c.bias)
        inv = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        angles = torch.outer(torch.arange(c.seq).float(), inv)
        emb = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        if c.rope:
            cos, sin = self.cos[:t], self.sin[:t]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = c.heads // c.kv_heads
        if c.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        else:
            if rep > 1:  # GQA as Hugging Face's repeat_kv writes it
                k = k[:, :, None].expand(b, c.kv_heads, rep, t, c.head_dim).reshape(b, c.heads, t, c.head_dim)
                v = v[:, :, None].expand(b, c.kv_heads, rep, t, c.head_dim).reshape(b, c.heads, t, c.head_dim)
            scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.hidden))


class _MLP(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.kind = c.mlp
        if c.mlp == "swiglu":
            self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=c.bias)
            self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=c.bias)
            self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=c.bias)
        else:
            self.fc1 = nn.Linear(c.hidden, c.intermediate, bias=c.bias)
            self.fc2 = nn.Linear(c.intermediate, c.hidden, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.fc1(x)
        return self.fc2(F.gelu(h) if self.kind == "gelu" else F.relu(h))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``h + mlp(norm2(h))``; input ``[batch, seq, hidden]``."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = config  # not an HF config: no ``model_type``, so capture takes explicit example inputs
        self.norm1 = _norm(config.norm, config.hidden, config.bias)
        self.attn = _Attention(config)
        self.norm2 = _norm(config.norm, config.hidden, config.bias)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm1(x))
        return h + self.mlp(self.norm2(h))


# ---- tensors -----------------------------------------------------------------------------------------------------
def outlier_tensor(shape: tuple[int, ...], seed: int, *, outlier_channels: int = 0, outlier_scale: float = 1.0,
                   dim: int = -1, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """``N(mean, std²)`` values with ``outlier_channels`` channels along ``dim`` scaled by ``outlier_scale``.

    LLM activations and weights have a few channels that are 10-100x larger than the rest; they are what
    breaks naive per-tensor scales and what equivalent transforms (TEQ/FSBR) move around, so every strategy
    here can produce them.
    """
    g = torch.Generator().manual_seed(int(seed))
    t = torch.randn(shape, generator=g) * std + mean
    if outlier_channels and shape:
        size = shape[dim]
        picks = torch.randperm(size, generator=g)[: min(outlier_channels, size)]
        index = [slice(None)] * len(shape)
        index[dim] = picks
        t[tuple(index)] *= outlier_scale
    return t


@st.composite
def _outliers(draw: st.DrawFn, allow: bool) -> tuple[int, float]:
    if not allow or not draw(st.booleans()):
        return 0, 1.0
    return draw(st.integers(1, 3)), draw(st.sampled_from([4.0, 16.0, 64.0]))


@st.composite
def weights(draw: st.DrawFn, rows: int | st.SearchStrategy[int] = st.integers(1, 48),
            cols: int | st.SearchStrategy[int] = st.integers(1, 160), *, outliers: bool = True,
            special: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A linear weight ``[rows, cols]`` (``nn.Linear`` layout), scaled like an initialised layer.

    ``outliers``: a few input channels (columns) 4-64x larger. ``special``: sometimes a zero row, a constant
    row or an exactly representable value pattern, the corner cases quantizers get wrong.
    """
    r = rows if isinstance(rows, int) else draw(rows)
    c = cols if isinstance(cols, int) else draw(cols)
    seed = draw(st.integers(0, 2**16))
    n, scale = draw(_outliers(outliers))
    w = outlier_tensor((r, c), seed, outlier_channels=n, outlier_scale=scale, std=1.0 / math.sqrt(max(c, 1)))
    if special and r > 1 and draw(st.booleans()):
        kind = draw(st.sampled_from(["zero_row", "constant_row", "grid"]))
        if kind == "zero_row":
            w[0] = 0.0
        elif kind == "constant_row":
            w[0] = 0.25
        else:
            w[0] = torch.arange(c, dtype=torch.float32) % 5 - 2.0  # ties at .5 steps after scaling
    return w.to(dtype)


@st.composite
def activations(draw: st.DrawFn, shape: tuple[int, ...], *, outliers: bool = True) -> torch.Tensor:
    """An activation tensor of ``shape`` with optional outlier channels along the last dimension."""
    seed = draw(st.integers(0, 2**16))
    n, scale = draw(_outliers(outliers))
    return outlier_tensor(shape, seed, outlier_channels=n, outlier_scale=scale)


@st.composite
def scales(draw: st.DrawFn, channels: int, *, positive: bool = True, max_ratio: float = 100.0) -> torch.Tensor:
    """A per-channel scale vector (what TEQ/FSBR train), log-uniform within ``max_ratio``, a few extreme.

    ``positive=False`` also flips signs: only folds that commute with every sign may accept those.
    """
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    span = math.log(max_ratio)
    s = torch.exp((torch.rand(channels, generator=g) * 2 - 1) * span / 2)
    if draw(st.booleans()):
        s[int(torch.randint(channels, (1,), generator=g))] = max_ratio
    if not positive:
        s = s * torch.where(torch.rand(channels, generator=g) < 0.5, -1.0, 1.0)
    return s


# ---- specs -------------------------------------------------------------------------------------------------------
@st.composite
def quant_specs(draw: st.DrawFn, bits: st.SearchStrategy[int] | None = None,
                granularity: tuple[str, ...] = ("channel", "group", "tensor"),
                group_sizes: st.SearchStrategy[int] = st.sampled_from([1, 3, 8, 32, 64, 128])) -> QuantSpec:
    """Valid integer :class:`QuantSpec` s: 1-8 bits (1 bit only asymmetric), every granularity."""
    b = draw(bits if bits is not None else st.integers(1, 8))
    symmetric = False if b == 1 else draw(st.booleans())
    gran = draw(st.sampled_from(granularity))
    if gran == "group":
        return QuantSpec(bits=b, symmetric=symmetric, group_size=draw(group_sizes))
    return QuantSpec(bits=b, symmetric=symmetric, per_tensor=gran == "tensor")


@st.composite
def fp_quant_specs(draw: st.DrawFn, formats: tuple[str, ...] = ("e3m2", "e2m3", "e2m2", "e2m1"),
                   group_sizes: st.SearchStrategy[int | None] = st.sampled_from([None, 16, 32, 64])) -> Any:
    """Valid minifloat :class:`fxquant.fpformats.FPQuantSpec` s (FP6 E3M2/E2M3, FP5, FP4)."""
    from fxquant.fpformats import FPQuantSpec
    return FPQuantSpec(format=draw(st.sampled_from(formats)), group_size=draw(group_sizes))


# ---- blocks ------------------------------------------------------------------------------------------------------
@st.composite
def block_configs(draw: st.DrawFn, *, norms: tuple[NormKind, ...] = ("rmsnorm", "rmsnorm_hf", "layernorm"),
                  mlps: tuple[str, ...] = ("swiglu", "gelu", "relu"), rope: bool | None = None,
                  bias: bool | None = None, attention: tuple[str, ...] = ("sdpa", "matmul")) -> BlockConfig:
    """Small block structures: GQA head layouts, every norm / MLP (SwiGLU, GELU, ReLU) / attention form, RoPE
    and biases or not. Shrinks towards the first choice of each tuple."""
    head_dim = draw(st.sampled_from([4, 8]))
    kv_heads = draw(st.sampled_from([1, 2]))
    rep = draw(st.sampled_from([1, 2]))
    heads = kv_heads * rep
    return BlockConfig(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
                       intermediate=draw(st.sampled_from([16, 24, 48])), norm=draw(st.sampled_from(norms)),
                       mlp=draw(st.sampled_from(mlps)),  # type: ignore[arg-type]
                       bias=draw(st.booleans()) if bias is None else bias,
                       rope=draw(st.booleans()) if rope is None else rope,
                       attention=draw(st.sampled_from(attention)),  # type: ignore[arg-type]
                       batch=draw(st.integers(1, 2)), seq=draw(st.sampled_from([3, 8])))


def _init_block(module: TransformerBlock, seed: int, outlier_channels: int, outlier_scale: float) -> None:
    """Weights like a trained model's: linears ~ 1/sqrt(in), norm gains ~1 with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(module.named_parameters())):
            sub = int(torch.randint(0, 2**31 - 1, (1,), generator=g)) + i
            if name.endswith("weight") and p.dim() == 2:
                p.copy_(outlier_tensor(tuple(p.shape), sub, std=1.0 / math.sqrt(p.shape[1])))
            elif name.endswith("weight"):  # norm gain: where LLMs grow their activation outliers
                p.copy_(outlier_tensor(tuple(p.shape), sub, std=0.1, mean=1.0, outlier_channels=outlier_channels,
                                       outlier_scale=outlier_scale))
            else:
                p.copy_(outlier_tensor(tuple(p.shape), sub, std=0.02))


@dataclass(repr=False)
class Block:
    """One drawn example: the module, its capture (None until captured) and inputs to run it on.

    Its repr names the structure, seed and input shape, not the tensors: that is what a hypothesis failure
    report prints, and it is enough to rebuild the example with :func:`make_block`.
    """

    config: BlockConfig
    module: TransformerBlock
    inputs: tuple[torch.Tensor, ...]
    cg: CapturedGraph | None = None
    seed: int = 0

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.inputs)
        return f"Block({self.config!r}, seed={self.seed}, inputs={shapes})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis's printer: the short repr, not the fields
        p.text(repr(self))

    def reference(self) -> torch.Tensor:
        """The eager module's output on :attr:`inputs`."""
        with torch.no_grad():
            return self.module(*self.inputs)


@functools.lru_cache(maxsize=64)
def _template(config: BlockConfig) -> CapturedGraph:
    module = TransformerBlock(config).eval()
    x = torch.zeros(config.batch, config.seq, config.hidden)
    return capture(module, (x,))


def copy_captured(cg: CapturedGraph, *, clone_tensors: bool = True, model: torch.nn.Module | None = None
                  ) -> CapturedGraph:
    """An independent copy of ``cg``: a new GraphModule, fxquant annotations deep-copied (``deepcopy`` of a
    GraphModule shares ``node.meta`` dicts), and the tensors cloned unless ``clone_tensors=False``.

    The copy is detached from the model (``model=None`` unless given), so ``write_back`` on it never touches
    the original module.
    """
    gm = copy.deepcopy(cg.gm)
    for old, new in zip(cg.gm.graph.nodes, gm.graph.nodes):
        new.meta = dict(old.meta)
        if "fxquant" in old.meta:
            new.meta["fxquant"] = copy.deepcopy(old.meta["fxquant"])
    tensors = {k: (v.detach().clone() if clone_tensors and isinstance(v, torch.Tensor) else v)
               for k, v in cg.tensors.items()}
    return CapturedGraph(gm=gm, tensors=tensors, fqn=dict(cg.fqn), user_inputs=list(cg.user_inputs), model=model,
                         model_class=cg.model_class, meta=copy.deepcopy(cg.meta))


def _rebind(template: CapturedGraph, module: nn.Module) -> CapturedGraph:
    """The cached capture with ``module``'s tensors behind its placeholders."""
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    cg = copy_captured(template, clone_tensors=False, model=module)
    for ph, fqn in cg.fqn.items():
        if fqn in own:
            cg.tensors[ph] = own[fqn].detach()
    return cg


def make_block(config: BlockConfig = BlockConfig(), seed: int = 0, *, outlier_channels: int = 1,
               outlier_scale: float = 16.0, x: torch.Tensor | None = None, capture_graph: bool = True) -> Block:
    """One block without hypothesis (fixtures, examples): seeded weights, ``outlier_channels`` norm channels
    ``outlier_scale`` x larger, and an input (``x`` or a seeded one with an outlier channel)."""
    module = TransformerBlock(config).eval()
    _init_block(module, seed, outlier_channels, outlier_scale)
    if x is None:
        x = outlier_tensor((config.batch, config.seq, config.hidden), seed + 1, outlier_channels=outlier_channels,
                           outlier_scale=outlier_scale)
    block = Block(config=config, module=module, inputs=(x,), seed=seed)
    if capture_graph:
        block.cg = _rebind(_template(config), module)
    return block


@st.composite
def blocks(draw: st.DrawFn, configs: st.SearchStrategy[BlockConfig] | None = None, *, outliers: bool = True,
           capture_graph: bool = False) -> Block:
    """A random :class:`TransformerBlock` with seeded weights (outlier norm channels) and an input batch."""
    config = draw(configs if configs is not None else block_configs())
    seed = draw(st.integers(0, 2**16))
    n, scale = draw(_outliers(outliers))
    x = draw(activations((config.batch, config.seq, config.hidden), outliers=outliers))
    return make_block(config, seed, outlier_channels=n, outlier_scale=scale, x=x, capture_graph=capture_graph)


def captured_blocks(configs: st.SearchStrategy[BlockConfig] | None = None, *, outliers: bool = True
                    ) -> st.SearchStrategy[Block]:
    """:func:`blocks` with ``block.cg``: the block captured with :func:`fxquant.capture` (cached per structure)."""
    return blocks(configs, outliers=outliers, capture_graph=True)


@st.composite
def tiny_llama_configs(draw: st.DrawFn, max_layers: int = 2) -> Any:
    """Tiny Hugging Face ``LlamaConfig`` s (GQA, RoPE, SwiGLU, RMSNorm; untied lm_head)."""
    from transformers import LlamaConfig
    head_dim = draw(st.sampled_from([8, 16]))
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    return LlamaConfig(vocab_size=draw(st.sampled_from([64, 128])), hidden_size=heads * head_dim,
                       intermediate_size=draw(st.sampled_from([32, 64])),
                       num_hidden_layers=draw(st.integers(1, max_layers)), num_attention_heads=heads,
                       num_key_value_heads=kv, max_position_embeddings=64, tie_word_embeddings=False)


@functools.lru_cache(maxsize=8)
def _llama_template(key: tuple) -> tuple[Any, CapturedGraph]:
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(**dict(key))).eval()
    return model, capture(model)


@dataclass(repr=False)
class TinyLlama:
    """A tiny random LLaMA, its capture and token ids (repr: the config's sizes and the seed)."""

    model: Any
    cg: CapturedGraph
    inputs: tuple[torch.Tensor, ...]
    seed: int = 0

    def __repr__(self) -> str:
        c = self.model.config
        return (f"TinyLlama(layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
                f"kv_heads={c.num_key_value_heads}, vocab={c.vocab_size}, seed={self.seed}, "
                f"ids={tuple(self.inputs[0].shape)})")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


def make_tiny_llama(config: Any, seed: int = 0, *, batch: int = 2, seq: int = 8) -> TinyLlama:
    """A captured tiny random ``LlamaForCausalLM`` for ``config`` (a ``LlamaConfig``) without hypothesis."""
    key = tuple((k, getattr(config, k)) for k in _LLAMA_KEYS)
    template_model, template = _llama_template(key)
    model = copy.deepcopy(template_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    cg = _rebind(template, model)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    return TinyLlama(model=model, cg=cg, inputs=(ids,), seed=seed)


@st.composite
def tiny_llamas(draw: st.DrawFn, configs: st.SearchStrategy[Any] | None = None) -> TinyLlama:
    """A captured tiny random ``LlamaForCausalLM`` (capture cached per config) and token ids to run it on."""
    config = draw(configs if configs is not None else tiny_llama_configs())
    return make_tiny_llama(config, draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 2)),
                           seq=draw(st.integers(2, 12)))
