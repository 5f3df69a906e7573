"""The one module every nanoadapt script shares.

A Mistral / Qwen2 / Qwen3 / Llama decoder that reads and writes Hugging Face checkpoints exactly
(same module names, same rotate-half RoPE, same safetensors keys), and generation with a KV cache.
Sections, in order:

  1. config        -- read from the checkpoint's config.json, field by field
  2. attention     -- one function: the Triton kernel on CUDA, SDPA elsewhere; packed documents
  3. the decoder   -- RMSNorm, RoPE, GQA attention, SwiGLU MLP, tied or untied head
  4. load / save   -- safetensors (single or sharded), built on the meta device, atomic saves
  5. generation    -- KV cache, greedy / temperature / top-k / top-p, batched prompts

Four parts live in modules of their own and are re-exported here, so the training and evaluation
scripts import from model alone:
tokenizers and chat templates (rendering with the assistant-only loss mask) in tokenizer.py, the
helpers every training script needs (distributed init, LR schedule, checkpoints, MFU, DDP / FSDP2,
the chunked loss head) in training.py, LoRA adapters (merged for saving, PEFT-style files) in lora.py,
and crash-safe writing (temporary name, fsync, rename) in atomic_files.py.

References: Mistral 7B (Jiang et al. 2023), Qwen2/Qwen3 technical reports, Llama 3 (Dubey et al. 2024)
for the llama3 RoPE scaling; the HF `transformers` implementations define the numerics we match.
"""
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# Tokenizers and chat templates live in tokenizer.py; re-exported here, as are the modules below.
from tokenizer import (CHAT_ROLES, CHAT_SPECIAL_TOKENS, CHAT_TEMPLATES, TOKENIZER_FILES,  # noqa: F401
                       chat_prompt, check_messages, choose_chat_template, jsonl_records, jsonl_texts,
                       load_tokenizer, pack_greedy, read_conversations, render_chat, render_conversations,
                       write_chat_tokenizer)
# Crash-safe writes (temporary name, fsync, rename) live in atomic_files.py; re-exported here too.
from atomic_files import (atomic_directory, current_umask, fsync_dir, remove_leftovers_beside,  # noqa: F401
                          rename_durably, replace_dir, save_tensors, sync_to_disk, temp_dir_beside,
                          write_json_atomic)
# LoRA adapters live in lora.py; re-exported here too.
from lora import (LoRALinear, TrainableRows, add_lora, load_lora_state_dict, lora_state_dict,  # noqa: F401
                  merged_state_dict, save_lora_adapter, train_chat_token_rows, train_token_rows)
# The training scripts' shared helpers live in training.py; re-exported here too.
from training import (GPU_PEAK_BF16_FLOPS, adamw, add_finetuning_arguments, add_scale_arguments, as_dtype,  # noqa: F401
                      at_least, cast_weights, check_scale_arguments, checkpointed_chunks, clip_gradients,
                      close_distributed, gpu_peak_flops, init_distributed, is_rank0, is_sharded,
                      latest_checkpoint, load_optimizer_state, load_placement, load_trainer_state,
                      lr_at, metrics_logger, parallelize, print0, resume_training, save_checkpoint,
                      set_grad_sync, unwrap)


