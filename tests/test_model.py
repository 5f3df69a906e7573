"""model.py against transformers: logits, save/load both ways, sharding, generation, packing, errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from model import Config, KVCache, Transformer, filter_logits, generate
from tiny_models import FAMILIES, hf_config, make_hf_model, rel_err


def tokens(B, T, vocab=101, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_both_ways(family, tmp_path):
    import transformers
    hf = make_hf_model(family, tmp_path / "hf")
    ids = tokens(2, 20)                                # longer than the Mistral/Qwen2 test windows
    with torch.no_grad():
        ref = hf(ids).logits
        ours = Transformer.from_pretrained(tmp_path / "hf")
        out = ours(ids)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4

    # our save loads in transformers with the same logits
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, ref) < 1e-4
    if hf.config.tie_word_embeddings:
        from safetensors import safe_open
        with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()      # tied weights stored once, as transformers does
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_features_read_from_config(tmp_path):
    """Fields are features: windows per layer, bias, QK-norm, head_dim, llama3 scaling all come from config.json."""
    cfgs = {}
    for family in ("mistral", "qwen2", "qwen2_window", "qwen3", "llama"):
        make_hf_model(family, tmp_path / family)
        cfgs[family] = Config.from_file(tmp_path / family / "config.json")
    assert cfgs["mistral"].layer_windows == [8, 8]
    assert cfgs["qwen2"].layer_windows == [None, None] and cfgs["qwen2"].qkv_bias
    assert cfgs["qwen2_window"].layer_windows == [None, 6]          # max_window_layers=1
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24 and not cfgs["qwen3"].qkv_bias
    assert cfgs["llama"].rope_scaling["rope_type"] == "llama3" and cfgs["llama"].rope_theta == 500000.0


def test_legacy_rope_fields_and_inverse_frequencies(tmp_path):
    """Older checkpoints write rope_theta + rope_scaling; inverse frequencies equal transformers' llama3 ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from model import rope_inverse_frequencies
    from tiny_models import hf_config
    hf_cfg = hf_config("llama")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    legacy = hf_cfg.to_dict()
    params = legacy.pop("rope_parameters")
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = params
    ours = rope_inverse_frequencies(Config.from_hf(legacy))
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inverse_frequencies(Config.from_hf({**legacy, "rope_scaling": None})))


def test_sharded_save_round_trips(tmp_path):
    import transformers
    make_hf_model("qwen2", tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict())
    again = Transformer.from_pretrained(tmp_path / "sharded")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ids = tokens(1, 12)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, ours(ids)) < 1e-4


