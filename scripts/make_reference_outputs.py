"""Regenerate the reference outputs that dsv3_ref ships for `python -m dsv3_ref validate`.

    python scripts/make_reference_outputs.py            # rewrite dsv3_ref/reference_outputs/<name>.safetensors
    python scripts/make_reference_outputs.py --check    # compare a fresh regeneration with the shipped files

Each reference model (`dsv3_ref.teaching.validate.REFERENCES`) is rebuilt from its seed; its logits, per-layer hidden
states, routing and MTP logits on the reference tokens are written with safetensors (float32; a few hundred KB in
all).
Run it after a change that is meant to change what the model computes, and say why in the commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsv3_ref.teaching import validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=validate.REFERENCE_DIR, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ok = True
    for name in validate.REFERENCES:
        if args.check:
            fresh, shipped = validate.make_expected(name), validate.expected_outputs(name)
            same = fresh.keys() == shipped.keys() and all(
                torch.allclose(fresh[k].double(), shipped[k].double(), rtol=1e-5, atol=1e-5) for k in fresh)
            ok &= same
            print(f"{name:<12} {'matches' if same else 'DIFFERS from'} the shipped outputs")
        else:
            path = validate.save_expected(name, args.out)
            print(f"{name:<12} {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
