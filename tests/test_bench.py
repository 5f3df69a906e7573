"""bench/ scripts run end to end on tiny shapes on the CPU, so that a GPU session (short, and rare)
never spends its time on a broken script. These check the scripts, not speed: their timings on a CPU
and under the Triton interpreter mean nothing, and no timing is asserted on. (--check's accuracy verdict
is: its error ratios do not depend on the device.)"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*argv, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # each script decides
    env["OMP_NUM_THREADS"] = "1"                     # (as the other tests' launchers: two ranks share 2 cores)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


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
    out = run_bench("bench/train.py", "--preset", "cpu", "--warmup", "1", "--iters", "1", "--only", *only)
    rows = table_rows(out, r"\| (transformers|nanoadapt)")
    assert rows and not any("out of memory" in r for r in rows)
    for r in rows:
        assert only[0] in r, r                              # the contender asked for, and only it
        assert re.match(r"\| [^|]+ \| [\d,]+ \|", r), r     # a tokens/s was measured


def test_fsdp_load_smoke():
    """Two ranks (gloo), a tiny random bf16 checkpoint: both ways of loading and of saving run and both
    tables are printed."""
    out = run_bench("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "bench/fsdp_load.py",
                    "--layers", "2", "--hidden", "128", "--vocab", "512")
    rows = table_rows(out, r"\| (baseline|nanoadapt)")
    assert [r.split()[1] for r in rows] == ["baseline", "nanoadapt"] * 2
