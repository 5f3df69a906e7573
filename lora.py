"""LoRA (Hu et al. 2021): low-rank adapters on chosen linear layers of a model, merged into the base
weights for saving, and PEFT-style adapter files. Used by sft.py and distill.py (--lora-rank); model.py
re-exports it and saves a model with adapters merged."""
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic_files import atomic_directory, save_tensors
from tokenizer import CHAT_SPECIAL_TOKENS


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA, Hu et al. 2021):

        y = x W^T + b + (alpha / r) * B A x,    A (r, in), B (out, r)

    The wrapped layer's own `weight` and `bias` Parameters stay under the same names, so the base
    keys of the state dict never change; the adapter lives in `lora_A` / `lora_B` (PEFT's names).
    B starts at zero, so until the first update the model computes exactly what the base did.
    The adapter is kept in fp32 whatever the base dtype: it is small, and Adam wants fp32 state.
    """
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))    # as nn.Linear (and PEFT) do
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):   # (under autocast its matmuls take bf16 anyway:
            x = x.to(self.lora_A.weight.dtype)              # an fp32 copy of x would be made for nothing)
        update = self.lora_B(self.lora_A(x))
        return y + (self.scale * update).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in fp32 and returned in W's dtype."""
        delta = self.lora_B.weight @ self.lora_A.weight                 # (out, r) @ (r, in) -> (out, in)
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)


