"""Hostile calls to the compiled CPU ops: autograd around the in-place steer_, memory shared
between its arguments, and alpha / clamp / direction values at the edge of float32."""

import pytest
import torch
from flows import random_inn

import innsteer_ext

ops = torch.ops.innsteer


def _inference_flow(dim: int, **kwargs) -> tuple:
    """Flow arguments that do not require grad (an INN's parameters do)."""

    def detach(a):
        if isinstance(a, list):
            return [t.detach() for t in a]
        return a.detach() if isinstance(a, torch.Tensor) else a

    return tuple(detach(a) for a in random_inn(dim, **kwargs).flow_args())


FLOW = _inference_flow(16)
DIRECTION = torch.randn(16, generator=torch.Generator().manual_seed(3))


def _steered(hidden, residual=None, alpha=1.0, direction=DIRECTION, flow=FLOW):
    """The out-of-place steer of private copies: what steer_ must write."""
    residual = None if residual is None else residual.clone()
    return ops.steer(hidden.clone(), residual, direction.clone(), alpha, *flow)


class TestInPlaceAutograd:
    def test_refuses_a_leaf_that_requires_grad(self):
        leaf = torch.randn(3, 16, requires_grad=True)
        before = leaf.detach().clone()
        with pytest.raises(RuntimeError, match="hidden requires grad"):
            ops.steer_(leaf, None, DIRECTION, 1.0, *FLOW)
        assert torch.equal(leaf.detach(), before)

    def test_refuses_a_view_of_a_leaf_that_requires_grad(self):
        leaf = torch.randn(4, 16, requires_grad=True)
        with pytest.raises(RuntimeError, match="hidden requires grad"):
            ops.steer_(leaf[1:3], None, DIRECTION, 1.0, *FLOW)

    @pytest.mark.parametrize("argument", ["residual", "direction", "w2[1]"])
    def test_refuses_other_arguments_that_require_grad(self, argument):
        mean, scale, cond, trans, w1, b1, w2, b2, clamp = FLOW
        residual, direction = torch.randn(3, 16), DIRECTION.clone()
        if argument == "residual":
            residual.requires_grad_(True)
        elif argument == "direction":
            direction.requires_grad_(True)
        else:
            w2 = [w2[0], w2[1].clone().requires_grad_(True), *w2[2:]]
        with pytest.raises(RuntimeError, match=rf"{argument.replace('[', '.').replace(']', '.')} requires grad"):
            ops.steer_(torch.randn(3, 16), residual, direction, 1.0, mean, scale, cond, trans, w1, b1, w2, b2, clamp)

    def test_runs_under_no_grad_and_inference_mode(self):
        leaf = torch.randn(3, 16, requires_grad=True)
        expected = _steered(leaf.detach())
        with torch.no_grad():
            ops.steer_(leaf, None, DIRECTION, 1.0, *FLOW)
        assert torch.equal(leaf.detach(), expected)
        with torch.inference_mode():
            hidden = torch.randn(3, 16)
            expected = _steered(hidden)
            ops.steer_(hidden, None, DIRECTION, 1.0, *FLOW)
            assert torch.equal(hidden, expected)

    def test_backward_through_a_saved_tensor_that_steer_overwrote_raises(self):
        weight = torch.randn(3, 16, requires_grad=True)
        hidden = torch.randn(3, 16)
        loss = (weight * hidden).sum()  # saves hidden for d loss / d weight
        ops.steer_(hidden, None, DIRECTION, 1.0, *FLOW)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

    def test_steering_a_view_bumps_its_base_version(self):
        weight = torch.randn(4, 16, requires_grad=True)
        base = torch.randn(4, 16)
        loss = (weight * base).sum()
        with torch.inference_mode():  # a normal tensor modified in inference mode is still tracked
            ops.steer_(base[1:3], None, DIRECTION, 1.0, *FLOW)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

    def test_each_call_bumps_the_version_once(self):
        hidden = torch.randn(3, 16).t().contiguous().t()  # also through the non-contiguous path
        for layout in (torch.randn(3, 16), hidden):
            version = layout._version
            ops.steer_(layout, None, DIRECTION, 1.0, *FLOW)
            assert layout._version > version


