import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


def data_path(*parts: str) -> str:
    return os.path.join(DATA, *parts)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from llamalora.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct Q4_1 as shipped, loaded once for the session."""
    from llamalora.loader import load_model

    return load_model(smollm2_path, progress=False)
