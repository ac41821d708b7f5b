"""FlatBuffer: views into one flat tensor, parameter binding, dtype grouping. No MPI calls."""

from __future__ import annotations

import pytest
import torch

from gossip.ops.flat import FlatBuffer, group_by_dtype_and_device


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 1, 2, generator=g)]


def test_flat_holds_the_tensors_back_to_back() -> None:
    ts = tensors()
    expected = torch.cat([t.reshape(-1) for t in ts])
    buf = FlatBuffer(ts, bind=False)
    assert buf.flat.shape == (12 + 5 + 4,) and buf.flat.dtype == torch.float32 and buf.flat.is_contiguous()
    assert buf.offsets == [0, 12, 17, 21]
    assert [tuple(s) for s in buf.shapes] == [(3, 4), (5,), (2, 1, 2)]
    assert len(buf) == 3
    torch.testing.assert_close(buf.flat, expected, rtol=0, atol=0)
    for view, t in zip(buf.views, ts, strict=True):
        assert view.shape == t.shape
        torch.testing.assert_close(view, t, rtol=0, atol=0)


def test_views_alias_the_flat_tensor() -> None:
    buf = FlatBuffer(tensors(), bind=False)
    for k, view in enumerate(buf.views):
        assert storage_of(view) == storage_of(buf.flat)
        assert view.data_ptr() == buf.flat.data_ptr() + buf.offsets[k] * buf.flat.element_size()
    buf.flat.fill_(2.0)
    assert all(bool((v == 2.0).all()) for v in buf.views)
    buf.views[1][3] = -7.0
    assert buf.flat[12 + 3].item() == -7.0
    buf.views[0].mul_(0.5)
    assert bool((buf.flat[:12] == 1.0).all()) and bool((buf.flat[12:] != 1.0).any())


def test_bind_false_leaves_the_tensors_alone() -> None:
    ts = tensors()
    before = [t.clone() for t in ts]
    pointers = [t.data_ptr() for t in ts]
    buf = FlatBuffer(ts, bind=False)
    buf.flat.zero_()
    for t, b, ptr in zip(ts, before, pointers, strict=True):
        assert t.data_ptr() == ptr
        torch.testing.assert_close(t, b, rtol=0, atol=0)


def test_non_contiguous_input_is_copied_in_logical_order() -> None:
    t = torch.arange(6.0).reshape(2, 3).t()  # (3, 2), not contiguous
    buf = FlatBuffer([t], bind=True)
    torch.testing.assert_close(buf.flat, torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0, 5.0]), rtol=0, atol=0)
    assert t.is_contiguous() and storage_of(t) == storage_of(buf.flat)


def test_bind_repoints_module_parameters() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    values = [p.detach().clone() for p in layer.parameters()]
    params = list(layer.parameters())
    buf = FlatBuffer(params)  # bind=True is the default
    assert list(layer.parameters()) == params  # same Parameter objects, new storage
    for p, view, value in zip(layer.parameters(), buf.views, values, strict=True):
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert p.data_ptr() == view.data_ptr() and storage_of(p) == storage_of(buf.flat)
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)

    buf.flat.fill_(0.25)  # flat -> parameters
    assert bool((layer.weight == 0.25).all()) and bool((layer.bias == 0.25).all())
    with torch.no_grad():  # parameters -> flat
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.weight[1, 2] = -1.0
    torch.testing.assert_close(buf.flat[12:], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
    assert buf.flat[1 * 4 + 2].item() == -1.0


def test_autograd_and_optimizer_after_binding() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    buf = FlatBuffer(list(layer.parameters()))
    x = torch.randn(5, 4)

    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, q.grad)
    # and by hand: d/dW sum((xW^T + b)^2) = 2 (xW^T + b)^T x, d/db = 2 sum_rows(xW^T + b)
    with torch.no_grad():
        y = x @ reference.weight.t() + reference.bias
    torch.testing.assert_close(layer.weight.grad, 2 * y.t() @ x)
    torch.testing.assert_close(layer.bias.grad, 2 * y.sum(0))

    # an optimizer updating the parameters one by one updates the flat buffer
    for foreach in (False, True):
        before = buf.flat.clone()
        torch.optim.SGD(layer.parameters(), lr=0.1, foreach=foreach).step()
        expected = before - 0.1 * torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
        torch.testing.assert_close(buf.flat, expected)
    assert all(storage_of(p) == storage_of(buf.flat) for p in layer.parameters())


