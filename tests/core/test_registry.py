import pytest

from pat_callbacks.core.criteria import CRITERIA, Criterion, get_criterion
from pat_callbacks.core.registry import Registry, UnknownNameError
from pat_callbacks.core.schedules import SCHEDULES, register_schedule
from pat_callbacks.structured.importance import STRUCTURED_IMPORTANCES, get_structured_importance


def test_unknown_name_is_a_value_error_listing_the_names_and_a_key_error():
    registry = Registry("colour")
    registry.register("#f00", name="red")
    with pytest.raises(ValueError, match=r"Unknown `colour` 'blue'; expected one of: 'red'"):
        registry["blue"]
    with pytest.raises(KeyError):
        registry["blue"]
    assert registry.get("blue") is None and "blue" not in registry
    with pytest.raises(UnknownNameError):
        del registry["blue"]


def test_duplicates_are_refused_unless_replaced():
    registry = Registry("colour")
    registry.register("#f00", name="red")
    with pytest.raises(ValueError, match="'red' is already registered"):
        registry.register("#e00", name="red")
    registry.register("#e00", name="red", replace=True)
    assert registry["red"] == "#e00"
    registry["red"] = "#d00"  # item assignment is an explicit replacement, as for a dict
    assert registry.names() == ["red"] and registry["red"] == "#d00"


def test_decorator_forms_return_the_object_unchanged():
    registry = Registry("thing")

    @registry.register
    class Named:
        name = "named"

    @registry.register("renamed")
    def function():
        return 1

    assert Named.name == "named" and function() == 1
    assert registry.names() == ["named", "renamed"] and registry["renamed"] is function
    with pytest.raises(ValueError, match="Expected a `name` to register"):
        registry.register(object())
    with pytest.raises(TypeError, match="declares no needs"):
        registry.register(function, name="other", needs_scores=True)


def test_base_class_is_enforced():
    with pytest.raises(TypeError, match="Expected a subclass of Criterion"):
        CRITERIA.register(int, name="int")


def test_every_extension_point_is_a_registry_and_old_names_keep_working():
    for registry in (CRITERIA, SCHEDULES, STRUCTURED_IMPORTANCES):
        assert isinstance(registry, Registry)
    assert CRITERIA["magnitude"]().name == "magnitude" and "taylor" in CRITERIA
    with pytest.raises(ValueError, match="Unknown `criterion` 'magnitud'"):
        get_criterion("magnitud")
    with pytest.raises(ValueError, match="'cubic' is already registered"):
        register_schedule(SCHEDULES["cubic"])
    with pytest.warns(DeprecationWarning, match="importance='taylor' is now called 'group_taylor'"):
        assert get_structured_importance("taylor").name == "group_taylor"


def test_a_criterion_registered_from_user_code_is_found_by_name():
    @CRITERIA.register
    class Squared(Criterion):
        name = "squared_test"

        def score(self, param, grad, state):
            return param.detach() ** 2

    try:
        assert isinstance(get_criterion("squared_test"), Squared)
    finally:
        del CRITERIA["squared_test"]
    assert "squared_test" not in CRITERIA
