"""``pat-export``: a Lightning checkpoint's (or a state dict's) weights as a compressed sparse file."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from pat_callbacks.export.checkpoint import save_sparse


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-export CHECKPOINT OUT``: a Lightning checkpoint's (or a state dict's) weights as a sparse file.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    parser = argparse.ArgumentParser(prog="pat-export", description=main.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Lightning .ckpt or a torch.save'd state dict")
    parser.add_argument("out", type=Path, help="where to write the compressed weights")
    parser.add_argument("--min-sparsity", type=float, default=0.3, help="store tensors at least this sparse sparsely")
    args = parser.parse_args(argv)
    try:
        loaded = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        parser.exit(1, f"pat-export: error: {args.checkpoint}: no such file\n")
    except Exception as error:  # truncated, empty or not a torch file: one line, not a traceback
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.exit(1, f"pat-export: error: {args.checkpoint} is not a readable checkpoint ({reason})\n")
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        parser.exit(1, f"pat-export: error: {args.checkpoint} holds no state dict of tensors\n")
    report = save_sparse(state_dict, args.out, args.min_sparsity)
    print(f"wrote {args.out}: {report.sparse_bytes} bytes, {report.ratio:.3f} of the dense {report.dense_bytes}")


if __name__ == "__main__":
    main()
