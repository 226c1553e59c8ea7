"""resolve_device: the one device-choosing helper (train, generate, eval, demo)."""

import pytest
import torch

from minidpo.device import resolve_device
from minidpo.errors import ParameterError


def test_no_choice_means_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_unknown_device_names_the_parameter():
    with pytest.raises(ParameterError, match="^device 'tpu': unknown") as e:
        resolve_device("tpu")
    assert e.value.renamed(lambda p: "--" + p).startswith("--device 'tpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(ParameterError, match="CUDA is not available here"):
        resolve_device("cuda:0")
