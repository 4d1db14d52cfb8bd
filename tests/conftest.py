from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "thorough", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(params=["native", "python"])
def each_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per write engine, child processes included (they inherit the variable).

    Where a C compiler is found the native engine must have been built: a missing one fails here
    rather than passing as a skip.
    """
    from tensorsink.engine import ENGINE_VARIABLE, available_engines

    name: str = request.param
    if name not in available_engines():
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("the native engine was not built although a C compiler is here; reinstall")
        pytest.skip("the native engine was not built here (no C compiler)")
    monkeypatch.setenv(ENGINE_VARIABLE, name)
    return name
