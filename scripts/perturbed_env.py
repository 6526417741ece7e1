"""The numeric environment of the different-machine pass (`make test-portable`), printed as `NAME=value` words.

Another CPU computes the same float32 program with other last bits: its instruction set picks other vectorised
kernels, its BLAS library other blockings, its core count another split of the sums. Three settings simulate that on
this machine, each of which changes the result bits of a short training run:

- `ATEN_CPU_CAPABILITY`: one instruction set below this machine's own (AVX512 -> avx2, AVX2 or SVE256 -> default);
  nothing on a machine that already runs the plain kernels;
- `MKL_CBWR=COMPATIBLE`: MKL's conditional numerical reproducibility mode that avoids the CPU-specific code paths
  (no effect where PyTorch uses another BLAS, e.g. on Apple silicon);
- `OMP_NUM_THREADS`: another thread count than PyTorch's default here (1 if the default is more, else 2); the
  notebooks pin their own.

    python scripts/perturbed_env.py            # e.g. MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default
    env $(python scripts/perturbed_env.py) python -m pytest tests
"""

from __future__ import annotations

# torch.backends.cpu.get_cpu_capability() -> the ATEN_CPU_CAPABILITY value one step below it
LOWER_CAPABILITY = {"AVX512": "avx2", "AVX2": "default", "SVE256": "default", "VSX": "default", "Z VECTOR": "default"}


def perturbed_env(capability: str, default_threads: int) -> dict[str, str]:
    """The variables of the different-machine pass for a machine with this ATen capability and thread default."""
    env = {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1" if default_threads > 1 else "2"}
    lower = LOWER_CAPABILITY.get(capability.upper())
    if lower is not None:
        env["ATEN_CPU_CAPABILITY"] = lower
    return env


def main() -> None:
    import torch

    env = perturbed_env(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    print(" ".join(f"{name}={value}" for name, value in env.items()))


if __name__ == "__main__":
    main()
