import os

import pytest

# One compiled step for every weight type the suite's models have (llamalora.kernels.dispatch.kinds_mask), rather
# than one per model's set of types: the suite loads a dozen kinds of model, and on an empty cache a step per kind
# doubled its time. Child processes inherit it. test_decode.py and test_kernels.py run the per-model steps users
# get and check them against these.
os.environ.setdefault("LLAMALORA_KERNEL_TYPES", "all")

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
    """(f16, q4_0) files of SmolLM2, made from the shipped Q4_1 as llama.cpp users make them (f16 first, q4_0 from
    it): the seed's f16 model and its quantized copy."""
    from gguf import GGMLQuantizationType as T

    from llamalora.model_file import load_model_file
    from llamalora.quantize import rewrite_model

    folder = tmp_path_factory.mktemp("models")
    f16, q4_0 = str(folder / "f16.gguf"), str(folder / "q4_0.gguf")
    rewrite_model(load_model_file(smollm2_path), f16, T.F16, progress=False)
    rewrite_model(load_model_file(f16), q4_0, T.Q4_0, progress=False)
    return f16, q4_0