class TestInPlaceMemory:
    def test_residual_partly_overlapping_hidden_is_refused(self):
        base = torch.randn(40, 16)
        hidden, residual = base[1:], base[:-1]  # row r's residual is row r - 1 of hidden
        with pytest.raises(RuntimeError, match="residual partly overlaps hidden"):
            ops.steer_(hidden, residual, DIRECTION, 0.0, *FLOW)
        with pytest.raises(RuntimeError, match="residual partly overlaps hidden"):
            ops.steer_(base[:-1], base[1:], DIRECTION, 1.0, *FLOW)

    @pytest.mark.parametrize("alpha", [0.0, 1.0])
    def test_residual_that_is_hidden_itself(self, alpha):
        hidden = torch.randn(40, 16)
        expected = _steered(hidden, hidden, alpha)
        ops.steer_(hidden, hidden, DIRECTION, alpha, *FLOW)
        assert torch.equal(hidden, expected)

    def test_residual_sharing_storage_without_overlap_is_fine(self):
        base = torch.randn(80, 16)
        hidden, residual = base[:40], base[40:]
        expected = _steered(hidden, residual)
        ops.steer_(hidden, residual, DIRECTION, 1.0, *FLOW)
        assert torch.equal(hidden, expected)

    def test_expanded_hidden_is_refused(self):
        row = torch.randn(16)
        before = row.clone()
        with pytest.raises(RuntimeError, match="share memory"):
            ops.steer_(row.expand(3, 16), None, DIRECTION, 1.0, *FLOW)
        assert torch.equal(row, before)

    def test_strided_hidden_overlapping_itself_is_refused(self):
        storage = torch.randn(40)
        overlapping = storage.as_strided((3, 16), (2, 1))  # row r starts inside row r - 1
        before = storage.clone()
        with pytest.raises(RuntimeError, match="share memory"):
            ops.steer_(overlapping, None, DIRECTION, 1.0, *FLOW)
        assert torch.equal(storage, before)

    def test_transposed_and_sliced_views_are_accepted(self):
        base = torch.randn(16, 30)
        view = base.t()[::3]  # non-contiguous, no two elements share memory
        expected = _steered(view)
        ops.steer_(view, None, DIRECTION, 1.0, *FLOW)
        assert torch.equal(view, expected)

    def test_direction_inside_hidden_is_refused(self):
        hidden = torch.randn(64, 16)  # several tiles: later ones would read an already steered row 0
        with pytest.raises(RuntimeError, match="direction shares memory with hidden"):
            ops.steer_(hidden, None, hidden[0], 1.0, *FLOW)

    def test_flow_tensor_inside_hidden_is_refused(self):
        mean, *rest = FLOW
        hidden = torch.randn(64, 16)
        with pytest.raises(RuntimeError, match="mean shares memory with hidden"):
            ops.steer_(hidden, None, DIRECTION, 1.0, hidden[5], *rest)