def test_dtype_on_load_and_save(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    m.save_pretrained(tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert Transformer.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16

    # an fp32 model saved as bf16 (a release): each tensor is its fp32 value rounded, the model is untouched
    import transformers
    m = Transformer.from_pretrained(tmp_path / "hf")
    m.save_pretrained(tmp_path / "release", dtype="bfloat16", max_shard_size="40KB")
    assert m.lm_head.weight.dtype == torch.float32 and m.config.torch_dtype == "float32"
    cfg = json.loads((tmp_path / "release" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    saved = Transformer.from_pretrained(tmp_path / "release").state_dict()
    for k, v in m.state_dict().items():
        assert saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], v.to(torch.bfloat16)), k
    index = json.loads((tmp_path / "release" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * sum(v.numel() for v in m.state_dict().values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "release")    # dtype "auto": from config
    assert hf.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["mistral", "qwen3_tied"])
def test_greedy_generation_matches_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    prompt = tokens(1, 5)
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=12)[0, 5:].tolist()
    got = generate(ours, [prompt[0].tolist()], max_new_tokens=12)[0]
    assert got == ref


def test_kv_cache_logits_equal_full_forward(tmp_path):
    make_hf_model("mistral", tmp_path / "hf")                 # window 8 < sequence: the cache must apply it
    m = Transformer.from_pretrained(tmp_path / "hf")
    ids = tokens(2, 16)
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.config, 2, 16, "cpu", torch.float32)
        parts = [m(ids[:, :7], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(7, 16)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


def test_batched_left_padded_generation_equals_each_alone(tmp_path):
    make_hf_model("mistral", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    prompts = [tokens(1, 3, seed=5)[0].tolist(), tokens(1, 9, seed=6)[0].tolist()]
    together = generate(m, prompts, max_new_tokens=10)
    alone = [generate(m, [p], max_new_tokens=10)[0] for p in prompts]
    assert together == alone


def test_top_k_and_top_p_keep_what_transformers_keeps():
    """The tokens filter_logits leaves finite equal those transformers' TopK/TopP warpers leave, on a
    distribution with exact cut points ([8, 4, 3, 1] / 16: top_p .5 keeps one token, .75 two) and
    on random logits over a 32k vocabulary, where top_p=1 must keep every token."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    exact = (torch.tensor([[8.0, 4.0, 3.0, 1.0]]) / 16).log()
    random_logits = 3 * torch.randn(8, 32000, generator=torch.Generator().manual_seed(0))
    for logits in (exact, random_logits):
        for top_k, top_p in ((None, 0.5), (None, 0.75), (None, 0.9), (None, 1.0), (3, None), (50, 0.8), (0, 0.3)):
            ours = filter_logits(logits, top_k, top_p)
            ref = logits
            if top_k:
                ref = TopKLogitsWarper(top_k)(None, ref)
            if top_p is not None:
                ref = TopPLogitsWarper(top_p)(None, ref)
            assert torch.equal(ours.isfinite(), ref.isfinite()), (top_k, top_p)
    assert filter_logits(exact, None, 0.5).isfinite().sum() == 1
    assert filter_logits(exact, None, 0.75).isfinite().sum() == 2
    assert filter_logits(random_logits, None, 1.0).isfinite().all()


def test_generation_stops_at_eos_and_samples_within_top_k(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    prompt = tokens(1, 4)[0].tolist()
    greedy = generate(m, [prompt], max_new_tokens=8)[0]
    stop = greedy[3]
    cut = generate(m, [prompt], max_new_tokens=8, eos_id=stop)[0]
    assert cut == greedy[:greedy.index(stop) + 1]
    # top_k=1 sampling at any temperature is greedy; top_p tiny keeps only the argmax too
    g = torch.Generator().manual_seed(0)
    assert generate(m, [prompt], 8, temperature=1.5, top_k=1, generator=g)[0] == greedy
    assert generate(m, [prompt], 8, temperature=1.5, top_p=1e-6, generator=g)[0] == greedy
    # vocab_limit: padding rows are never sampled
    sampled = generate(m, [prompt], 20, temperature=5.0, vocab_limit=50, generator=g)[0]
    assert max(sampled) < 50


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_packed_documents_equal_each_alone(family, tmp_path):
    make_hf_model(family, tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    a, b = tokens(1, 11, seed=3), tokens(1, 14, seed=4)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 14])
    with torch.no_grad():
        out = m(packed, doc_ids=doc_ids)
        assert rel_err(out[:, :11], m(a)) < 1e-5
        assert rel_err(out[:, 11:], m(b)) < 1e-5
        assert rel_err(m(packed)[:, 11:], m(b)) > 1e-2          # without doc_ids the second document sees the first


def test_unknown_model_type_is_a_clear_error(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*mistral, qwen2, qwen3, llama"):
        Transformer.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("family, left_out", [
    ("mistral", ["sliding_window"]), ("mistral", ["num_key_value_heads"]), ("qwen2", ["num_key_value_heads"]),
    ("qwen3", ["head_dim"]), ("qwen2_window", ["max_window_layers", "layer_types"]),
    ("qwen2_window", ["sliding_window"]),
])
def test_a_field_transformers_would_fill_differently_is_refused(tmp_path, family, left_out):
    """A config.json without a field that transformers fills with the family's default (not what
    the rest implies) is refused, naming the default; transformers, reading the same file, indeed
    takes that value."""
    import re
    import transformers
    make_hf_model(family, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for name in left_out:
        cfg.pop(name, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    name = left_out[0]
    with pytest.raises(ValueError, match=f"config.json: no '{name}'; transformers would take") as e:
        Transformer.from_pretrained(tmp_path / "hf")
    default = int(re.search(rf"{name}=(\d+)", str(e.value)).group(1))
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert getattr(hf, name) == default and default != {"num_key_value_heads": 2, "head_dim": 24}.get(name)


def test_unsupported_rope_type_is_a_clear_error(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        Transformer.from_pretrained(tmp_path / "hf")


def test_missing_and_misshapen_weights_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_model("qwen2", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(path)
    good = dict(state)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match="missing weights: model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path / "hf")
    good["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(7)
    save_file(good, path)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.bias' has shape \(7,\)"):
        Transformer.from_pretrained(tmp_path / "hf")
    good["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    good["model.extra.weight"] = torch.zeros(3)
    save_file(good, path)
    with pytest.raises(ValueError, match="unexpected weight 'model.extra.weight'"):
        Transformer.from_pretrained(tmp_path / "hf")


def test_missing_weights_file_and_config_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    make_hf_model("llama", tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path / "hf")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from model import load_tokenizer
    make_hf_model("llama", tmp_path / "hf")
    with pytest.raises(Exception, match=str(tmp_path / "hf")):
        load_tokenizer(tmp_path / "hf")


def test_failed_save_leaves_nothing_behind(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    with pytest.raises(TypeError):
        m.save_pretrained(tmp_path / "out", extra_files={"bad.txt": 123})
    assert os.listdir(tmp_path) == ["hf"]


def test_a_save_that_fails_while_installing_keeps_the_old_model(tmp_path, monkeypatch):
    """Saving over a run directory that holds a model, with the second move of the new files failing
    (a full disk, an I/O error): the old model is back in place, complete; nothing of the new one or
    of the set-aside copy is left. A successful save then removes what killed saves left beside it."""
    import model as model_module
    make_hf_model("llama", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    m.save_pretrained(run, max_shard_size="40KB")                        # the old model: sharded
    (run / "metrics.jsonl").write_text("{}\n")
    before = {n: (run / n).read_bytes() for n in os.listdir(run)}
    real, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if str(src).startswith(str(tmp_path / ".run.tmp-")) and len([c for c in calls
                                                                     if str(c).startswith(str(run))]) > 4:
            raise OSError(5, "simulated I/O error")
        return real(src, dst)
    monkeypatch.setattr(model_module.os, "replace", failing_replace)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        m.save_pretrained(run)                                           # the new model: one file
    monkeypatch.setattr(model_module.os, "replace", real)
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]

    (tmp_path / ".run.tmp-killed").mkdir()                                # what a killed save leaves
    (run / ".replaced-killed").mkdir()
    m.save_pretrained(run)
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"] and not any(n.startswith(".") for n in os.listdir(run))
    assert torch.equal(Transformer.from_pretrained(run).lm_head.weight, m.lm_head.weight)


def test_replace_dir_puts_the_old_directory_back_when_the_new_cannot_move_in(tmp_path, monkeypatch):
    import atomic_files
    out, tmp = tmp_path / "tok", tmp_path / ".tok.tmp-1"
    out.mkdir()
    (out / "a.txt").write_text("old")
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    real = os.rename
    monkeypatch.setattr(atomic_files.os, "rename",
                        lambda src, dst: (_ for _ in ()).throw(OSError(5, "simulated")) if src == tmp else real(src, dst))
    with pytest.raises(OSError, match="simulated"):
        atomic_files.replace_dir(tmp, out)
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [".tok.tmp-1", "tok"]
    monkeypatch.setattr(atomic_files.os, "rename", real)
    (tmp_path / ".tok.old-killed").mkdir()
    atomic_files.replace_dir(tmp, out)
    assert (out / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["tok"]
    with pytest.raises(TypeError):
        atomic_files.write_json_atomic(tmp_path / "m.json", {"b": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_save_into_a_run_directory_keeps_other_files(tmp_path):
    """The final model lands in a run directory next to checkpoints/ and metrics.jsonl: those stay,
    stale weights and tokenizer files of an earlier save go."""
    make_hf_model("llama", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "tokenizer.json").write_text("stale")
    m.save_pretrained(run, max_shard_size="40KB")                        # sharded first
    m.save_pretrained(run)                                               # then one file
    names = set(os.listdir(run))
    assert {"checkpoints", "metrics.jsonl", "config.json", "model.safetensors"} <= names
    assert "tokenizer.json" not in names and not any(n.startswith("model-0") for n in names)
    assert "model.safetensors.index.json" not in names
    again = Transformer.from_pretrained(run)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in m.state_dict().items())


def test_padding_rows_are_suppressed_for_transformers_generate(tmp_path):
    """Rows past the tokenizer's last id are listed in generation_config.json's suppress_tokens, so that
    transformers' generate never picks them; the list follows the tokenizer saved, not the source's."""
    import transformers
    from tokenizer import write_hf_tokenizer_files
    from tokenizer_samples import EN, train_sp
    tok_dir = tmp_path / "tok"
    write_hf_tokenizer_files(train_sp(tmp_path / "sp.model", EN, 100, byte_fallback=False), tok_dir)
    n_tok = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])   # 100 pieces
    make_hf_model("llama", tmp_path / "base", vocab_size=128)
    # a stale list inherited from the source must not survive (its ids may mean other tokens now)
    gen_path = tmp_path / "base" / "generation_config.json"
    gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), "suppress_tokens": [5]}))
    model = Transformer.from_pretrained(tmp_path / "base")
    prompt = tokens(1, 5, vocab=n_tok)
    with torch.no_grad():                  # make a padding row the most likely next token
        best = model(prompt)[0, -1, :n_tok].argmax()
        model.lm_head.weight[n_tok:] = 3 * model.lm_head.weight[best]
    model.save_pretrained(tmp_path / "padded", tokenizer_dir=tok_dir)
    gen = json.loads((tmp_path / "padded" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(100, 128)) and n_tok == 100

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "padded", dtype=torch.float32).eval()
    with torch.no_grad():
        assert hf(prompt).logits[0, -1].argmax() >= n_tok     # unsuppressed, a padding row would win
        out = hf.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0)
    assert (out.sequences[0, 5:] < n_tok).all()
    for scores in out.scores:                                 # (1, V) after the logits processors
        assert torch.isinf(scores[0, n_tok:]).all() and torch.isfinite(scores[0, :n_tok]).all()

    # a tokenizer that fills every row: nothing to suppress
    make_hf_model("llama", tmp_path / "exact", vocab_size=100)
    Transformer.from_pretrained(tmp_path / "exact").save_pretrained(tmp_path / "exact_out", tokenizer_dir=tok_dir)
    assert "suppress_tokens" not in json.loads((tmp_path / "exact_out" / "generation_config.json").read_text())


def test_checkpoints_are_complete_or_ignored(tmp_path):
    """save_checkpoint writes the trainer state and the optimizer state with the weights and removes what a
    killed save left; latest_checkpoint takes only directories with both trainer_state.pt and config.json
    (written last); load_optimizer_state gives a fresh optimizer the saved moments and steps back (its
    hyperparameters stay its own, so an option a newer torch adds does not stop a resume); a step saved
    again replaces the first save."""
    from model import adamw, latest_checkpoint, load_optimizer_state, load_trainer_state, save_checkpoint
    make_hf_model("llama", tmp_path / "hf")
    model = Transformer.from_pretrained(tmp_path / "hf")
    optimizer = adamw(model, 1e-3, (0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        model(torch.tensor([[1, 5, 6, 7]])).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints" / ".step_000001.tmp-killed")
    state = {"step": 2, "data": {"position": torch.arange(5)}}
    save_checkpoint(str(run), 2, model, optimizer, state)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002"]
    loaded = load_trainer_state(str(run / "checkpoints" / "step_000002"))
    assert loaded["step"] == 2 and torch.equal(loaded["data"]["position"], torch.arange(5))
    fresh = adamw(model, 5e-1, (0.5, 0.5), weight_decay=0.1)
    for group in fresh.param_groups:
        group["an_option_of_a_newer_torch"] = True
    load_optimizer_state(model, fresh, str(run / "checkpoints" / "step_000002"))
    assert fresh.param_groups[0]["lr"] == 5e-1 and fresh.param_groups[0]["betas"] == (0.5, 0.5)
    for p in model.parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key]), key
    model(torch.tensor([[1, 5, 6, 7]])).square().mean().backward()        # a third step, saved as step 2 again
    optimizer.step()
    save_checkpoint(str(run), 2, model, optimizer, {**state, "data": {"position": torch.arange(3)}})
    load_optimizer_state(model, fresh, str(run / "checkpoints" / "step_000002"))
    p = next(model.parameters())
    assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"]) and fresh.state[p]["step"] == 3
    loaded = load_trainer_state(str(run / "checkpoints" / "step_000002"))
    assert torch.equal(loaded["data"]["position"], torch.arange(3))
    model.model.norm.weight.requires_grad_(False)              # a run that trains less than the checkpoint had
    with pytest.raises(ValueError, match=r"optimizer state for weights this run does not train: .*model\.norm"):
        load_optimizer_state(model, adamw(model, 1e-3, (0.9, 0.95)), str(run / "checkpoints" / "step_000002"))
    os.makedirs(run / "checkpoints" / "step_000003")          # killed mid-replace: no config.json
    (run / "checkpoints" / "step_000003" / "trainer_state.pt").write_bytes(
        (run / "checkpoints" / "step_000002" / "trainer_state.pt").read_bytes())
    assert latest_checkpoint(str(run)) == str(run / "checkpoints" / "step_000002")
    save_checkpoint(str(run), 4, model, optimizer, {**state, "step": 4}, keep=2)
    assert latest_checkpoint(str(run)) == str(run / "checkpoints" / "step_000004")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002", "step_000004"]   # the 2 newest complete ones
    # past step 999999 the name has seven digits: newest by number, not by name ("step_1000000" < "step_999999")
    save_checkpoint(str(run), 999_999, model, optimizer, {**state, "step": 999_999}, keep=2)
    save_checkpoint(str(run), 1_000_000, model, optimizer, {**state, "step": 1_000_000}, keep=2)
    assert latest_checkpoint(str(run)) == str(run / "checkpoints" / "step_1000000")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_1000000", "step_999999"]


def test_mfu_peak_is_the_gpus_own(monkeypatch):
    """A GPU whose name contains a shorter key (L40 holds "L4", H100 NVL holds "H100") gets its own peak."""
    from training import gpu_peak_flops
    for name, peak in (("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A10G", 70e12), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert gpu_peak_flops(torch.device("cuda", 0)) == peak, name


def test_flops_per_token_is_what_torch_counts_in_a_training_step():
    """flops_per_token(T) × B·T equals torch's FlopCounterMode over one forward + backward with SDPA's math
    backend (attention as plain matmuls over every (query, key) pair): the head counts, the embedding lookup
    does not, tied or not, GQA, head_dim != hidden / heads, biases; with only the embeddings and head
    training (pretrain.py --train-only embeddings: the frozen layers' weights get no gradient of their own);
    and a forward pass alone (the frozen KL reference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    B, T = 2, 16

    def counted(model, ids, backward=True):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(backward):
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            if backward:
                loss.backward()
        return counter.get_total_flops()
    for family in ("qwen3", "qwen3_tied", "qwen2", "llama_bias"):
        model = Transformer(Config.from_hf(hf_config(family).to_dict()))
        model.init_weights()
        ids = torch.randint(0, model.config.vocab_size, (B, T))
        assert model.flops_per_token(T) * B * T == counted(model, ids), family
        assert model.flops_per_token(T, forward_only=True) * B * T == counted(model, ids, backward=False), family
        for name, p in model.named_parameters():
            p.requires_grad_(name in ("model.embed_tokens.weight", "lm_head.weight"))
        assert model.flops_per_token(T) * B * T == counted(model, ids), family


def test_generate_runs_one_forward_per_new_token_and_top_k_0_is_off(tmp_path):
    """Prefill plus one forward per further token: none after the last one. top_k=0 means no top-k filter."""
    make_hf_model("llama", tmp_path / "hf")
    model = Transformer.from_pretrained(tmp_path / "hf")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, [[1, 5, 6], [1, 7]], 5)
    assert [len(o) for o in out] == [5, 5] and len(calls) == 5
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, [[1, 5, 6]], 4, temperature=0.7, top_k=0, generator=g)[0]
    assert len(sampled) == 4 and all(0 <= t < 101 for t in sampled)
    unfiltered = generate(model, [[1, 5, 6]], 4, temperature=0.7, generator=torch.Generator().manual_seed(0))[0]
    assert sampled == unfiltered                             # the same draws as with no top_k at all


def test_saved_directories_are_readable_by_others(tmp_path):
    """mkdtemp makes private (0700) directories, and safetensors private (0600) files; a saved model gets
    what a plain mkdir and open would give."""
    make_hf_model("llama", tmp_path / "hf")
    umask = os.umask(0o022)                                 # (under a private umask the check would be moot)
    try:
        Transformer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "out", max_shard_size="100KB")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    files = os.listdir(tmp_path / "out")
    assert len([n for n in files if n.endswith(".safetensors")]) >= 2
    assert {n: os.stat(tmp_path / "out" / n).st_mode & 0o777 for n in files} == {n: 0o644 for n in files}
    (tmp_path / "group").mkdir()
    os.chmod(tmp_path / "group", 0o2775)                    # a group-shared directory: mkdir inherits setgid
    Transformer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "group" / "out")
    assert os.stat(tmp_path / "group" / "out").st_mode & 0o2000


def test_saves_reach_the_disk_before_they_are_published(tmp_path, monkeypatch):
    """Every file of a checkpoint (and of a save into a run directory) is fsynced before the rename that
    gives it its final name, and the directory holding the new name is fsynced after that rename."""
    from model import save_checkpoint
    make_hf_model("llama", tmp_path / "hf")
    model = Transformer.from_pretrained(tmp_path / "hf")
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(kind, real):
        def move(src, dst):
            events.append((kind, os.path.realpath(src), os.path.realpath(dst)))
            return real(src, dst)
        return move
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename("rename", real_rename))
    monkeypatch.setattr(os, "replace", rename("replace", real_replace))

    def check(final, root, subdirs=()):
        """final: the published directory; root: the directory whose entry the last rename changed;
        subdirs: those of final's directories that this save wrote too."""
        final, root = os.path.realpath(final), os.path.realpath(root)
        publish = max(i for i, e in enumerate(events) if e[0] != "fsync" and e[2].startswith(final))
        synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
        source = {e[2]: e[1] for e in events[:publish + 1] if e[0] != "fsync"}       # final name -> written as
        files = [n for n in os.listdir(final) if os.path.isfile(os.path.join(final, n))]
        for name in files + [os.path.join(d, n) for d in subdirs for n in os.listdir(os.path.join(final, d))]:
            path = os.path.join(final, name)
            written_at = source.get(path) or os.path.join(source.get(final, final), name)  # alone, or in its dir
            assert written_at in synced, f"{name} was published before it was fsynced"
        assert ("fsync", root) in events[publish + 1:], "the rename itself was not made durable"

    save_checkpoint(str(tmp_path / "run"), 1, model, torch.optim.AdamW(model.parameters()), {"step": 1})
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_000001" / "optimizer" / ".metadata")
    check(tmp_path / "run" / "checkpoints" / "step_000001", tmp_path / "run" / "checkpoints", ["optimizer"])
    events.clear()
    model.save_pretrained(tmp_path / "run")                  # the final model, into the run directory
    check(tmp_path / "run", tmp_path / "run")