# ------------------------------------------------------------------------------------------------
# 1. config
# ------------------------------------------------------------------------------------------------
SUPPORTED_MODEL_TYPES = ("mistral", "qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Config:
    """What the decoder needs, read from an HF config.json by field name (features, not families)."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 4096
    layer_windows: list = field(default_factory=list)  # per layer: sliding window W, or None for full attention
    qkv_bias: bool = False                 # Qwen2 always; Llama and Qwen3 through `attention_bias`
    o_bias: bool = False                   # Llama and Qwen3 through `attention_bias` (never Qwen2, Mistral)
    qk_norm: bool = False                  # Qwen3: RMSNorm on each head of q and k before RoPE
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict)  # the original config.json, kept so saving loses no field

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Config":
        def need(name):
            if name not in hf or hf[name] is None:
                raise ValueError(f"{source}: required field '{name}' is missing")
            return hf[name]

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type '{model_type}' is not supported; "
                             f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        n_heads = need("num_attention_heads")
        n_layers = need("num_hidden_layers")
        # A field left out of config.json gets the family's own default in transformers, which is not
        # always what the rest of the config implies (Qwen3's head_dim is 128, not hidden / heads;
        # Mistral's window is 4096, not none). Refused, rather than built into another model than
        # transformers would read from the same file (real checkpoints write every field).
        windowed = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"))
        family_defaults = {"num_key_value_heads": {"mistral": 8, "qwen2": 32, "qwen3": 32}.get(model_type),
                           "head_dim": 128 if model_type == "qwen3" else None,
                           "sliding_window": 4096 if windowed else None,
                           "max_window_layers": 28 if windowed and model_type != "mistral"
                           and hf.get("layer_types") is None else None}
        missing = {name: value for name, value in family_defaults.items() if value is not None and name not in hf}
        if missing:
            raise ValueError(f"{source}: no {', '.join(repr(n) for n in missing)}; transformers would take "
                             f"{model_type}'s default{'s' if len(missing) > 1 else ''} "
                             f"({', '.join(f'{n}={v}' for n, v in missing.items())}), so write the value you mean")
        head_dim = hf.get("head_dim") or need("hidden_size") // n_heads

        # RoPE: transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope or hf.get("rope_scaling") or None
        if scaling is not None:
            scaling = dict(scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"{source}: rope type '{rope_type}' is not supported; "
                                 f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}

        # Sliding window, per layer. Mistral: every layer when `sliding_window` is set. Qwen2/Qwen3:
        # only with `use_sliding_window`, and then `layer_types` (or max_window_layers) says which.
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        if model_type == "llama":
            window = None
        layer_types = hf.get("layer_types")
        if window is None:
            windows = [None] * n_layers
        elif layer_types is not None and model_type != "mistral":
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        elif model_type in ("qwen2", "qwen3"):
            first = hf.get("max_window_layers", n_layers)
            windows = [window if i >= first else None for i in range(n_layers)]
        else:
            windows = [window] * n_layers

        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            layer_windows=windows,
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and bool(hf.get("attention_bias"))),
            o_bias=model_type in ("llama", "qwen3") and bool(hf.get("attention_bias")),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf=dict(hf),
        )

    @classmethod
    def from_file(cls, path: str) -> "Config":
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=path)

    def to_hf(self) -> dict:
        """config.json for saving: the original fields, with the ones a stage may change updated."""
        hf = dict(self.hf)
        hf.update(vocab_size=self.vocab_size, tie_word_embeddings=self.tie_word_embeddings,
                  bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                  pad_token_id=self.pad_token_id)
        if self.torch_dtype is not None:
            hf["dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"] = self.torch_dtype
        hf.setdefault("architectures", [{"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                         "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]])
        return hf


# ------------------------------------------------------------------------------------------------
# 2. attention
# ------------------------------------------------------------------------------------------------
_warned_fallback = False


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per position (non-decreasing) -> (B, T) index of each document's first position."""
    T = doc_ids.shape[1]
    slots = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    is_first = torch.ones_like(doc_ids, dtype=torch.bool)
    is_first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(is_first, slots, torch.zeros_like(slots)), dim=1).values


def attention_mask(q_slots, k_slots, doc_start=None, window=None) -> torch.Tensor:
    """Boolean mask, True = attend: key s is visible to query t iff s <= t, s >= doc_start[t], t - s < window.

    q_slots (Tq,), k_slots (Tk,) are absolute positions in the row; doc_start (B, Tq) or None.
    Window semantics are transformers' Mistral ones: W keys including the query itself.
    Returns (1 or B, 1, Tq, Tk).
    """
    t, s = q_slots[:, None], k_slots[None, :]
    mask = s <= t
    if window is not None:
        mask = mask & (t - s < window)
    mask = mask[None]
    if doc_start is not None:
        mask = mask & (s[None] >= doc_start[:, :, None])
    return mask[:, None]


