"""Fixtures that several test modules ask for by name (`pytest.mark.usefixtures`)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: a second thread only adds synchronisation, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
