"""Set up before any test module is imported.

Without a GPU the Triton kernel (flash_attention.py) runs in Triton's CPU interpreter. Triton reads
TRITON_INTERPRET once, when it is first imported, and importing transformers imports triton: so the
variable must be set here, before pytest collects (imports) the test modules, not in one of them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