def _use_triton(q, k, v) -> bool:
    global _warned_fallback
    choice = os.environ.get("NANOADAPT_ATTENTION", "").lower()
    if choice not in ("", "triton", "sdpa"):
        raise ValueError(f"NANOADAPT_ATTENTION={choice!r}: expected 'triton' or 'sdpa'")
    if choice == "sdpa" or (choice == "" and (not q.is_cuda or q.dtype == torch.float32)):
        return False  # (the kernel's fp32 path, small tiles with IEEE dots, is for checking, not speed)
    try:
        import flash_attention
        supported = flash_attention.supports(q, k, v)
    except ImportError as e:
        supported, reason = False, f"the Triton kernel could not be imported ({e})"
    else:
        reason = (f"shape/dtype not supported by the kernel (head dim {q.shape[-1]}, {q.dtype}, {q.device.type})"
                  + ("" if q.is_cuda or flash_attention._interpreting() else "; on CPU set TRITON_INTERPRET=1"))
    if supported:
        return True
    if choice == "triton":
        raise RuntimeError(f"NANOADAPT_ATTENTION=triton but {reason}")
    if not _warned_fallback:
        warnings.warn(f"falling back to SDPA attention: {reason}")
        _warned_fallback = True
    return False


def attention(q, k, v, doc_start=None, window=None, q_offset=0):
    """Causal attention. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA).

    Query i sits at absolute slot q_offset + i, key j at slot j (with a KV cache, Tk = q_offset + Tq).
    doc_start (B, Tq): first slot of each query's document, so packed documents never see each other.
    The Triton kernel (flash_attention.py) serves training-shaped calls; SDPA everything else.
    """
    if torch.is_autocast_enabled(q.device.type):
        # Training runs fp32 weights under autocast: RoPE's fp32 cos/sin then promote q and k to fp32 while
        # v stays in the autocast dtype. Autocast casts SDPA's inputs down to its dtype; do it here, for
        # both paths, so that the kernel (no autocast op) gets what SDPA would: all three in that dtype.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    if q_offset == 0 and Tq == Tk and _use_triton(q, k, v):
        import flash_attention
        return flash_attention.flash_attention(q, k, v, doc_start=doc_start, window=window)
    gqa = q.shape[1] != k.shape[1]
    if doc_start is None and window is None and Tq == Tk and q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    slots = torch.arange(Tk, device=q.device)
    mask = attention_mask(slots[q_offset:q_offset + Tq], slots, doc_start, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------------
# 3. the decoder
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as transformers does)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(cfg: Config, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with the llama3 / linear scalings applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast (HF's layout: halves repeated)."""
    freqs = positions[..., None].float() * inv_freq                # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]               # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """HF's rotate-half RoPE: the two halves of each head are the (real, imaginary) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config, window):
        super().__init__()
        self.n_heads, self.n_kv, self.hd, self.window = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, window
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, doc_start, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)                    # (B, Hq, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)                    # (B, Hkv, T, hd)
        v = v.transpose(1, 2)                                          # (B, Hkv, T, hd)
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer_idx, k, v)                       # (B, Hkv, offset + T, hd)
        y = attention(q, k, v, doc_start=doc_start, window=self.window, q_offset=offset)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, window):
        super().__init__()
        self.self_attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, doc_start, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_start, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Holds what HF calls `model.*`: embeddings, layers, final norm."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.source_dir = None            # the HF directory this model was loaded from (tokenizer files live there)
        self.checkpoint_layers = 0        # the first N decoder layers recompute their activations in backward

    def forward(self, input_ids, doc_ids=None, cache=None, return_hidden=False):
        """input_ids (B, T) -> logits (B, T, V), or the final hidden states (B, T, d) with return_hidden.

        doc_ids (B, T): document index of each position, for packed sequences: attention stays inside
        each document and RoPE positions restart at each document's start.
        cache: a KVCache (generation); new tokens continue the last document of each row.
        """
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        slots = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        if doc_ids is not None:
            doc_start = document_starts(doc_ids) + offset                     # (B, T)
        elif cache is not None and cache.row_start is not None:
            doc_start = cache.row_start.expand(B, T)
        else:
            doc_start = None
        positions = slots - doc_start if doc_start is not None else slots  # (B, T)
        if cache is not None and offset == 0 and doc_start is not None:
            cache.row_start = doc_start[:, -1:]                              # generation continues the last document

        x = self.model.embed_tokens(input_ids)                               # (B, T, d)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.training and i < self.checkpoint_layers:               # activation checkpointing
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, doc_start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, doc_start, cache, i)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    # -- construction ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """Random init for pretraining from scratch: normal(0, initializer_range), zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def set_vocab(self, embed_weight, head_weight=None):
        """Replace the vocabulary: embed_weight (V, d); head_weight (V, d) for an untied head (None when tied)."""
        if self.config.tie_word_embeddings and head_weight is not None:
            raise ValueError("the LM head is tied to the embeddings: pass head_weight=None")
        if not self.config.tie_word_embeddings and head_weight is None:
            raise ValueError("the LM head is untied: pass head_weight")
        self.model.embed_tokens.weight = nn.Parameter(embed_weight)
        self.model.embed_tokens.num_embeddings = embed_weight.shape[0]
        self.lm_head.weight = self.model.embed_tokens.weight if head_weight is None else nn.Parameter(head_weight)
        self.lm_head.out_features = embed_weight.shape[0]
        self.config.vocab_size = embed_weight.shape[0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, forward_only: bool = False) -> float:
        """FLOPs per token of a training step (forward + backward), or of a forward pass alone (a frozen
        reference), as PaLM's appendix B counts them and torchtitan and nanochat too, so MFU compares with
        theirs. Per weight-matrix entry (the head counts, the embedding lookup does not; norms and biases
        are not matmuls): 2 forward, 2 backward for the input's gradient, and 2 more for the weight's own
        gradient when it trains (6, or 4 for LoRA's frozen base and --train-only embeddings). Attention
        scores and values: 4·L·H·hd·T forward, twice that backward. Like them it counts every (query, key)
        pair: the causal mask's saving, half of the attention term, is not subtracted (at 2k context a few
        % of the total for a 1-2B model)."""
        c = self.config
        matmuls = 0
        for name, p in self.named_parameters():
            if p.dim() != 2 or (name.startswith("model.embed_tokens.") and not c.tie_word_embeddings):
                continue                                       # a norm, a bias, or the embedding lookup
            if forward_only:
                matmuls += 2 * p.numel()
            else:
                matmuls += (6 if p.requires_grad else 4) * p.numel()
        attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return matmuls + (attention if forward_only else 3 * attention)

    # -- load / save: see section 4 ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        return load_pretrained(cls, path, device, dtype)

    def save_pretrained(self, path, max_shard_size="5GB", tokenizer_dir=None, extra_files=None, generation_config=None,
                        also=None, dtype=None):
        save_pretrained(self, path, max_shard_size, tokenizer_dir, extra_files, generation_config, also, dtype)


