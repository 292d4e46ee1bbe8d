import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


def data_path(*parts: str) -> str:
    return os.path.join(DATA, *parts)


def rewritten(src: str, dst, metadata_update=None, drop=()) -> str:
    """A copy of the model file src at dst with some metadata changed and some tensors left out."""
    from llamalora.model_file import load_model_file
    from llamalora.model_writer import write_gguf

    f = load_model_file(src)
    metadata = {**f.metadata, **(metadata_update or {})}
    tensors = [t for name, t in f.tensors.items() if name not in drop]
    return write_gguf(str(dst), metadata, tensors, f.metadata_types)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from llamalora.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct Q4_1 as shipped, loaded once for the session."""
    from llamalora.loader import load_model

    return load_model(smollm2_path, progress=False)


@pytest.fixture(scope="session")
def smollm2_f16_q4_0(tmp_path_factory, smollm2_path):
    """SmolLM2 as f16 and as q4_0 requantized from that f16 (llama.cpp's way to make a q4_0), made once."""
    from gguf import GGMLQuantizationType as T

    from llamalora.model_file import load_model_file
    from llamalora.quantize import rewrite_model

    folder = tmp_path_factory.mktemp("smollm2-requantized")
    f16, q4_0 = str(folder / "f16.gguf"), str(folder / "q4_0.gguf")
    rewrite_model(load_model_file(smollm2_path), f16, T.F16, progress=False)
    rewrite_model(load_model_file(f16), q4_0, T.Q4_0, progress=False)
    return f16, q4_0
