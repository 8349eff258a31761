"""Ablation: keep as many raw tokens per chunk as keep=digits would, at random positions (not shipped)."""
import sys
import torch
from ccmem.methods.ccm import CCM
from ccmem import cli

original = CCM.kept_positions
gen = torch.Generator().manual_seed(0)

def random_positions(self, lm, ids):
    digits = original(self, lm, ids)
    if digits is None:
        return None
    n = ids.shape[-1]
    return torch.randperm(n, generator=gen)[: len(digits)].sort().values.to(ids.device)

CCM.kept_positions = random_positions
sys.argv = ["ccmem", *sys.argv[1:]]
cli.main()
