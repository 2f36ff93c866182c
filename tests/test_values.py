"""Every wire value and dtype survives the round trip through a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from client import InterpreterManager, ReplicatedObj

DTYPES = [
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


@pytest.fixture(scope="module")
def echo(daemon: Any, package_dir: Path) -> Any:
    manager = InterpreterManager(daemon.target, timeout=60)
    yield manager.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
    manager.close()


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 100
    if dtype == torch.bool:
        return values > 0
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype)
    return values.to(dtype)


def assert_same_tensor(got: Any, expected: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (3, 0, 2)], ids=str)
def test_tensor_round_trip(echo: ReplicatedObj, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(dtype, shape)
    assert_same_tensor(echo(tensor), tensor)


def test_special_floats_keep_their_bits(echo: ReplicatedObj) -> None:
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    got = echo(tensor)
    assert torch.equal(got.view(torch.int32), tensor.view(torch.int32))


def test_non_contiguous_tensors_are_sent_as_they_read(echo: ReplicatedObj) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for view in (base.t(), base[:, ::2], base[1:3, 2:5], base.expand(2, 4, 6), torch.arange(10)[::3]):
        assert not view.is_contiguous()
        assert_same_tensor(echo(view), view.contiguous())
    complex_view = torch.randn(3, dtype=torch.complex64).conj()
    assert_same_tensor(echo(complex_view), complex_view.resolve_conj())
    negative_view = torch._neg_view(torch.arange(3.0))
    assert_same_tensor(echo(negative_view), -torch.arange(3.0))
    assert_same_tensor(echo(torch.eye(3).to_sparse()), torch.eye(3))
    assert_same_tensor(echo(torch.ones(3, requires_grad=True) * 2), torch.full((3,), 2.0))
    assert_same_tensor(echo(torch.ones(2, 3, dtype=torch.bfloat16).t()), torch.ones(3, 2, dtype=torch.bfloat16))


def test_numpy_arrays_arrive_as_tensors(echo: ReplicatedObj) -> None:
    array = numpy.arange(12, dtype=numpy.int32).reshape(3, 4)[:, ::-1]
    assert_same_tensor(echo(array), torch.tensor(array.copy()))
    assert echo(numpy.float64(2.5)) == 2.5


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**63 - 1,
        3.5,
        -0.0,
        "",
        "héllo ✓ \x00 end",
        b"",
        bytes(range(256)),
        [],
        (),
        {},
        [1, "two", 3.0, None],
        (1, (2, (3, [4]))),
        {"a": 1, 2: "b", "nested": {"list": [(), []], 7: (None,)}},
    ],
    ids=repr,
)
def test_scalar_and_container_round_trip(echo: ReplicatedObj, value: Any) -> None:
    got = echo(value)
    assert got == value
    assert type(got) is type(value)
    assert repr(got) == repr(value)  # same nesting of tuples and lists, same key types


def test_tensors_inside_containers(echo: ReplicatedObj) -> None:
    value = {"x": (torch.ones(2), [torch.zeros(0, dtype=torch.int64)]), 1: torch.tensor(True)}
    got = echo(value)
    assert set(got) == {"x", 1}
    assert isinstance(got["x"], tuple) and isinstance(got["x"][1], list)
    assert_same_tensor(got["x"][0], torch.ones(2))
    assert_same_tensor(got["x"][1][0], torch.zeros(0, dtype=torch.int64))
    assert_same_tensor(got[1], torch.tensor(True))


def test_args_and_kwargs_keep_their_structure(echo: ReplicatedObj) -> None:
    args, kwargs = echo.call_method("pair", 1, (2,), [3], key={"k": (4,)})
    assert args == (1, (2,), [3])
    assert kwargs == {"key": {"k": (4,)}}


def test_large_tensor_round_trip(echo: ReplicatedObj) -> None:
    tensor = torch.arange(5 * 1024 * 1024, dtype=torch.float32)  # 20 MiB: past gRPC's 4 MB default
    result = echo(tensor)
    assert_same_tensor(result, tensor)
    result.mul_(2)  # a large result wraps its received bytes: writing to it must be safe
    assert_same_tensor(echo(tensor), tensor)
    assert torch.equal(result, tensor * 2)
