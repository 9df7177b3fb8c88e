import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmem
from fxmem.graph.capture import Role, capture_step
from tests.graphs_for_tests import DataDependent


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(16)
        self.unused = nn.Linear(2, 2)  # gets no gradient, like many real models' heads

    def forward(self, x, y=None, scale=1.0):
        logits = self.fc2(F.relu(self.bn(self.fc1(x)))) * scale
        return logits if y is None else F.cross_entropy(logits, y)


def inputs():
    torch.manual_seed(0)
    return torch.randn(6, 8), torch.randint(0, 4, (6,))


def test_roles_boundary_and_gradients():
    model = TwoLayer()
    x, y = inputs()
    step = capture_step(model, (x, y))
    roles = step.roles
    assert sorted(step.param_names.values()) == sorted(n for n, _ in model.named_parameters())
    assert sorted(step.buffer_names.values()) == sorted(n for n, _ in model.named_buffers())
    assert sorted(step.input_names.values()) == ["args[0]", "args[1]"]
    assert all(roles[n] is Role.PARAMETER for n in step.param_names)
    assert roles[step.loss_node] is Role.LOSS and not step.is_backward(step.loss_node)
    # every parameter that reaches the loss has a gradient; the unused one has none
    assert sorted(step.grad_of.values()) == ["bn.bias", "bn.weight", "fc1.bias", "fc1.weight",
                                             "fc2.bias", "fc2.weight"]
    assert all(step.is_backward(n) and roles[n] is Role.GRADIENT for n in step.grad_of)
    # forward nodes come before backward nodes, and both exist
    order = [n.name for n in step.gm.graph.nodes if n.op == "call_function"]
    first_bwd = next(i for i, n in enumerate(order) if step.is_backward(n))
    assert all(step.is_backward(n) for n in order[first_bwd:])
    assert step.num_forward_ops > 5 and step.num_backward_ops > 5
    # the BatchNorm keeps eager's in-place update of its running statistics
    targets = {str(n.target) for n in step.gm.graph.nodes if n.op == "call_function"}
    assert "aten.add_.Tensor" in targets  # num_batches_tracked += 1


def test_capture_allocates_nothing_and_leaves_the_model_alone():
    model = TwoLayer()
    x, y = inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = capture_step(model, (x, y))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    vals = [n.meta["val"] for n in step.gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(isinstance(v, torch._subclasses.FakeTensor) for v in vals)


def test_keyword_inputs_and_non_tensor_arguments():
    model = TwoLayer()
    x, y = inputs()
    step = capture_step(model, (x,), {"y": y, "scale": 2.0})
    assert sorted(step.input_names.values()) == ["args[0]", "kwargs['y']"]


class Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 3), kind

    def forward(self, x):
        logits = self.fc(x)
        loss = logits.pow(2).mean()
        if self.kind == "dict":
            return {"loss": loss, "logits": logits}
        if self.kind == "attr":
            return type("Out", (), {"loss": loss, "logits": logits})()
        if self.kind == "tuple":
            return loss, logits
        if self.kind == "none":
            return {"logits": logits}
        if self.kind == "vector":
            return logits.pow(2).mean(0)
        return loss


@pytest.mark.parametrize("kind", ["scalar", "dict", "tuple"])
def test_loss_is_found_in_the_output(kind):
    step = capture_step(Outputs(kind), (torch.randn(5, 4),))
    assert step.roles[step.loss_node] is Role.LOSS
    assert len(step.held_outputs) == (0 if kind == "scalar" else 1)  # the logits are held


def test_loss_attribute_like_hugging_face():
    step = capture_step(Outputs("attr"), (torch.randn(5, 4),))
    assert step.roles[step.loss_node] is Role.LOSS


def test_loss_fn():
    model = TwoLayer()
    x, y = inputs()
    step = capture_step(model, (x,), loss_fn=lambda m, x: F.cross_entropy(m(x), y))
    assert len(step.grad_of) == 6


def test_output_without_loss_is_a_clear_error():
    with pytest.raises(fxmem.StepInputError, match="has no loss"):
        capture_step(Outputs("none"), (torch.randn(5, 4),))


def test_non_scalar_loss_is_a_clear_error():
    with pytest.raises(fxmem.StepInputError, match=r"scalar tensor, got shape \(3,\)"):
        capture_step(Outputs("vector"), (torch.randn(5, 4),))
    with pytest.raises(fxmem.StepInputError, match="scalar"):
        capture_step(TwoLayer(), (torch.randn(6, 8),), loss_fn=lambda m, x: m(x))


def test_inputs_on_another_device_are_a_clear_error():
    model = TwoLayer()
    with pytest.raises(fxmem.StepInputError, match=r"input args\[0\] is on meta but the model is on cpu"):
        capture_step(model, (torch.randn(6, 8, device="meta"), torch.randint(0, 4, (6,))))


def test_frozen_model_is_a_clear_error():
    model = TwoLayer().requires_grad_(False)
    with pytest.raises(fxmem.StepInputError, match="requires_grad"):
        capture_step(model, inputs())


def test_graph_breaks_are_named_with_their_location():
    with pytest.raises(fxmem.CaptureError) as info:
        capture_step(DataDependent(), (torch.randn(3, 4),))
    err = info.value
    assert "cannot capture the training step as one graph" in str(err)
    assert err.graph_breaks, "TorchDynamo should name the break"
    reason, where = err.graph_breaks[0]
    assert "graphs_for_tests.py" in where and "if h.sum() > 0" in where


def test_meta_model_is_captured_without_memory():
    with torch.device("meta"):
        model = TwoLayer()
        x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    step = capture_step(model, (x, y))
    assert step.device.type == "meta" and len(step.grad_of) == 6
