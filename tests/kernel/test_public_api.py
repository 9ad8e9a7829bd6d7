"""The embedding API and the SDK declare their public names, and they all exist."""

from __future__ import annotations

import kernel
import kernel.sdk


def test_kernel_exports_are_declared_and_importable() -> None:
    assert sorted(kernel.__all__) == sorted(set(kernel.__all__))
    for name in kernel.__all__:
        assert hasattr(kernel, name), name
    public = {n for n in vars(kernel) if not n.startswith("_") and n[0].isupper()}
    # every public class imported into the package is declared
    assert public <= set(kernel.__all__), public - set(kernel.__all__)


def test_sdk_exports_are_declared_and_importable() -> None:
    for name in kernel.sdk.__all__:
        assert hasattr(kernel.sdk, name), name


def test_a_task_with_an_unknown_option_does_not_break_the_import() -> None:
    from kernel.sdk import task

    @task(every="1m", retires=3)  # type: ignore[call-overload]
    def job() -> None: ...

    spec = job.__xcore_task__  # type: ignore[attr-defined]
    assert spec.extra == {"retires": 3}
    assert spec.every == "1m"
