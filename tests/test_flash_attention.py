"""The Triton flash-attention kernel against a float64 reference.

On a machine without a GPU the kernel runs under the Triton interpreter: TRITON_INTERPRET must be set
before triton is first imported, hence the lines above the imports. With a GPU the same tests run
the compiled kernel on CUDA (fp32 uses IEEE dots, so the tolerances hold there too).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import flash_attention as fa  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------- reference

def visible_mask(T, doc_start=None, window=None):
    """(B or 1, T, T) boolean: query t sees key s iff s <= t, s >= doc_start[b, t], t - s < window."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    ok = (s <= t)[None]
    if window is not None:
        ok = ok & (t - s < window)
    if doc_start is not None:
        ok = ok & (s[None] >= doc_start.cpu()[:, :, None])
    return ok


def reference(q, k, v, mask, scale=None):
    """Plain masked softmax attention in float64 on the CPU. mask: (B or 1, T, T), True = visible.
    A row that sees nothing outputs 0 (and gets zero gradients)."""
    q, k, v = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ kr.transpose(-1, -2)) * scale
    mask = mask[:, None]  # broadcast over heads
    row_max = scores.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    e = torch.exp(scores - row_max) * mask
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ vr, (q, k, v)


def make_qkv(B, H, HKV, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, HKV, HKV))
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def rel_err(x, ref):
    """‖x - ref‖ / ‖ref‖, with ‖ref‖ floored at an RMS of 0.01: some gradients are 0 in exact
    arithmetic (a row that sees only itself has dS = 0) and are then compared in absolute terms."""
    ref = ref.detach()
    floor = 0.01 * ref.numel() ** 0.5
    return ((x.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(floor)).item()


def check(q, k, v, doc_start=None, window=None, scale=None, tol=2e-5, seed=1):
    """Forward and dQ/dK/dV of the kernel vs the float64 reference; returns the kernel's results."""
    T = q.shape[2]
    o = fa.flash_attention(q, k, v, doc_start=doc_start, window=window, scale=scale)
    assert o.shape == q.shape and o.dtype == q.dtype
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref, leaves = reference(q, k, v, visible_mask(T, doc_start, window), scale)
    ref_grads = torch.autograd.grad(ref, leaves, do.cpu().double())
    for name, got, want in zip("o dq dk dv".split(), (o, dq, dk, dv), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return o, dq, dk, dv


def doc_start_from_lengths(lengths_per_row):
    """[[5, 40, ...], ...] (each row summing to T) -> (B, T) int32: first position of each position's doc."""
    rows = []
    for lengths in lengths_per_row:
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        rows.append(torch.repeat_interleave(starts, torch.tensor(lengths)))
    return torch.stack(rows).to(DEVICE, torch.int32)


# ---------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("H,HKV", [(4, 4), (4, 2), (4, 1)])  # GQA groups 1, 2, 4
def test_causal_gqa(H, HKV):
    check(*make_qkv(2, H, HKV, 37, 16))


@pytest.mark.parametrize("T", [1, 16, 129])  # one token; exactly one block; a ragged tail
def test_causal_lengths(T):
    check(*make_qkv(1, 2, 1, T, 32))


@pytest.mark.parametrize("window", [1, 23, 64])
def test_window_smaller_than_T(window):
    check(*make_qkv(1, 4, 2, 100, 16), window=window)


@pytest.mark.parametrize("window", [100, 101, 500])
def test_window_not_smaller_than_T(window):
    q, k, v = make_qkv(1, 2, 1, 100, 16)
    o = check(q, k, v, window=window)[0]
    assert torch.equal(o, fa.flash_attention(q, k, v))  # a window >= T hides nothing


def test_packed_documents_uneven():
    # the last row starts documents one before block boundaries (15, 47) and crosses them
    lengths = [[5, 40, 1, 60, 23], [129], [1, 1, 127], [15, 20, 12, 82]]
    check(*make_qkv(4, 4, 2, 129, 16), doc_start=doc_start_from_lengths(lengths))


def test_packed_documents_with_window():
    lengths = [[70, 3, 56], [17, 17, 95]]
    check(*make_qkv(2, 4, 1, 129, 16), doc_start=doc_start_from_lengths(lengths), window=20)


def test_scale():
    check(*make_qkv(1, 2, 2, 40, 16), scale=0.3)


def test_noncontiguous_views_and_fp16():
    # model.py passes views of a projection output: (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D)
    B, T, H, HKV, D = 2, 45, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, (H + 2 * HKV) * D, generator=g).to(DEVICE, torch.float16)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    q, k, v = (x.reshape(B, T, -1, D).transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    assert not q.is_contiguous()
    check(q, k, v, doc_start=doc_start_from_lengths([[20, 25], [45]]), window=30, tol=5e-3)


def test_last_dimension_strided_inputs_and_a_broadcast_output_gradient():
    """q, k, v whose last dimension is not contiguous (a transposed tensor), and the gradient of
    o.sum(), which autograd hands over as an expanded scalar (every stride 0): the kernel needs unit
    strides along the head dimension, so the wrapper copies; without the copies it reads wrong memory."""
    B, H, HKV, T, D = 1, 2, 1, 19, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, D, T, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()
               for h in (H, HKV, HKV))
    assert q.stride(-1) != 1
    check(q, k, v, window=7)
    q, k, v = make_qkv(B, H, HKV, T, D, seed=6)
    fa.flash_attention(q, k, v).sum().backward()
    ref, leaves = reference(q, k, v, visible_mask(T))
    ref.sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_err(got, want.grad) < 2e-5


def test_very_negative_scores_in_fp16_at_window_and_document_edges():
    """Rows whose first key block is all invisible (left of the window or of the document) must keep
    their running max at -inf, not 0: with every score at -20 (natural log), exp2(s - 0) underflows in
    fp16 and such rows came out as 0 instead of the mean of their values."""
    B, H, T, D = 1, 2, 64, 16
    a = (20 / D ** 0.5) ** 0.5                          # q·k · D^-0.5 = -20 for every pair, plus a little noise
    g = torch.Generator().manual_seed(4)
    q, k, v = ((sign * a + 0.3 * torch.randn(B, h, T, D, generator=g)).to(DEVICE, torch.float16).requires_grad_()
               for sign, h in ((1, H), (-1, 1), (0, 1)))
    check(q, k, v, window=20, tol=5e-3)
    check(q, k, v, doc_start=doc_start_from_lengths([[19, 45]]), tol=5e-3)


def test_fully_masked_rows_give_zero_not_nan():
    # doc_start > t means "sees nothing" (e.g. padding at the end of a packed row)
    T = 50
    doc_start = doc_start_from_lengths([[30, 20]])
    doc_start[0, 35:] = T
    q, k, v = make_qkv(1, 2, 1, T, 16)
    o, dq, dk, dv = check(q, k, v, doc_start=doc_start)
    assert torch.equal(o[0, :, 35:], torch.zeros_like(o[0, :, 35:]))
    assert torch.equal(dq[0, :, 35:], torch.zeros_like(dq[0, :, 35:]))


def test_deterministic():
    q, k, v = make_qkv(2, 4, 1, 77, 16)
    doc_start = doc_start_from_lengths([[30, 47], [77]])
    runs = []
    for _ in range(2):
        o = fa.flash_attention(q, k, v, doc_start=doc_start, window=33)
        runs.append((o, *torch.autograd.grad(o, (q, k, v), torch.ones_like(o))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def random_lengths(T, max_len, generator):
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(T - sum(lengths), int(torch.randint(1, max_len + 1, (1,), generator=generator))))
    return lengths


def test_every_window():
    # The block-range arithmetic (which blocks to visit, which need a mask) depends on where the
    # window edge falls relative to block boundaries: try every window, including >= T.
    q, k, v = make_qkv(1, 2, 1, 50, 16)
    for window in range(1, 52):
        check(q, k, v, window=window)


def test_random_documents():
    # Many document layouts at once (one per batch row), lengths 1..19, with and without a window.
    g = torch.Generator().manual_seed(0)
    doc_start = doc_start_from_lengths([random_lengths(64, 19, g) for _ in range(8)])
    q, k, v = make_qkv(8, 2, 1, 64, 16)
    check(q, k, v, doc_start=doc_start)
    check(q, k, v, doc_start=doc_start, window=9)


def test_other_block_shapes(monkeypatch):
    # The same sweeps with BLOCK_M < BLOCK_N where the default small tiles have BLOCK_M > BLOCK_N.
    blocks = dict(fwd=(16, 32, 4, 1), dkdv=(32, 16, 4, 1), dq=(16, 16, 4, 1))
    monkeypatch.setattr(fa, "_config", lambda head_dim, dtype: blocks)
    q, k, v = make_qkv(1, 2, 1, 40, 16)
    for window in range(1, 42, 2):
        check(q, k, v, window=window)
    g = torch.Generator().manual_seed(1)
    doc_start = doc_start_from_lengths([random_lengths(64, 19, g) for _ in range(4)])
    check(*make_qkv(4, 4, 2, 64, 16), doc_start=doc_start, window=13)


def test_window_and_documents_match_transformers():
    """The off-by-one trap: build the mask with transformers' own Mistral masking code (sliding
    window, and packed sequences detected from position_ids) and check the kernel computes exactly
    the attention that mask defines."""
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import create_sliding_window_causal_mask

    B, H, HKV, T, D, W = 1, 2, 1, 60, 16, 7
    config = transformers.MistralConfig(sliding_window=W, hidden_size=H * D, num_attention_heads=H,
                                        num_key_value_heads=HKV, head_dim=D)
    config._attn_implementation = "sdpa"  # returns a boolean (B, 1, T, T) mask, True = visible
    lengths = [25, 4, 31]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # restarts at 0 per document
    mask = create_sliding_window_causal_mask(  # 4th argument, no cache: named past_key_values, then cache (5.24)
        config, torch.zeros(B, T, H * D), None, None, position_ids=position_ids, allow_is_causal_skip=False)
    mask = mask[:, 0].bool()  # (B, T, T)

    doc_start = (torch.arange(T)[None] - position_ids).to(DEVICE, torch.int32)
    assert torch.equal(mask, visible_mask(T, doc_start.cpu(), W))  # our reading of the semantics
    q, k, v = make_qkv(B, H, HKV, T, D)
    o = fa.flash_attention(q, k, v, doc_start=doc_start, window=W)
    ref, _ = reference(q, k, v, mask)
    assert rel_err(o, ref) < 2e-5
    # the neighbouring windows are different functions: the check above can tell them apart
    for wrong in (W - 1, W + 1):
        assert rel_err(fa.flash_attention(q, k, v, doc_start=doc_start, window=wrong), ref) > 1e-3


def test_supports():
    q, k, v = make_qkv(1, 4, 2, 8, 16)
    assert fa.supports(q, k, v)
    assert not fa.supports(q[..., :8], k[..., :8], v[..., :8])  # head dim 8
    assert not fa.supports(q, k[:, :, :4], v[:, :, :4])  # kv length != q length (KV cache)
    assert not fa.supports(*make_qkv(1, 3, 2, 8, 16))  # 3 query heads over 2 KV heads
    big = torch.empty(1, 1, 1, 128, device=DEVICE).expand(1, 128, 2**17, 128)  # no memory: strides are 0
    assert not fa.supports(big, big[:, :8], big[:, :8])  # T·H·D = 2^31: o's int32 row offsets would overflow
    assert fa.supports(big[:, :, :2**16], big[:, :8, :2**16], big[:, :8, :2**16])
    if DEVICE == "cpu":
        assert not fa.supports(*(x.bfloat16() for x in (q, k, v)))


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs on the CPU only")
def test_interpreter_that_cannot_run_with_this_numpy_is_a_clear_error(monkeypatch):
    """Triton 3.6's interpreter fails deep inside with NumPy 2.4 (seen with both installed); the
    versions are checked first, and the error says what to install."""
    import numpy
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    monkeypatch.setattr(fa.triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match=r"Triton 3.6.0's CPU interpreter .* NumPy 2.4.6: pip install 'numpy<2.4'"):
        fa.flash_attention(q, k, v)
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6")):   # either side newer: no check
        monkeypatch.setattr(fa.triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        fa._check_interpreter_numpy()