# ------------------------------------------------------------------------------------------------
# 4. load / save (HF safetensors)
# ------------------------------------------------------------------------------------------------
def load_pretrained(cls, path, device=None, dtype=None):
    """Build on the meta device, then assign the tensors of each shard in turn (never all shards at once)."""
    from safetensors import safe_open
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    cfg = Config.from_file(config_path)
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(nanoadapt reads weights only from safetensors)")
    dtype = as_dtype(dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")          # stored once, under the embedding's name
    seen = set()
    for shard in shards:
        shard_path = os.path.join(path, shard)
        state = {}
        with safe_open(shard_path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue                     # some tied checkpoints store the head too: same tensor
                if key not in expected:
                    raise ValueError(f"{shard_path}: unexpected weight '{key}' for a {cfg.model_type} model "
                                     f"with this config.json")
                t = f.get_tensor(key)
                if t.shape != expected[key].shape:
                    raise ValueError(f"{shard_path}: weight '{key}' has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(expected[key].shape)}")
                state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        model.load_state_dict(state, strict=False, assign=True)
        seen.update(state)
        del state
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: missing weights: {', '.join(missing[:10])}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(cfg, device)
    model.source_dir = os.path.abspath(path)
    model.config.torch_dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return model


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


def write_model_directory(path, steps, all_ranks=False):
    """Run each step(tmp) to write into a temporary directory next to `path`, then move it into place
    (install_model_files); on any error it is removed and nothing is published. all_ranks=True (under
    FSDP): a collective, every rank calls it and runs the steps, writing its part. After each step the
    ranks agree: if one failed, every rank raises, saying which and why (a step's own collectives, e.g.
    torch.distributed.checkpoint's, must not find a rank that already gave up; a rank that fails inside
    a collective stops the others there, as any failed collective does). The ranks must see one
    filesystem then, as resuming from it needs anyway."""
    import torch.distributed as dist
    group = all_ranks and dist.is_initialized()
    rank = dist.get_rank() if group else 0
    tmp = None

    def agree(step):
        """step() on this rank, then every rank learns whether any failed."""
        failed = None
        try:
            step()
        except BaseException as e:              # told to the other ranks (they raise too), then raised here
            failed = e
        report = f"rank {rank}: {type(failed).__name__}: {failed}" if failed else None
        reports = [report]
        if group:
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, report)
        if failed is not None:
            raise failed
        if any(reports):
            raise RuntimeError(f"writing {path} failed on another rank: " + "; ".join(r for r in reports if r))

    def make():
        """Rank 0 makes the directory and tells the others its name (or that it could not)."""
        nonlocal tmp
        box, error = [None], None
        if rank == 0:
            try:
                box = [temp_dir_beside(path)]
            except Exception as e:              # raised after the broadcast, which the others wait in
                error = e
        if group:
            dist.broadcast_object_list(box, src=0)
        tmp = box[0]
        if error is not None:
            raise error
        if tmp is None:
            raise FileNotFoundError(f"rank 0 could not make a temporary directory beside {path}")
        if not os.path.isdir(tmp):
            raise FileNotFoundError(f"rank {rank} does not see {tmp}, which rank 0 made: every rank writes "
                                    f"into {path}, so it must be on a filesystem that all ranks share")
    try:
        agree(make)
        for step in steps:
            agree(lambda: step(tmp))
        agree(lambda: install_model_files(tmp, path) if rank == 0 else None)
    except BaseException:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model, path, max_shard_size="5GB", tokenizer_dir=None, extra_files=None, generation_config=None,
                    also=None, dtype=None):
    """Write an HF model directory atomically: config.json, generation_config.json, safetensors
    (sharded with an index above max_shard_size), the tokenizer files, and any extra files.
    Tied weights are stored once (as `model.embed_tokens.weight`), as transformers does; a model with
    LoRA adapters is stored merged, as the plain model (save_lora_adapter writes the adapter alone).
    Under torchrun rank 0 writes and the other ranks return at once; but a model sharded by FSDP needs
    every rank (a collective): its weights are gathered one tensor at a time and each rank keeps and
    writes its own files of them (about 1/world of the model, at most max_shard_size per file), so no
    rank holds the whole model.
    generation_config: the dict to start generation_config.json from (default: the source model's);
    the config's bos/eos/pad ids override its own, and suppress_tokens is recomputed.
    also(tmp): writes more into the directory before it is published, on every rank that writes
    (save_checkpoint puts the optimizer state there).
    dtype (e.g. torch.bfloat16 or "bfloat16"): the weights are cast to it as they are written, and
    config.json says so (a model trained in fp32, released in bf16); default: as they are."""
    dtype = as_dtype(dtype)
    sharded = is_sharded(model)
    if not (sharded or is_rank0()):
        return

    def model_files(tmp):
        write_safetensors(model, tmp, max_shard_size, sharded, dtype)
        if is_rank0():
            write_config_files(model, tmp, tokenizer_dir, generation_config, dtype)
            for name, content in (extra_files or {}).items():
                if callable(content):               # writes the file itself (e.g. torch.save, no copy in memory)
                    content(os.path.join(tmp, name))
                    continue
                with open(os.path.join(tmp, name), "wb" if isinstance(content, bytes) else "w") as f:
                    f.write(content)
    write_model_directory(path, [model_files] + ([also] if also is not None else []), all_ranks=sharded)


