import warnings

import pytest

from pat_callbacks.callbacks.gradual import GradualPruning
from pat_callbacks.callbacks.scheduled import resolve_target
from pat_callbacks.callbacks.structured import StructuredPruning


@pytest.mark.parametrize("callback", [GradualPruning, StructuredPruning])
def test_final_sparsity_warns_once_naming_the_new_name_and_still_works(callback):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruning = callback(final_sparsity=0.5, start_step=0, end_step=10)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages == ["`final_sparsity` is now called `sparsity`; the old name still works"]
    assert caught[0].filename == __file__  # attributed to the line that built the callback
    assert pruning.sparsity == 0.5


def test_sparsity_does_not_warn_and_both_is_an_error_naming_both():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradualPruning(sparsity=0.5, start_step=0, end_step=10)
    with pytest.raises(ValueError, match="Give `sparsity` \\(the new name of `final_sparsity`\\), not both"):
        GradualPruning(sparsity=0.5, final_sparsity=0.6, start_step=0, end_step=10)
    assert resolve_target(None, 0.7, warn=False) == (0.7, "final_sparsity")