def test_fsdp_loads_as_stored_and_casts_as_it_shards(tmp_path):
    """Under torchrun with --fsdp, load_placement keeps the checkpoint's dtype (bf16 here: memory-mapped,
    no fp32 copy of the whole model per rank) and parallelize casts to the training dtype as it shards.
    (A one-rank gloo group in this process; the 2-rank runs are in test_pretrain.py.)"""
    import torch.distributed as dist
    from model import load_placement, parallelize, rope_inverse_frequencies
    make_hf_model("qwen3_tied", tmp_path / "hf")
    Transformer.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cpu = torch.device("cpu")
    assert load_placement(cpu, torch.float32, fsdp=True) == dict(device=cpu, dtype=torch.float32)  # no torchrun
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        placement = load_placement(cpu, torch.float32, fsdp=True)
        model = Transformer.from_pretrained(tmp_path / "bf16", **placement)
        assert placement["dtype"] is None and model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        model = parallelize(model, cpu, dtype=torch.float32, fsdp=True)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.lm_head.weight is model.model.embed_tokens.weight          # still tied after the casts
        stored = Transformer.from_pretrained(tmp_path / "hf", **placement)         # fp32 on disk, bf16 training
        stored = parallelize(stored, cpu, dtype=torch.bfloat16, fsdp=True)
        assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
        assert torch.equal(stored.inv_freq, rope_inverse_frequencies(stored.config))   # a buffer: kept fp32
    finally:
        dist.destroy_process_group()