def write_safetensors(model, tmp, max_shard_size, sharded, dtype=None):
    """The weights as safetensors files in tmp (cast to dtype, if given), split in state-dict order, with
    an index when there is more than one file, each at most max_shard_size (or one tensor alone). Not
    sharded: this process writes them all (split greedily). FSDP: every rank takes part in gathering
    each tensor in turn (a collective); the tensors are split into files of about equal size, about one
    per rank (each tensor in the file its middle byte falls in; fewer when one tensor outweighs the
    rest), and file i is kept and written by rank i % world."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    state = merged_state_dict(model)    # (without adapters: the state dict; under FSDP DTensors, global shapes)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    nbytes = {key: t.numel() * (dtype or t.dtype).itemsize for key, t in state.items()}
    total, limit = sum(nbytes.values()), _parse_size(max_shard_size)
    if sharded:                                 # every rank writes at once, about the same amount
        def split_evenly(n):
            files, offset = [[] for _ in range(n)], 0
            for key in state:
                files[min(n - 1, int((offset + nbytes[key] / 2) * n // max(total, 1)))].append(key)
                offset += nbytes[key]
            return [keys for keys in files if keys]
        n = max(world, math.ceil(total / limit))
        shards = split_evenly(n)
        while any(len(keys) > 1 and sum(nbytes[k] for k in keys) > limit for keys in shards):
            n += 1                              # (a file over the limit: more, smaller files)
            shards = split_evenly(n)
    else:
        keys = list(state)
        shards = [[keys[j] for j in file] for file in pack_greedy([nbytes[k] for k in keys], limit, range(len(keys)))]
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    mine, failed = {}, None                     # file index -> {name: full CPU tensor}, this rank's files
    for i, keys in enumerate(shards):
        for key in keys:
            t = state[key]
            if isinstance(t, DTensor):
                if t.device.type != t.device_mesh.device_type:
                    t = t.to(t.device_mesh.device_type)     # --cpu-offload: CPU shards, gathered on the GPU
                t = t.to(dtype or t.dtype).full_tensor()    # (cast first: a bf16 save gathers half the bytes)
            if i % world == rank and failed is None:
                try:                            # (a failure here must not make this rank skip a gather)
                    mine.setdefault(i, {})[key] = t.detach().to("cpu", dtype or t.dtype).contiguous()
                except Exception as e:
                    failed, mine = e, {}
            del t
        if not sharded and i in mine:           # one writer: one file in host memory at a time
            save_tensors(mine.pop(i), os.path.join(tmp, names[i]))
    if failed is not None:
        raise failed
    for i, tensors in mine.items():             # FSDP: all gathered first, then the ranks write at once
        save_tensors(tensors, os.path.join(tmp, names[i]))
        sync_to_disk(os.path.join(tmp, names[i]))   # by its writer: rank 0's fsync may not flush another node's
    if rank == 0 and len(shards) > 1:
        weight_map = {key: names[i] for i, keys in enumerate(shards) for key in keys}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config_files(model, tmp, tokenizer_dir=None, generation_config=None, dtype=None):
    """config.json (with the saved weights' dtype), generation_config.json and the tokenizer's files, into tmp."""
    saved_dtype = dtype or model.model.embed_tokens.weight.dtype
    cfg = dataclasses.replace(model.config, torch_dtype=str(saved_dtype).removeprefix("torch."))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2, ensure_ascii=False)
    gen = dict(generation_config) if generation_config is not None else read_generation_config(model.source_dir)
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                       ("pad_token_id", cfg.pad_token_id)):
        if value is None or (key == "eos_token_id" and isinstance(gen.get(key), list) and value in gen[key]):
            continue        # (Qwen: a list of stop ids that holds config.json's eos stays a list)
        gen[key] = value
    tok_src = tokenizer_dir or model.source_dir
    tok_files = [n for n in TOKENIZER_FILES if tok_src and os.path.isfile(os.path.join(tok_src, n))]
    if "tokenizer.model" in tok_files or "tokenizer.json" in tok_files:
        # rows past the tokenizer's last id (vocabulary padding) have no token: transformers'
        # generate must never pick them. Recomputed at every save, never inherited: resize_vocab
        # renumbers the vocabulary and sft.py puts new special tokens into former padding rows.
        gen.pop("suppress_tokens", None)
        padding = list(range(load_tokenizer(tok_src).vocab_size, cfg.vocab_size))
        if padding:
            gen["suppress_tokens"] = padding
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    for name in tok_files:
        shutil.copy2(os.path.join(tok_src, name), os.path.join(tmp, name))


def read_generation_config(model_dir):
    """A model directory's generation_config.json as a dict ({} when there is none)."""
    path = os.path.join(model_dir or "", "generation_config.json")
    if not (model_dir and os.path.isfile(path)):
        return {}
    with open(path) as f:
        return json.load(f)


def install_model_files(tmp, path):
    """Move a completely written model directory `tmp` to `path`. A new `path` is a single rename.
    An existing one (a run directory with checkpoints/ and metrics.jsonl) keeps everything that is
    not the model: its config.json is set aside first, so it stops claiming to hold a model, then
    its old weights and tokenizer files and whatever else the new files replace (a checkpoint saved
    again), into a hidden directory inside `path`; then the new files move in, config.json last.
    If a move fails, the new files go back to `tmp` and the old ones back in place. Either way a
    directory with a config.json always has complete weights (after a kill half-way, the old model
    is in .replaced-*; the next successful install removes it)."""
    if not os.path.isdir(path):
        rename_durably(tmp, path)
        remove_leftovers_beside(path)
        return
    sync_to_disk(tmp)
    new = set(os.listdir(tmp))
    old = [n for n in os.listdir(path) if n == "config.json" or n.endswith(".safetensors")
           or n == "model.safetensors.index.json" or n in TOKENIZER_FILES or n in new]
    aside = tempfile.mkdtemp(prefix=".replaced-", dir=path)
    set_aside, moved_in = [], []
    try:
        for name in sorted(old, key=lambda n: n != "config.json"):
            os.replace(os.path.join(path, name), os.path.join(aside, name))
            set_aside.append(name)
        for name in sorted(new, key=lambda n: n == "config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(os.path.join(path, name), os.path.join(tmp, name))
        for name in reversed(set_aside):         # config.json back last
            os.replace(os.path.join(aside, name), os.path.join(path, name))
        os.rmdir(aside)
        raise
    os.rmdir(tmp)
    fsync_dir(path)                              # the renames themselves
    for leftover in os.listdir(path):            # this install's set-aside files, and a killed one's
        if leftover.startswith(".replaced-"):
            shutil.rmtree(os.path.join(path, leftover), ignore_errors=True)
    remove_leftovers_beside(path)


# ------------------------------------------------------------------------------------------------
# 5. generation
# ------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values per layer, (B, Hkv, max_len, hd); `length` slots are filled."""
    def __init__(self, cfg: Config, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.row_start = None    # (B, 1): first slot of each row's prompt (left padding sits before it)

    def update(self, layer_idx, k, v):
        end = self.length + k.shape[2]
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) with the tokens top-k and top-p sampling exclude set to -inf (as transformers'
    TopK and TopP warpers do): top_k keeps the k largest (0 or None: all); top_p keeps the smallest
    set of most likely tokens whose probability reaches top_p (1 or None: all; the first always)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:                  # (at 1, rounding in the cumsum would drop a tail)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p           # the mass before a token already reaches top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             eos_id=None, vocab_limit=None, generator=None):
    """Batched generation with a KV cache. prompts: list of token-id lists (any lengths; left-padded
    internally). Returns the new tokens of each prompt, stopping after eos_id (included).
    vocab_limit: ids at or above it are never sampled (vocabulary padding rows)."""
    device = model.model.embed_tokens.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts)], device=device)     # (B, T0)
    doc_ids = (torch.arange(longest, device=device)[None] >= torch.tensor(pad, device=device)[:, None]).long()
    eos = set([eos_id] if isinstance(eos_id, int) else (eos_id or []))
    cache = KVCache(model.config, B, longest + max_new_tokens, device, model.model.embed_tokens.weight.dtype)
    hidden = model(ids, doc_ids=doc_ids if any(pad) else None, cache=cache, return_hidden=True)  # (B, T0, d)
    logits = model.lm_head(hidden[:, -1])           # (B, V): prompts are left-padded, all end at the last slot
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)                     # (B,)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out
