"""Helpers shared by the PET tests."""
import copy

import pytest
import torch


def frozen_copy(model):
    # Freezing changes nn.MultiheadAttention's CPU kernel choice (a ~1e-7 difference), so the
    # reference is computed with frozen parameters as well.
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def randomize(handle, std=0.2, seed=3):
    """Give every PET parameter random values, so nothing is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.pet_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (badly so on a busy machine).
    Import it into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_config(method: str, heads=None, gate_rank=None, **fields):
    """``pet_config(method, **fields)`` for tests that run every method: VL-PET's own fields
    (``heads``, ``gate_rank``) go only to the VL-PET methods, which have them."""
    from skipkernels.pet import pet_config
    if method.startswith("vlpet"):
        fields.update({k: v for k, v in (("heads", heads), ("gate_rank", gate_rank)) if v is not None})
    return pet_config(method, **fields)


def assert_only_pet_parameters_got_gradients(model, handle):
    """After a backward: every PET parameter has a nonzero gradient; every other parameter is
    frozen and has none."""
    pet = {id(p) for p in handle.pet_parameters()}
    for name, p in model.named_parameters():
        if id(p) in pet:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
