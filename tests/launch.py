"""How the tests start a script in a process of its own: plain `python`, or `torchrun` with N ranks
(gloo on the CPU), from the repository root, with one OpenMP thread per process (the ranks share the
machine's cores). Every test that needs a fresh process or more than one rank goes through here."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, ranks=0, env=None, timeout=300, check=True):
    """Run `script` (relative to the repository root, or an absolute path) with args; ranks > 0: under
    `torchrun --standalone --nproc_per_node ranks`. env: variables to set (None removes one). The
    repository is importable from the script wherever it lies. Returns the CompletedProcess (text);
    with check, a non-zero exit fails the test and shows the end of both outputs."""
    variables = {**os.environ, "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    for name, value in (env or {}).items():
        if value is None:
            variables.pop(name, None)
        else:
            variables[name] = value
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks else [sys.executable]
    r = subprocess.run([*launcher, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=variables,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{script} exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r