class TestEdgeValues:
    @pytest.mark.parametrize("alpha", [1e39, -3.5e38])
    def test_alpha_beyond_float32(self, alpha):
        for op in (ops.steer, ops.steer_):
            with pytest.raises(RuntimeError, match="alpha must be finite in Float"):
                op(torch.randn(2, 16), None, DIRECTION, alpha, *FLOW)

    def test_float64_activations_take_alpha_beyond_float32(self):
        flow64 = _inference_flow(16)
        flow64 = tuple(
            [t.double() for t in a]
            if isinstance(a, list) and a[0].is_floating_point()
            else a.double()
            if isinstance(a, torch.Tensor)
            else a
            for a in flow64
        )
        hidden = torch.randn(2, 16, dtype=torch.float64)
        out = ops.steer(hidden, None, DIRECTION.double() / 1e20, 1e39, *flow64)
        assert torch.isfinite(out).all()

    def test_alpha_times_direction_overflowing_float32(self):
        direction = DIRECTION.clone()
        direction[3] = 1e9
        with pytest.raises(RuntimeError, match="alpha \\* direction overflows Float"):
            ops.steer(torch.randn(2, 16), None, direction, 1e30, *FLOW)
        ops.steer(torch.randn(2, 16), None, direction, 1e20, *FLOW)  # 1e29: fits

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_direction(self, bad):
        direction = DIRECTION.clone()
        direction[0] = bad
        with pytest.raises(RuntimeError, match="direction contains NaN or Inf"):
            ops.steer(torch.randn(2, 16), None, direction, 1.0, *FLOW)

    @pytest.mark.parametrize("clamp", [3e38, 1e39, innsteer_ext.MAX_CLAMP * 1.01, 1e-300, 0.0, float("nan")])
    def test_clamp_outside_the_bounds(self, clamp):
        *flow, _ = FLOW
        for call in (
            lambda: ops.steer(torch.randn(2, 16), None, DIRECTION, 1.0, *flow, clamp),
            lambda: ops.coupling_forward(torch.randn(2, 16), *flow, clamp),
            lambda: ops.coupling_inverse(torch.randn(2, 16), *flow, clamp),
        ):
            with pytest.raises(RuntimeError, match="clamp must be in"):
                call()

    @pytest.mark.parametrize("clamp", ["MIN_CLAMP", "MAX_CLAMP"])
    def test_clamp_at_the_bounds_gives_finite_steers(self, clamp):
        *flow, _ = _inference_flow(16, strength=30.0)  # pushes the log-scales into the clamp
        hidden = torch.randn(64, 16) * 10
        out = ops.steer(hidden, None, DIRECTION, 1.0, *flow, getattr(innsteer_ext, clamp))
        assert torch.isfinite(out).all()

    def test_float16_result_overflow_is_an_error(self):
        hidden = torch.full((2, 16), 60000.0, dtype=torch.float16)
        with pytest.raises(RuntimeError, match="steer overflowed Half"):
            ops.steer(hidden, hidden.clone(), DIRECTION, 0.0, *FLOW)  # 120000 is beyond float16

    def test_huge_finite_input_overflowing_the_forward_is_an_error(self):
        mean, scale, *rest = FLOW
        x = torch.full((2, 16), 3e38)
        with pytest.raises(RuntimeError, match="coupling_forward overflowed Float"):
            ops.coupling_forward(x, mean, scale * 1e-3, *rest)


class TestSavedInputs:
    @pytest.mark.parametrize("op", ["coupling_forward", "coupling_inverse", "steer"])
    def test_backward_after_an_input_changed_in_place_raises(self, op):
        x = torch.randn(3, 16, requires_grad=True)
        args = (x, *FLOW) if op != "steer" else (x, None, DIRECTION, 1.0, *FLOW)
        out = getattr(ops, op)(*args)
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            x.mul_(2)  # the backward would differentiate at the new x
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()

    def test_backward_after_a_flow_weight_changed_in_place_raises(self):
        mean, scale, cond, trans, w1, b1, w2, b2, clamp = FLOW
        weight = w2[2].clone()
        x = torch.randn(3, 16, requires_grad=True)
        z, _ = ops.coupling_forward(x, mean, scale, cond, trans, w1, b1, [*w2[:2], weight, w2[3]], b2, clamp)
        weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


class TestTypedWrappers:
    def test_flow_params_name_the_op_arguments(self):
        flow = innsteer_ext.FlowParams(*FLOW)
        assert flow.clamp == FLOW[-1] and flow.w2 is FLOW[6] and flow.mean is FLOW[0]

    def test_wrappers_equal_the_ops(self):
        flow = innsteer_ext.FlowParams(*FLOW)
        x, residual = torch.randn(5, 16), torch.randn(5, 16)
        z, logdet = innsteer_ext.coupling_forward(x, flow)
        expected_z, expected_logdet = ops.coupling_forward(x, *FLOW)
        assert torch.equal(z, expected_z) and torch.equal(logdet, expected_logdet)
        assert torch.equal(innsteer_ext.coupling_inverse(z, flow), ops.coupling_inverse(z, *FLOW))
        steered = innsteer_ext.steer(x, residual, DIRECTION, 0.8, flow)
        assert torch.equal(steered, ops.steer(x, residual, DIRECTION, 0.8, *FLOW))
        hidden = x.clone()
        assert innsteer_ext.steer_(hidden, residual, DIRECTION, 0.8, flow) is hidden
        assert torch.equal(hidden, steered)
