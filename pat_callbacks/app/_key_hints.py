"""The hint of :func:`~pat_callbacks.app.config.check_against_schema` for a key a config schema does not have: the
closest field, or the new name of the closest former (renamed) argument name."""

from __future__ import annotations

import difflib

__all__ = ["RENAMED_KEYS", "unknown_key_hint"]

# Former argument names -> their new names (the callbacks' deprecated aliases, through `renamed`); a key close to a
# former name is pointed at the new one, the name a config should use.
RENAMED_KEYS: dict[str, str] = {
    "final_sparsity": "sparsity",
    "regrow_fraction": "drop_fraction",
    "stop_fraction": "end_fraction",
    "stop_step": "end_step",
    "importance": "criterion",
    "ignore": "exclude",
}


def unknown_key_hint(name: str, known: set[str]) -> str:
    """The hint for an unknown key ``name`` of a schema with fields ``known``: the closest field, or the new name of
    the closest former name (``final_sparsty`` -> ``sparsity``, not ``initial_sparsity``), else the fields.

    Example:
        >>> unknown_key_hint("final_sparsty", {"sparsity", "initial_sparsity"})
        '; did you mean `sparsity` (the new name of `final_sparsity`)?'
        >>> unknown_key_hint("sparsty", {"sparsity", "initial_sparsity"})
        '; did you mean `sparsity`?'
        >>> unknown_key_hint("zzz", {"sparsity"})
        '; expected one of: sparsity'
    """
    if name == "final_sparsity" and "sparsity" in known:
        return "; it is called `sparsity` in every pruning config"
    former = {old: new for old, new in RENAMED_KEYS.items() if new in known}
    close = difflib.get_close_matches(name, sorted(known | set(former)), n=1)
    if not close:
        return f"; expected one of: {', '.join(sorted(known))}"
    if close[0] in former:
        return f"; did you mean `{former[close[0]]}` (the new name of `{close[0]}`)?"
    return f"; did you mean `{close[0]}`?"
