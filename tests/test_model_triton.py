"""The whole model through the Triton kernel (under TRITON_INTERPRET=1 on CPU) against transformers."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"      # before triton is first imported
pytest.importorskip("triton")

from model import Transformer  # noqa: E402
from tiny_models import make_hf_model, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def count_kernel_calls(monkeypatch):
    """Make sure the kernel really runs: count calls of flash_attention.flash_attention."""
    import flash_attention
    calls = []
    real = flash_attention.flash_attention
    monkeypatch.setattr(flash_attention, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["mistral", "qwen2_window"])     # windows shorter than the sequence
def test_logits_and_grads_through_kernel(family, tmp_path, monkeypatch):
    hf = make_hf_model(family, tmp_path / "hf")
    ids = torch.randint(3, 101, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    m = Transformer.from_pretrained(tmp_path / "hf", device=DEVICE)
    monkeypatch.setenv("NANOADAPT_ATTENTION", "triton")
    calls = count_kernel_calls(monkeypatch)
    out = m(ids.to(DEVICE))
    assert len(calls) == 2                                  # one per layer
    assert rel_err(out.cpu(), ref) < 1e-4
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    monkeypatch.setenv("NANOADAPT_ATTENTION", "sdpa")
    m(ids.to(DEVICE)).float().square().mean().backward()
    for n, p in m.named_parameters():
        assert rel_err(grads[n].cpu(), p.grad.cpu()) < 1e-4, n


def test_packed_documents_through_kernel(tmp_path, monkeypatch):
    make_hf_model("mistral", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf", device=DEVICE)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 101, (1, 13), generator=g), torch.randint(3, 101, (1, 10), generator=g)
    doc_ids = torch.tensor([[0] * 13 + [1] * 10])
    monkeypatch.setenv("NANOADAPT_ATTENTION", "sdpa")
    with torch.no_grad():
        alone = torch.cat([m(a.to(DEVICE)), m(b.to(DEVICE))], dim=1)
    monkeypatch.setenv("NANOADAPT_ATTENTION", "triton")
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        packed = m(torch.cat([a, b], dim=1).to(DEVICE), doc_ids=doc_ids.to(DEVICE))
    assert len(calls) == 2
    assert rel_err(packed.cpu(), alone.cpu()) < 1e-5


def test_kernel_runs_under_autocast(tmp_path, monkeypatch):
    """Training runs fp32 weights under autocast (bf16 on CUDA). RoPE's fp32 cos/sin promote q and k to
    fp32 while v comes out of its projection in the autocast dtype: attention() must hand the kernel
    three tensors of the autocast dtype (as autocast does for SDPA), or training never uses the kernel.
    On CPU the interpreter has no bf16, so fp16 autocast stands in. Kernel and SDPA round differently,
    so each is compared with the fp32 model: the kernel's error at most twice SDPA's (plus a floor)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    make_hf_model("qwen3", tmp_path / "hf", head_dim=16)    # QK-norm too, before RoPE
    m = Transformer.from_pretrained(tmp_path / "hf", device=DEVICE)   # fp32 weights
    ids = torch.randint(3, 101, (2, 21), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(path, autocast=True):
        monkeypatch.setenv("NANOADAPT_ATTENTION", path)
        m.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
            logits = m(ids)
        logits.float().square().mean().backward()
        return logits.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}

    calls = count_kernel_calls(monkeypatch)
    out, grads = run("triton")                              # raised "not supported" before the cast
    assert len(calls) == 2 and out.dtype == dtype
    sdpa, sdpa_grads = run("sdpa")
    exact, exact_grads = run("sdpa", autocast=False)        # fp32 throughout
    assert rel_err(out, exact) <= 2 * rel_err(sdpa, exact) + 1e-3
    for n in grads:
        assert rel_err(grads[n], exact_grads[n]) <= 2 * rel_err(sdpa_grads[n], exact_grads[n]) + 1e-3, n


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layer_keeps_the_kernel_in_one_graph(backend, tmp_path, monkeypatch):
    """pretrain.py --compile compiles each decoder layer. The kernel is a torch.library custom op, so a
    layer compiles into a single graph (fullgraph=True: no break) around it, and the compiled layer
    computes what the eager one does, forward and backward, with and without packed documents.
    aot_eager (Dynamo and AOT autograd with the op's fake shapes) runs the same ops: bit for bit.
    inductor (what --compile uses; C++ on the CPU) fuses the ops around the kernel: equal to rounding."""
    from model import document_starts, rope_cos_sin
    make_hf_model("mistral", tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf", device=DEVICE)
    monkeypatch.setenv("NANOADAPT_ATTENTION", "triton")
    calls = count_kernel_calls(monkeypatch)
    import flash_attention
    launches, config = [], flash_attention._config     # what the ops' implementations call at run time,
    monkeypatch.setattr(flash_attention, "_config", lambda *a: launches.append(1) or config(*a))  # compiled too
    B, T = 2, 19
    x = torch.randn(B, T, m.config.hidden_size, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
    cos, sin = rope_cos_sin(m.inv_freq, torch.arange(T, device=DEVICE).expand(B, T), x.dtype)
    layer = m.model.layers[0]
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    doc_start = document_starts(torch.tensor([[0] * 10 + [1] * 9, [0] * T], device=DEVICE))
    for docs in (None, doc_start):
        eager = layer(x, cos, sin, docs)
        grad_eager = torch.autograd.grad(eager.square().sum(), x)[0]
        launches.clear()
        out = compiled(x, cos, sin, docs)
        grad = torch.autograd.grad(out.square().sum(), x)[0]
        assert len(launches) == 2                           # the compiled layer ran the kernel: forward, backward
        if backend == "aot_eager":
            assert torch.equal(out, eager) and torch.equal(grad, grad_eager)
        else:
            assert rel_err(out, eager) < 1e-5 and rel_err(grad, grad_eager) < 1e-5
    assert calls                                            # the eager layer went through the kernel too


def test_forced_triton_on_an_unsupported_input_says_why(monkeypatch):
    """NANOADAPT_ATTENTION=triton with an input the kernel does not take (fp64) is refused, naming the
    head dim, dtype and device; the TRITON_INTERPRET hint only where the interpreter is off."""
    import model
    monkeypatch.setenv("NANOADAPT_ATTENTION", "triton")
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"not supported by the kernel \(head dim 16, torch.float64") as e:
        model._use_triton(q, q, q)
    assert ("TRITON_INTERPRET" in str(e.value)) == (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")