def test_parallelize_applies_compile_and_activation_checkpointing(tmp_path):
    """The scale flags reach the model: each decoder layer compiled, and recomputed in the backward pass
    (the layers' forward runs once more in backward when checkpointed); N checkpoints the first N layers."""
    from model import parallelize
    make_hf_model("llama", tmp_path / "hf")
    model = parallelize(Transformer.from_pretrained(tmp_path / "hf"), torch.device("cpu"), compile=True,
                        activation_checkpointing=True)
    assert model.checkpoint_layers == 2 and all(layer._compiled_call_impl is not None for layer in model.model.layers)
    plain = parallelize(Transformer.from_pretrained(tmp_path / "hf"), torch.device("cpu"))
    assert plain.checkpoint_layers == 0 and all(layer._compiled_call_impl is None for layer in plain.model.layers)
    assert parallelize(Transformer.from_pretrained(tmp_path / "hf"), torch.device("cpu"),
                       activation_checkpointing=1).checkpoint_layers == 1
    calls = {0: [], 1: []}
    plain.train()
    for i, layer in enumerate(plain.model.layers):      # (module hooks do not fire in the recomputation)
        forward = layer.mlp.forward
        layer.mlp.forward = lambda *a, i=i, forward=forward: calls[i].append(1) or forward(*a)
    ids = torch.tensor([[1, 5, 6, 7]])
    for n in (0, 2, 1):
        plain.checkpoint_layers = n
        plain(ids).sum().backward()
    # plain: once each; all checkpointed: twice each (forward, then recomputed); the first only: twice, once
    assert (len(calls[0]), len(calls[1])) == (1 + 2 + 2, 1 + 2 + 1)


