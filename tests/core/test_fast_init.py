"""``dsc_core.fast_init`` (issue 20): the cheaper ``__init__`` of the per-request frozen
dataclasses builds the same instances as the dataclass's own, and they stay frozen."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from dsc_core.fast_init import fast_init


@dataclass(frozen=True, slots=True)
class Plain:
    name: str
    size: int = 3
    tags: tuple[str, ...] = field(default=())
    items: list[int] = field(default_factory=list)
    hidden: str = field(default="h", init=False)
    flag: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("negative size")


@fast_init
@dataclass(frozen=True, slots=True)
class Fast:
    name: str
    size: int = 3
    tags: tuple[str, ...] = field(default=())
    items: list[int] = field(default_factory=list)
    hidden: str = field(default="h", init=False)
    flag: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("negative size")


def fields_of(obj: object) -> tuple[object, ...]:
    return dataclasses.astuple(obj)  # type: ignore[call-overload, no-any-return]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("a",), {}),
        (("a", 5), {}),
        (("a", 5, ("x",), [1]), {"flag": True}),
        ((), {"name": "b", "items": [2, 3], "flag": True}),
    ],
)
def test_the_same_instance_as_the_dataclass_builds(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    fast, plain = Fast(*args, **kwargs), Plain(*args, **kwargs)  # type: ignore[arg-type]
    assert fields_of(fast) == fields_of(plain)
    assert fast == Fast(*args, **kwargs) and hash(fast.name) == hash(plain.name)  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(fast)) == fast
    assert dataclasses.replace(fast, size=9).size == 9


def test_defaults_are_fresh_and_post_init_runs() -> None:
    assert Fast("a").items is not Fast("a").items  # a default_factory per instance
    with pytest.raises(ValueError, match="negative size"):
        Fast("a", -1)
    with pytest.raises(TypeError):
        Fast("a", 1, (), [], True)  # type: ignore[misc]  # flag is keyword-only
    with pytest.raises(TypeError):
        Fast()  # type: ignore[call-arg]


def test_instances_stay_frozen() -> None:
    fast = Fast("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.name = "b"  # type: ignore[misc]


def test_only_frozen_slotted_dataclasses() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        name: str

    @dataclass(slots=True)
    class NotFrozen:
        name: str

    for cls in (NoSlots, NotFrozen, int):
        with pytest.raises(TypeError, match="frozen dataclass with slots"):
            fast_init(cls)
