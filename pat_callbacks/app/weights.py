"""Start a run from trained weights (``init_weights=PATH`` in train.py): the pretrained start of one-shot pruning.

Unlike ``ckpt_path`` (resume: weights, optimizer, step and callbacks' state), this loads only the model's weights,
before fit, so a new run (its own optimizer, step 0, its own pruning) starts from them. Accepted files, loaded with
``weights_only=True`` (no code runs):

- a Lightning checkpoint (``{"state_dict": ...}``, keys of the LightningModule, e.g. ``net.blocks.0...``);
- a plain ``state_dict`` of the LightningModule, or of its ``net`` (e.g. ``torch.save(model.net.state_dict(), p)``);
- a record of ``bench/pretrain.py`` (``{"state_dict": <CharGPT state_dict>, "model": {...}, ...}``).

Keys must match exactly (strict), so a wrong architecture fails before training with the keys and shapes at fault.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from pat_callbacks.app.models import MLP, Classifier
    >>> source = Classifier(MLP(4, (3,), 2))
    >>> path = Path(tempfile.mkdtemp()) / "net.pt"
    >>> torch.save(source.net.state_dict(), path)                    # the network's own state_dict
    >>> model = Classifier(MLP(4, (3,), 2))
    >>> load_initial_weights(model, path)
    'net'
    >>> torch.equal(model.net.layers[0].weight, source.net.layers[0].weight)
    True
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["check_initial_weights", "load_initial_weights"]


def check_initial_weights(path: str | Path | None) -> Path | None:
    """``path`` as a ``Path`` if it names an existing file (``None`` passes); raise before training otherwise.

    Example:
        >>> check_initial_weights("/no/such/file.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: init_weights='/no/such/file.ckpt' is not a file; give a Lightning checkpoint or a saved ...
    """
    if path is None:
        return None
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ValueError(
            f"init_weights={str(path)!r} is not a file; give a Lightning checkpoint or a saved state_dict "
            "(e.g. bench/results/pretrained/chargpt.pt from python bench/pretrain.py)"
        )
    return file


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # bench/pretrain.py's record
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # it holds objects weights_only refuses to rebuild: no code runs
        raise ValueError(
            f"init_weights={str(path)!r} holds objects that a weights-only load refuses (no code from a checkpoint "
            f"runs here); save the state_dict alone, e.g. torch.save(model.state_dict(), path): {error}"
        ) from None
    except (EOFError, KeyError, RuntimeError, UnicodeDecodeError) as error:  # empty, text or truncated file
        raise ValueError(
            f"init_weights={str(path)!r} is not a file torch.load can read (empty, text or truncated: "
            f"{type(error).__name__}: {error}); give a Lightning checkpoint or a file written by torch.save"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"init_weights={str(path)!r} holds no state_dict (a mapping of names to tensors)")
    return loaded


def load_initial_weights(model: nn.Module, path: str | Path) -> str:
    """Load the weights of ``path`` into ``model`` (strict); return where they went: ``"model"`` or ``"net"``.

    The file's keys are matched against the module's own, then against its ``net`` submodule's (with a ``net.``
    prefix removed, if any). Raises ``ValueError`` naming the missing / unexpected keys (or the shapes) otherwise.

    Example:
        >>> import tempfile
        >>> from pat_callbacks.app.models import MLP, Classifier
        >>> path = Path(tempfile.mkdtemp()) / "model.ckpt"
        >>> torch.save({"state_dict": Classifier(MLP(4, (3,), 2)).state_dict()}, path)   # a Lightning checkpoint
        >>> load_initial_weights(Classifier(MLP(4, (3,), 2)), path)
        'model'
        >>> load_initial_weights(Classifier(MLP(4, (5,), 2)), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: init_weights='...model.ckpt' does not fit the model: ...
    """
    file = check_initial_weights(path)
    if file is None:
        raise TypeError("load_initial_weights needs a path, but got None")
    state = _state_dict(file)
    targets: list[tuple[str, nn.Module, dict[str, torch.Tensor]]] = [("model", model, state)]
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module):
        targets.append(("net", net, {k.removeprefix("net."): v for k, v in state.items()}))
    for where, module, candidate in targets:
        own_state = module.state_dict()
        if set(candidate) == set(own_state):
            # every shape is checked before any tensor is copied, so a misfit leaves the model as it was
            wrong = [
                f"{key}: file {tuple(value.shape)}, model {tuple(own_state[key].shape)}"
                for key, value in candidate.items()
                if value.shape != own_state[key].shape
            ]
            if wrong:
                raise ValueError(
                    f"init_weights={str(path)!r} does not fit the model: size mismatch for {len(wrong)} tensor(s) "
                    f"({'; '.join(wrong[:5])}); is the model configured as the checkpoint was?"
                )
            try:
                module.load_state_dict(candidate, strict=True)
            except RuntimeError as error:  # same keys and shapes, yet refused
                raise ValueError(f"init_weights={str(path)!r} does not fit the model: {error}") from None
            return where
    own = set(targets[-1][1].state_dict())
    given = set(targets[-1][2])
    missing, unexpected = sorted(own - given)[:5], sorted(given - own)[:5]
    raise ValueError(
        f"init_weights={str(path)!r}: its keys match neither the model's nor model.net's; missing {missing}, "
        f"unexpected {unexpected} (is the model configured as the checkpoint was, e.g. model.net.context?)"
    )