def test_each_checkpointed_layer_keeps_less_for_backward_and_gradients_do_not_change(tmp_path):
    """Activation checkpointing of the first N layers: the bytes autograd keeps for the backward pass fall
    with each layer added (by the same amount: the layers are alike), and the gradients stay the same."""
    import argparse
    from training import add_scale_arguments
    make_hf_model("llama", tmp_path / "hf", num_hidden_layers=3)
    model = Transformer.from_pretrained(tmp_path / "hf").train()
    ids = torch.randint(0, 101, (2, 24))
    saved, grads = [], []
    for n in range(4):
        model.checkpoint_layers = n
        model.zero_grad()
        kept = {}                                          # storage -> bytes: a tensor saved twice counts once
        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        saved.append(sum(kept.values()))
        grads.append([p.grad.clone() for p in model.parameters()])
    step = saved[0] - saved[1]
    assert step > 0 and all(saved[n] - saved[n + 1] == step for n in range(3)), saved
    for g in grads[1:]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g, grads[0]))
    p = argparse.ArgumentParser()
    add_scale_arguments(p)
    flags = ([], ["--activation-checkpointing"], ["--activation-checkpointing", "20"],
             ["--gradient-checkpointing", "1", "--compile"])
    assert [p.parse_args(a).activation_checkpointing for a in flags] == [False, True, 20, 1]
    with pytest.raises(SystemExit):
        p.parse_args(["--activation-checkpointing", "0"])


