"""``pat-export``: a Lightning checkpoint's (or a state dict's) weights as a compressed sparse file."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pat_callbacks.export.checkpoint import is_checkpoint, read_checkpoint, save_sparse


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def find_state_dict(loaded: Any, path: str | Path, key: str | None = None) -> Mapping[str, Tensor]:
    """The state dict in a loaded checkpoint: at ``key`` (dots go deeper), else the file itself or its
    ``state_dict`` (a Lightning checkpoint); otherwise a one-line ``ValueError`` naming the keys that hold one.

    Example:
        >>> import torch
        >>> find_state_dict({"model": {"w": torch.ones(1)}, "epoch": 3}, "run.pt")
        Traceback (most recent call last):
        ...
        ValueError: run.pt holds no state dict at the top level or under 'state_dict'; pick one with --key: 'model'
        >>> list(find_state_dict({"model": {"w": torch.ones(1)}, "epoch": 3}, "run.pt", key="model"))
        ['w']
    """
    if key is not None:
        value = loaded
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                keys = ", ".join(repr(k) for k in value) if isinstance(value, Mapping) else "none"
                raise ValueError(f"{path} has no key {key!r} (keys at {part!r}'s level: {keys})")
            value = value[part]
        if not _is_state_dict(value):
            raise ValueError(f"{path}: key {key!r} holds no state dict of tensors ({type(value).__name__})")
        return value
    if is_checkpoint(loaded):
        raise ValueError(f"{path} is already a pat-callbacks sparse checkpoint (read it with load_sparse)")
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, Mapping) and _is_state_dict(loaded.get("state_dict")):
        return loaded["state_dict"]
    where = "no state dict at the top level or under 'state_dict'"
    candidates = (
        [name for name, value in loaded.items() if _is_state_dict(value)] if isinstance(loaded, Mapping) else []
    )
    if candidates:
        raise ValueError(f"{path} holds {where}; pick one with --key: {', '.join(map(repr, candidates))}")
    raise ValueError(f"{path} holds {where} (a {type(loaded).__name__})")


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ValueError(f"OUT {out} is a folder; give a file name, e.g. {out / 'model.sparse.pt'}")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of OUT {out} does not exist: {out.parent}")


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-export CHECKPOINT OUT [--key KEY]``: a Lightning checkpoint's (or a state dict's) weights as a sparse file.

    The input is read with ``torch.load(weights_only=True)``: a crafted file cannot run code. Any error (missing,
    truncated or crafted input, no state dict, OUT's folder missing) is one line naming the path, exit status 1.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    parser = argparse.ArgumentParser(prog="pat-export", description=main.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Lightning .ckpt or a torch.save'd state dict")
    parser.add_argument("out", type=Path, help="where to write the compressed weights (its folder must exist)")
    parser.add_argument("--key", help="where the state dict is in CHECKPOINT, e.g. model or ema.model (default: "
                        "the file itself, else its state_dict)")  # fmt: skip
    parser.add_argument("--min-sparsity", type=float, default=0.3, help="store tensors at least this sparse sparsely")
    parser.add_argument(
        "--drop-zero-signs", action="store_true", help="store every zero as +0.0 (smaller; default: bit-exact -0.0)"
    )
    args = parser.parse_args(argv)
    try:
        state_dict = find_state_dict(read_checkpoint(args.checkpoint), args.checkpoint, args.key)
        _check_out(args.out)
        report = save_sparse(state_dict, args.out, args.min_sparsity, keep_zero_signs=not args.drop_zero_signs)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"pat-export: error: {error}\n")
    except (OSError, RuntimeError) as error:  # torch.save: permissions, a full disk
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.exit(1, f"pat-export: error: cannot write {args.out} ({reason})\n")
    print(f"wrote {args.out}: {report.sparse_bytes} bytes, {report.ratio:.3f} of the dense {report.dense_bytes}")


if __name__ == "__main__":
    main()
