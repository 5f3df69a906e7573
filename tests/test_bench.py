"""bench/ scripts run end to end on tiny shapes on the CPU, so that a GPU session (short, and rare)
never spends its time on a broken script. These check the scripts, not speed: their timings on a CPU
and under the Triton interpreter mean nothing, and no timing is asserted on. (--check's accuracy verdict
is: its error ratios do not depend on the device.)"""
import re

import pytest

from launch import run_script


def run_bench(script, *args, ranks=0):
    """A bench script's output; TRITON_INTERPRET left unset (each script decides)."""
    return run_script(script, *args, ranks=ranks, env={"TRITON_INTERPRET": None}).stdout


def table_rows(out, first_cell):
    """Rows of a printed table whose first cell matches first_cell."""
    return [line for line in out.splitlines() if re.match(rf"\s*\|?\s*{first_cell}", line)]


def test_attention_table_smoke():
    out = run_bench("bench/attention.py", "--smoke")
    rows = table_rows(out, r"(causal|window \d+|\d+ docs)\s+16\s")
    assert [r.split()[0] for r in rows] == ["causal", "window", "4"]
    for r in rows:                       # vs flash: three ratios fwd/bwd/fwd+bwd, SDPA's CPU flash ran
        assert re.search(r"\s\d+\.\d\d/\d+\.\d\d/\d+\.\d\d\s", r), r
    assert "x our causal" in rows[1]


def test_attention_check_smoke():
    out = run_bench("bench/attention.py", "--smoke", "--check")
    rows = table_rows(out, r"(causal|window \d+|\d+ docs)\s+(16|32)\s")
    assert len(rows) == 8 and "window None" not in out
    assert out.strip().splitlines()[-1] == "check: PASS"     # fp16 here: ours within 2x SDPA's error, every cell


def test_attention_sweep_smoke():
    out = run_bench("bench/attention.py", "--smoke", "--sweep")
    assert [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("best")] == ["fwd", "dkdv", "dq"]
    assert out.splitlines()[-1].startswith("chosen: {16: {'fwd': (")


def test_forward_smoke():
    out = run_bench("bench/forward.py", "--iters", "1", "--rounds", "1", "--warmup", "0")
    assert len(table_rows(out, r"\| (transformers|nanoadapt)")) == 2


@pytest.mark.parametrize("only", [["eager"], ["compiled + activation"]])
def test_train_smoke(only):
    partial = ["--checkpoint-layers", "1"] if "activation" in only[0] else []
    out = run_bench("bench/train.py", "--preset", "cpu", "--warmup", "1", "--iters", "1", "--only", *only, *partial)
    rows = table_rows(out, r"\| (transformers|nanoadapt)")
    # eager: the transformers and nanoadapt loops; compiled + activation: all layers checkpointed, then the first 1
    assert len(rows) == 2 and not any("out of memory" in r for r in rows)
    for r in rows:
        assert only[0] in r, r                              # the contender asked for, and only it
        assert re.match(r"\| [^|]+ \| [\d,]+ \|", r), r     # a tokens/s was measured
    if partial:
        assert "checkpointing of 1/2 layers" in rows[1]


def test_train_bench_checkpoints_the_fewest_layers_that_meet_the_memory_bar():
    """Peaks 55 GiB with no layer checkpointed, 35 with all 28: 20/28 GiB per layer, so 0.6 × 65 = 39 GiB
    needs ceil(16 / (20/28)) = ceil(22.4) = 23 layers; none when no checkpointing is needed or all is not enough."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(os.path.dirname(__file__), "..",
                                                                              "bench", "train.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checkpointing, layers_for_memory = bench.checkpointing, bench.layers_for_memory
    assert layers_for_memory(0.6 * 65, 55, 35, 28) == 23
    assert layers_for_memory(39, 38, 30, 28) is None and layers_for_memory(39, 55, 40, 28) is None
    kinds = ("nanoadapt compiled", "nanoadapt compiled + activation checkpointing",
             "nanoadapt compiled + activation checkpointing of 23/28 layers")
    assert [checkpointing(k) for k in kinds] == [False, True, 23]


def test_fsdp_load_smoke():
    """Two ranks (gloo), a tiny random bf16 checkpoint: both ways of loading and of saving run and both
    tables are printed."""
    out = run_bench("bench/fsdp_load.py", "--layers", "2", "--hidden", "128", "--vocab", "512", ranks=2)
    rows = table_rows(out, r"\| (baseline|nanoadapt)")
    assert [r.split()[1] for r in rows] == ["baseline", "nanoadapt"] * 2