FSDP_SAVE_SCRIPT = """
import os, sys, torch
from model import Transformer, close_distributed, init_distributed, load_placement, parallelize

def main(source, out):
    rank, _, _, cpu = init_distributed()
    model = Transformer.from_pretrained(source, **load_placement(cpu, torch.float32, fsdp=True))
    model = parallelize(model, cpu, dtype=torch.float32, fsdp=True)
    fsync, synced = os.fsync, []
    os.fsync = lambda fd: synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)
    model.save_pretrained(out + "/ok", max_shard_size="30KB")
    os.fsync = fsync
    print(f"rank {rank} fsynced {sorted(n for n in set(synced) if n.endswith('.safetensors'))}", flush=True)
    model.save_pretrained(out + "/bf16", max_shard_size="30KB", dtype=torch.bfloat16)
    def disk_full_on_rank_1(tmp):
        if rank == 1:
            raise OSError("disk full")
    try:
        model.save_pretrained(out + "/bad", also=disk_full_on_rank_1)
    except Exception as e:
        print(f"raised on rank {rank}: {type(e).__name__}: {e}", flush=True)

    from torch.distributed.tensor import DTensor       # rank 1 runs out of host memory mid-gather
    gather, gathered = DTensor.full_tensor, []
    class NoHostMemory:
        def detach(self):
            raise MemoryError("no host memory")
    def full_tensor(self, *args, **kwargs):
        t = gather(self, *args, **kwargs)
        gathered.append(1)
        return NoHostMemory() if rank == 1 and len(gathered) > 2 else t
    DTensor.full_tensor = full_tensor
    try:
        model.save_pretrained(out + "/oom", max_shard_size="30KB")
    except Exception as e:
        print(f"raised on rank {rank}: {type(e).__name__}: {e}", flush=True)

main(*sys.argv[1:])
close_distributed()
"""