class TrainableRows(nn.Module):
    """A frozen embedding or LM head (weight (V, d)) whose rows `token_ids` train: under LoRA a chat
    template's special tokens would otherwise stay at their initialisation, and tokens that start with the
    same row (the mean) would keep equal logits for good, so <|im_end|> could never win over <|im_start|>.
    The rows' values live in `trainable_rows` (n, d), fp32 (PEFT's `trainable_tokens_delta`, which also
    holds values, not differences); the rest of the matrix is used as it is. The wrapped module's `weight`
    keeps its name, so the base keys of the state dict never change. For a tied head, pass the embedding's
    wrapper as `tied_to`: both read the same rows."""
    def __init__(self, base: nn.Module, token_ids, tied_to=None):
        super().__init__()
        self.is_embedding = isinstance(base, nn.Embedding)
        self.weight = base.weight
        ids = torch.as_tensor(sorted(set(token_ids)), dtype=torch.long, device=base.weight.device)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        slot[ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("token_ids", ids, persistent=False)                   # (n,)
        self.register_buffer("slot", slot, persistent=False)                       # (V,): row in trainable_rows, or -1
        self.trainable_rows = tied_to.trainable_rows if tied_to is not None else \
            nn.Parameter(self.weight.detach()[ids].float().clone())               # (n, d)

    def forward(self, x):
        if self.is_embedding:                                                      # x: ids (...,) -> (..., d)
            out = F.embedding(x, self.weight)
            slot = self.slot[x]
            new = F.embedding(slot.clamp(min=0), self.trainable_rows).to(out.dtype)
            return torch.where((slot >= 0)[..., None], new, out)
        out = F.linear(x, self.weight)                                             # x: (..., d) -> (..., V)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.trainable_rows.dtype)
        return out.index_copy(-1, self.token_ids, F.linear(x, self.trainable_rows).to(out.dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight with the trained rows written in, in the weight's dtype."""
        return self.weight.index_copy(0, self.token_ids, self.trainable_rows.to(self.weight.dtype))


def train_token_rows(model, token_ids):
    """Under LoRA, let the embedding and LM head rows of `token_ids` train (see TrainableRows)."""
    if isinstance(model.lm_head, LoRALinear):
        raise ValueError("LoRA on lm_head and trained rows for the chat template's tokens do not combine: "
                         "drop lm_head from --lora-targets")
    body = model.model
    body.embed_tokens = TrainableRows(body.embed_tokens, token_ids)
    model.lm_head = TrainableRows(model.lm_head, token_ids,
                                  tied_to=body.embed_tokens if model.config.tie_word_embeddings else None)


def train_chat_token_rows(model, tokenizer, template) -> list:
    """train_token_rows for the special tokens the chat template uses (ChatML's <|im_start|> and <|im_end|>),
    as sft.py and distill.py do under LoRA: added by sft.py, or by resize_vocab.py for a base without them,
    they start from one shared row, and frozen, <|im_end|> would keep <|im_start|>'s logit for good.
    Returns those tokens."""
    tokens = [t for t in CHAT_SPECIAL_TOKENS[template] if t in tokenizer.special_tokens]
    if tokens:
        train_token_rows(model, [tokenizer.special_tokens[t] for t in tokens])
    return tokens


def is_adapter_key(key) -> bool:
    """Whether a state-dict key belongs to the adapter (LoRA's A and B, trained token rows), not the base."""
    return ".lora_" in key or key.endswith(".trainable_rows")


def add_lora(model, targets, rank, alpha, dropout=0.0) -> list:
    """Freeze every parameter, then wrap each nn.Linear whose attribute name is in `targets`
    (e.g. ["q_proj", "v_proj"]) in a LoRALinear. Returns the wrapped modules' names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                if child.weight is model.model.embed_tokens.weight:
                    raise ValueError(f"LoRA target '{name}' is tied to the embeddings; merging would untie them")
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    found = {w.rsplit(".", 1)[-1] for w in wrapped}
    if set(targets) - found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {sorted(set(targets) - found)} match no linear layer; "
                         f"this model has: {', '.join(linears)}")
    return wrapped


def lora_state_dict(model) -> dict:
    """The adapter alone: LoRA's matrices under PEFT's key names (base_model.model.<module>.lora_A.weight),
    and any trained token rows (<module>.trainable_rows; save_lora_adapter writes them PEFT's way)."""
    return {f"base_model.model.{k}": v.detach() for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_lora_state_dict(model, state, source="adapter"):
    """Load an adapter saved by lora_state_dict into a model already wrapped by add_lora (and train_token_rows)."""
    own = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if not extra and all(k.endswith(".trainable_rows") for k in missing):
            raise ValueError(f"{source}: this adapter has no trained rows for the chat template's tokens, which "
                             "LoRA runs (sft.py, distill.py) train since 2026-12-08: it was written before; "
                             "start the run again")
        raise ValueError(f"{source}: adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merged_state_dict(model) -> dict:
    """The model's weights with every LoRA update merged in, under the base model's keys: what
    save_pretrained writes (for a model with adapters, a plain HF checkpoint; without, the state dict).
    Merged tensors are moved to the CPU as they are made (one extra copy of each wrapped weight in host
    memory, not on the GPU); the model is untouched."""
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, TrainableRows)):
            state[f"{name}.weight"] = module.merged_weight().cpu()
    return state


def save_lora_adapter(model, path, base_model=None):
    """adapter_model.safetensors + adapter_config.json (PEFT's file names, keys and config fields),
    written atomically. Trained token rows go in as PEFT's `trainable_token_indices` (values under
    <module>.token_adapter.trainable_tokens_delta; a tied head's rows are the embedding's), so
    PeftModel.from_pretrained applies the whole fine-tune to the base once its embeddings have the rows
    (model.resize_token_embeddings to the run's vocab_size)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("save_lora_adapter: the model has no LoRA layers")
    first = layers[0][1]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout.p, "bias": "none",
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
              "fan_in_fan_out": False, "inference_mode": True}
    tensors = {k: v for k, v in lora_state_dict(model).items() if ".lora_" in k}
    rows = {n: m for n, m in model.named_modules() if isinstance(m, TrainableRows)}
    if model.config.tie_word_embeddings:
        rows.pop("lm_head", None)                           # the embedding's rows, read by the head too
    if rows:
        config["trainable_token_indices"] = {n.rsplit(".", 1)[-1]: m.token_ids.tolist() for n, m in rows.items()}
        for n, m in rows.items():
            tensors[f"base_model.model.{n}.token_adapter.trainable_tokens_delta"] = m.trainable_rows.detach()
    tmp, commit = atomic_directory(path)
    try:
        save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()},
                     os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
