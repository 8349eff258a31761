"""Pack a trained adapter for shipping: half-precision weights and runtime defaults, metadata kept.

    python scripts/pack_adapter.py runs/icf1-ft32/adapter.safetensors \\
        src/ccmem/adapters/smollm2-135m/icformer.safetensors --dtype float16 -O use_chunk=true

Only options the method may change after training (``ccmem methods`` lists them as runtime options) can be set;
the file records what it was packed from (``extra.packed``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ccmem.adapter import AdapterMismatchError, file_hash, pack_adapter, read_adapter
from ccmem.options import OptionError, parse_pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the trained adapter (runs/<run_id>/adapter.safetensors)")
    parser.add_argument("target", help="where to write the packed copy")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="cast the weights (default: keep)")
    parser.add_argument("-O", "--option", action="append", default=[], help="runtime option KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    try:
        runtime = parse_pairs(args.option)
        path = pack_adapter(
            args.source, args.target, dtype=getattr(torch, args.dtype) if args.dtype else None, runtime=runtime
        )
    except (AdapterMismatchError, OptionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    adapter = read_adapter(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {file_hash(path)}, options {adapter.options}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