def test_fsdp_ranks_write_their_share_and_fail_together(tmp_path):
    """Under FSDP (2 ranks) save_pretrained gathers the sharded weights and the ranks write its files
    between them: the result holds exactly the source's tensors, with an index, and transformers loads it.
    When one rank fails, after the weights or in the middle of gathering them, every rank raises, saying
    which, and nothing is left: no model, no temporary directory."""
    import transformers
    from launch import run_script
    make_hf_model("qwen3_tied", tmp_path / "hf")
    (tmp_path / "save.py").write_text(FSDP_SAVE_SCRIPT)
    r = run_script(tmp_path / "save.py", tmp_path / "hf", tmp_path / "out", ranks=2)
    index = json.loads((tmp_path / "out" / "ok" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3                  # 30 KB files: both ranks write some
    source = Transformer.from_pretrained(tmp_path / "hf").state_dict()
    saved = Transformer.from_pretrained(tmp_path / "out" / "ok").state_dict()
    assert set(saved) == set(source) and all(torch.equal(saved[k], source[k]) for k in source)
    assert "lm_head.weight" not in index["weight_map"]                  # tied: stored once
    files = sorted(set(index["weight_map"].values()))
    in_file = {f: [source[k].numel() * 4 for k, g in index["weight_map"].items() if g == f] for f in files}
    assert all(len(sizes) == 1 or sum(sizes) <= 30_000 for sizes in in_file.values())   # max_shard_size holds
    assert f"rank 1 fsynced {files[1::2]}" in r.stdout                  # each writer fsyncs its own files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ok", dtype=torch.float32)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, source["model.layers.1.mlp.down_proj.weight"])
    released = Transformer.from_pretrained(tmp_path / "out" / "bf16").state_dict()     # cast as gathered
    assert all(torch.equal(released[k], source[k].to(torch.bfloat16)) for k in source)
    assert "raised on rank 1: OSError: disk full" in r.stdout
    assert "raised on rank 0: RuntimeError: writing" in r.stdout
    assert "failed on another rank: rank 1: OSError: disk full" in r.stdout
    assert "raised on rank 1: MemoryError: no host memory" in r.stdout
    assert "failed on another rank: rank 1: MemoryError: no host memory" in r.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["bf16", "ok"]