def test_gradients_fuse_with_copy_from() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(2, 4)).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    buf = FlatBuffer(grads, bind=False)
    buf.flat.zero_()
    buf.copy_from(grads)
    torch.testing.assert_close(buf.flat, torch.cat([g.reshape(-1) for g in grads]), rtol=0, atol=0)
    assert all(storage_of(g) != storage_of(buf.flat) for g in grads)  # copy_from copies, never binds


def test_copy_from_checks_length() -> None:
    ts = tensors()
    buf = FlatBuffer(ts, bind=False)
    with pytest.raises(ValueError, match="expected 3 tensors, got 2"):
        buf.copy_from(ts[:2])
    with pytest.raises(ValueError, match="expected 3 tensors, got 4"):
        buf.copy_from([*ts, ts[0]])


def test_copy_from_checks_shapes_instead_of_broadcasting() -> None:
    ts = tensors()
    buf = FlatBuffer(ts, bind=False)
    before = buf.flat.clone()
    wrong = [torch.tensor(5.0), *ts[1:]]
    with pytest.raises(ValueError, match="tensor 0 has shape"):
        buf.copy_from(wrong)
    assert torch.equal(buf.flat, before)


def test_mixed_dtypes_raise() -> None:
    with pytest.raises(ValueError, match="tensor 1 is torch.float64"):
        FlatBuffer([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="tensor 2 is torch.float16"):
        FlatBuffer([torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.float16)], bind=False)


def test_empty_raises() -> None:
    with pytest.raises(ValueError):
        FlatBuffer([])


def test_group_by_dtype_and_device_keeps_order() -> None:
    a, b, c, d = torch.zeros(1), torch.zeros(2, dtype=torch.float64), torch.zeros(3), torch.zeros(4, dtype=torch.int64)
    groups = group_by_dtype_and_device([a, b, c, d])
    assert [[t.numel() for t in g] for g in groups] == [[1, 3], [2], [4]]
    assert groups[0][0] is a and groups[0][1] is c


class MixedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(3, 2)  # float32: 6 + 2
        self.second = torch.nn.Linear(2, 2).double()  # float64: 4 + 2
        self.third = torch.nn.Linear(2, 1)  # float32: 2 + 1


def test_for_module_groups_by_dtype() -> None:
    torch.manual_seed(0)
    model = MixedModel()
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = FlatBuffer.for_module(model)
    assert [b.flat.dtype for b in buffers] == [torch.float32, torch.float64]
    assert [b.flat.numel() for b in buffers] == [6 + 2 + 2 + 1, 4 + 2]
    assert [len(b) for b in buffers] == [4, 2]
    float_params = [model.first.weight, model.first.bias, model.third.weight, model.third.bias]
    double_params = [model.second.weight, model.second.bias]
    for buf, params in zip(buffers, (float_params, double_params), strict=True):
        for p, view in zip(params, buf.views, strict=True):
            assert p.data_ptr() == view.data_ptr()  # bound, in module order
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=0)
    buffers[1].flat.fill_(3.0)
    assert bool((model.second.weight == 3.0).all()) and not bool((model.first.weight == 3.0).any())


def test_for_module_without_binding() -> None:
    model = MixedModel()
    pointers = [p.data_ptr() for p in model.parameters()]
    buffers = FlatBuffer.for_module(model, bind=False)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert sum(b.flat.numel() for b in buffers) == sum(p.numel() for p in model.parameters())
