"""Tiny random Hugging Face checkpoints written by `transformers`, the independent reference."""
import torch

FAMILIES = {
    # name: (transformers config class name, extra config fields)
    "mistral": ("MistralConfig", dict(sliding_window=8)),            # window shorter than the test sequences
    "qwen2": ("Qwen2Config", dict()),                                # QKV bias
    "qwen2_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),                     # QK-norm, head_dim != hidden / heads
    "qwen3_tied": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64),
                                  rope_theta=500000.0, max_position_embeddings=512)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True)),        # bias on q, k, v and o
    "qwen3_bias": ("Qwen3Config", dict(head_dim=24, attention_bias=True)),
    "mistral_bias_flag": ("MistralConfig", dict(sliding_window=8, attention_bias=True)),   # Mistral ignores it
}


def hf_config(family, vocab_size=101, **overrides):
    import transformers
    cls_name, extra = FAMILIES[family]
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    fields.update(extra)
    fields.update(overrides)
    return getattr(transformers, cls_name)(**fields)


def make_hf_model(family, path=None, seed=0, **overrides):
    """A tiny random transformers model (fp32, eval mode), saved to `path` when given.
    Weights are re-drawn larger than the default init so that mistakes show in the logits."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    model.eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def rel_err(a, b):
    """‖a - b‖ / ‖b‖, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
