"""Multi-tensor kernels for SAM's perturbation (Triton on CUDA, torch._foreach reference elsewhere).

See kernels/sam_perturb.py for the kernels, the path selection (FLATTUNE_KERNELS) and the math.
"""
from kernels.sam_perturb import (BACKENDS, HAVE_TRITON, asam_sums, path_for, perturb_, restore_,
                                 sum_squares)

__all__ = ["BACKENDS", "HAVE_TRITON", "asam_sums", "path_for", "perturb_", "restore_", "sum_squares"]
