"""The compiled CPU ops against the float64 pure-PyTorch reference, plus opcheck, gradcheck,
log-det vs the autograd Jacobian, exactness properties and input validation."""

import pytest
import torch
from flows import as_float64, random_inn, rel_err

import innsteer
import innsteer_ext
from innsteer_ext import reference

ops = torch.ops.innsteer

# The CPU op runs rows in 8-row tiles below BLAS_MIN_ROWS (BLAS_MIN_ROWS_BF16_WEIGHTS with bfloat16
# weights) and each coupling layer as one GEMM over chunks of BLAS_CHUNK_ROWS rows from it on
# (csrc/cpu/flow_blas_cpu.h).
BLAS_MIN_ROWS = 32
BLAS_MIN_ROWS_BF16_WEIGHTS = 48
BLAS_CHUNK_ROWS = 256

CASES = [  # (dim, hidden, tokens)
    (3, 16, 1),
    (7, 32, 5),
    (576, 512, 1),
    (576, 512, 8),
    (576, 512, BLAS_MIN_ROWS - 1),
    (576, 512, BLAS_MIN_ROWS),
    (576, 512, 64),
    (576, 64, 512),
    (7, 32, 100),  # odd dims (3 + 4 split) on the BLAS path
    (577, 96, 2 * BLAS_CHUNK_ROWS + 37),  # odd dims, two full chunks and a partial one
    (4096, 512, 1),
    (4096, 512, 8),
    (4096, 128, 512),
]


def _activations(dim, tokens, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, dim, generator=generator) * 2 + 0.5).to(dtype)


@pytest.mark.parametrize("dim,hidden,tokens", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_match_float64_reference(dim, hidden, tokens, dtype):
    inn = random_inn(dim, mlp_hidden=hidden)
    flow, flow64 = inn.flow_args(), as_float64(inn.flow_args())
    x = _activations(dim, tokens, dtype)
    x64 = x.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    z, logdet = ops.coupling_forward(x, *flow)
    z64, logdet64 = reference.coupling_forward(x64, *flow64)
    assert z.dtype == dtype and z.shape == x.shape and logdet.shape == (tokens,)
    assert rel_err(z, z64) < tol
    assert rel_err(logdet, logdet64) < 1e-5

    x_back = ops.coupling_inverse(z64.to(dtype), *flow)
    assert rel_err(x_back, reference.coupling_inverse(z64.to(dtype).double(), *flow64)) < tol

    direction = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    steered = ops.steer(x, None, direction, 1.5, *flow)
    expected = reference.steer(x64, None, direction.double(), 1.5, *flow64)
    assert steered.dtype == dtype
    assert rel_err(steered, expected) < tol


@pytest.mark.parametrize("tokens", [8, 100])
def test_bfloat16_weights_match_reference_with_rounded_weights(tokens):
    inn = random_inn(576, mlp_hidden=256)
    flow_bf16 = inn.flow_args(weight_dtype=torch.bfloat16)
    x = _activations(576, tokens, torch.float32)
    direction = torch.randn(576)
    steered = ops.steer(x, None, direction, 1.0, *flow_bf16)
    expected = reference.steer(x.double(), None, direction.double(), 1.0, *as_float64(flow_bf16))
    assert rel_err(steered, expected) < 1e-5


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float16])
def test_bfloat16_weights_with_16_bit_activations_on_the_blas_path(activations):
    inn = random_inn(96, mlp_hidden=48)
    flow_bf16 = inn.flow_args(weight_dtype=torch.bfloat16)
    x = _activations(96, 3 * BLAS_MIN_ROWS, activations)
    residual = _activations(96, 3 * BLAS_MIN_ROWS, activations, seed=5)
    direction = torch.randn(96)
    steered = ops.steer(x, residual, direction, 0.9, *flow_bf16)
    expected = reference.steer(x.double(), residual.double(), direction.double(), 0.9, *as_float64(flow_bf16))
    assert steered.dtype == activations
    assert rel_err(steered, expected) < 1e-2


@pytest.mark.parametrize("tokens", [5, BLAS_MIN_ROWS, BLAS_CHUNK_ROWS + 3])
def test_float64_ops_equal_the_reference_to_float64_precision(tokens):
    inn = random_inn(37, mlp_hidden=24, strength=1.0).double()
    flow = inn.flow_args()
    x = torch.randn(tokens, 37, dtype=torch.float64)
    z, logdet = ops.coupling_forward(x, *flow)
    z_ref, logdet_ref = reference.coupling_forward(x, *flow)
    assert rel_err(z, z_ref) < 1e-12 and rel_err(logdet, logdet_ref) < 1e-12
    assert rel_err(ops.coupling_inverse(z, *flow), reference.coupling_inverse(z, *flow)) < 1e-12
    direction = torch.randn(37, dtype=torch.float64)
    residual = torch.randn_like(x)
    steered = ops.steer(x, residual, direction, 1.3, *flow)
    assert rel_err(steered, reference.steer(x, residual, direction, 1.3, *flow)) < 1e-12


def _gemm_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::addmm")


def _blas_chunks(rows: int) -> int:
    """Each thread takes a contiguous share of the rows, in chunks of at most BLAS_CHUNK_ROWS."""
    chunk = min(BLAS_CHUNK_ROWS, -(-rows // torch.get_num_threads()))
    return -(-rows // chunk)


@pytest.mark.parametrize("op_name", ["coupling_forward", "coupling_inverse", "steer"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_the_op_runs_each_layer_as_one_gemm_per_chunk_from_the_threshold_on(op_name, threads, weight_dtype):
    inn = random_inn(40, num_couplings=3)
    flow = inn.flow_args(weight_dtype=weight_dtype)
    direction = torch.randn(40)
    threshold = BLAS_MIN_ROWS if weight_dtype == torch.float32 else BLAS_MIN_ROWS_BF16_WEIGHTS

    def call(tokens):
        x = torch.randn(tokens, 40)
        if op_name == "steer":
            return lambda: ops.steer(x, None, direction, 1.0, *flow)
        return lambda: getattr(ops, op_name)(x, *flow)

    passes = 2 if op_name == "steer" else 1  # phi and phi^-1
    # two GEMMs per coupling, but a steer's phi^-1 reuses the last coupling's first-layer product
    layers = 2 * 3 * passes - (op_name == "steer")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _gemm_calls(call(threshold - 1)) == 0
        for rows in (threshold, 2 * BLAS_CHUNK_ROWS + 1):
            assert _gemm_calls(call(rows)) == _blas_chunks(rows) * layers
    finally:
        torch.set_num_threads(previous)


def test_leading_dimensions_are_preserved():
    inn = random_inn(10)
    x = torch.randn(2, 3, 10)
    z, logdet = ops.coupling_forward(x, *inn.flow_args())
    assert z.shape == (2, 3, 10) and logdet.shape == (2, 3)
    z_flat, logdet_flat = ops.coupling_forward(x.reshape(6, 10), *inn.flow_args())
    assert torch.equal(z.reshape(6, 10), z_flat) and torch.equal(logdet.reshape(6), logdet_flat)


@pytest.mark.parametrize("dim", [4, 5])
def test_logdet_equals_slogdet_of_autograd_jacobian(dim):
    inn = random_inn(dim, mlp_hidden=8, strength=1.0).double()
    x = torch.randn(3, dim, dtype=torch.float64)
    _, logdet = ops.coupling_forward(x, *inn.flow_args())
    for row in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: ops.coupling_forward(v, *inn.flow_args())[0], x[row])
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        torch.testing.assert_close(logdet[row], logabsdet, rtol=1e-10, atol=1e-10)


def _float64_inputs(dim=5, mlp_hidden=6, tokens=3):
    inn = random_inn(dim, mlp_hidden=mlp_hidden, num_couplings=2, strength=1.0).double()
    mean, scale, cond, trans, w1, b1, w2, b2, clamp = inn.flow_args()
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    flow = (
        leaf(mean),
        leaf(scale),
        cond,
        trans,
        [leaf(w) for w in w1],
        [leaf(b) for b in b1],
        [leaf(w) for w in w2],
        [leaf(b) for b in b2],
        clamp,
    )
    return x, flow


def test_gradcheck_forward_inverse_steer():
    x, flow = _float64_inputs()
    mean, scale, cond, trans, w1, b1, w2, b2, clamp = flow

    def forward(x, mean, scale, w1a, w1b, b1a, w2a, b2b):
        return ops.coupling_forward(
            x, mean, scale, cond, trans, [w1a, w1b], [b1a, b1[1]], [w2a, w2[1]], [b2[0], b2b], clamp
        )

    assert torch.autograd.gradcheck(forward, (x, mean, scale, w1[0], w1[1], b1[0], w2[0], b2[1]))

    def inverse(z, w1a, w2b, b2a):
        return ops.coupling_inverse(z, mean, scale, cond, trans, [w1a, w1[1]], b1, [w2[0], w2b], [b2a, b2[1]], clamp)

    assert torch.autograd.gradcheck(inverse, (x, w1[0], w2[1], b2[0]))

    residual = torch.randn_like(x, requires_grad=True)
    direction = torch.randn(x.shape[-1], dtype=torch.float64, requires_grad=True)

    def steer(h, residual, direction, w2a):
        return ops.steer(h, residual, direction, 0.7, mean, scale, cond, trans, w1, b1, [w2a, w2[1]], b2, clamp)

    assert torch.autograd.gradcheck(steer, (x, residual, direction, w2[0]))


def test_opcheck_every_op():
    x, flow = _float64_inputs()
    direction = torch.randn(x.shape[-1], dtype=torch.float64)
    residual = torch.randn_like(x)
    torch.library.opcheck(ops.coupling_forward, (x, *flow))
    torch.library.opcheck(ops.coupling_inverse, (x, *flow))
    torch.library.opcheck(ops.steer, (x, residual, direction, 0.5, *flow))
    torch.library.opcheck(ops.steer, (x, None, direction, 0.0, *flow))
    inn = random_inn(8).requires_grad_(False)  # steer_ refuses arguments that require grad under grad mode
    hidden = torch.randn(4, 8)
    torch.library.opcheck(ops.steer_, (hidden, torch.randn(4, 8), torch.randn(8), 0.5, *inn.flow_args()))
    torch.library.opcheck(ops.coupling_forward, (hidden.bfloat16(), *inn.flow_args()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tokens", [16, 2 * BLAS_MIN_ROWS])
def test_round_trip_with_massive_activation_rows(seed, tokens):
    dim = 576
    inn = random_inn(dim, mlp_hidden=128, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    inn.fit_standardization(torch.randn(64, dim, generator=generator))
    x = torch.randn(tokens, dim, generator=generator)
    x[0] *= 100  # LLMs have rows like this (e.g. the first token)
    x[7] *= 100
    z, _ = ops.coupling_forward(x, *inn.flow_args())
    back = ops.coupling_inverse(z, *inn.flow_args())
    for row in range(tokens):
        assert rel_err(back[row], x[row]) <= 1e-5, row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [9, 2 * BLAS_MIN_ROWS])
def test_alpha_zero_is_exact_identity(dtype, tokens):
    inn = random_inn(64)
    h = torch.randn(tokens, 64).to(dtype)
    residual = torch.randn(tokens, 64).to(dtype)
    assert torch.equal(ops.steer(h, None, torch.randn(64), 0.0, *inn.flow_args()), h)
    assert torch.equal(ops.steer(h, residual, torch.randn(64), 0.0, *inn.flow_args()), h + residual)


def test_steer_is_nonlinear():
    inn = random_inn(32, strength=1.0)
    direction = torch.randn(32)
    h = torch.randn(6, 32)
    displacement = ops.steer(h, None, direction, 1.0, *inn.flow_args()) - h
    spread = (displacement - displacement.mean(0)).norm(dim=-1) / displacement.norm(dim=-1)
    assert spread.min() > 1e-2  # a linear steer adds the same vector to every row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 3 * BLAS_MIN_ROWS])
def test_residual_fusion_equals_add_then_steer(dtype, tokens):
    inn = random_inn(96)
    direction = torch.randn(96)
    h, residual = torch.randn(tokens, 96).to(dtype), torch.randn(tokens, 96).to(dtype)
    fused = ops.steer(h, residual, direction, 0.8, *inn.flow_args())
    assert torch.equal(fused, ops.steer(h + residual, None, direction, 0.8, *inn.flow_args()))
    expected = reference.steer(h.double(), residual.double(), direction.double(), 0.8, *as_float64(inn.flow_args()))
    assert rel_err(fused, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("tokens", [7, BLAS_CHUNK_ROWS + 9])
def test_in_place_equals_out_of_place(contiguous, with_residual, tokens):
    inn = random_inn(48)
    direction = torch.randn(48)
    base = torch.randn(48, tokens) if not contiguous else torch.randn(tokens, 48)
    h = base.t() if not contiguous else base
    residual = torch.randn(tokens, 48) if with_residual else None
    expected = ops.steer(h, residual, direction, 1.2, *inn.flow_args())
    inplace = h.clone() if contiguous else torch.randn(48, tokens).t().copy_(h)
    assert inplace.is_contiguous() == contiguous
    with torch.no_grad():
        ops.steer_(inplace, residual, direction, 1.2, *inn.flow_args())
    assert torch.equal(inplace, expected)
    reference_steer = reference.steer(
        h.double(),
        None if residual is None else residual.double(),
        direction.double(),
        1.2,
        *as_float64(inn.flow_args()),
    )
    assert rel_err(inplace, reference_steer) < 1e-5


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_blas_path_under_inference_mode_no_grad_and_grad(mode):
    inn = random_inn(48).requires_grad_(False)
    direction = torch.randn(48)
    h = torch.randn(2 * BLAS_CHUNK_ROWS + 5, 48)
    expected = reference.steer(h.double(), None, direction.double(), 0.6, *as_float64(inn.flow_args()))
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with context():
        steered = ops.steer(h, None, direction, 0.6, *inn.flow_args())
        hidden = h.clone()
        if mode != "grad":
            ops.steer_(hidden, None, direction, 0.6, *inn.flow_args())
            assert rel_err(hidden, expected) < 1e-5
        z, _ = ops.coupling_forward(h, *inn.flow_args())
    assert rel_err(steered, expected) < 1e-5
    assert rel_err(z, reference.coupling_forward(h.double(), *as_float64(inn.flow_args()))[0]) < 1e-5


def test_in_place_with_residual_that_is_hidden_itself_on_the_blas_path():
    inn = random_inn(48)
    direction = torch.randn(48)
    h = torch.randn(3 * BLAS_MIN_ROWS, 48)
    expected = reference.steer(h.double(), h.double(), direction.double(), 0.7, *as_float64(inn.flow_args()))
    with torch.no_grad():
        ops.steer_(h, h, direction, 0.7, *inn.flow_args())
    assert rel_err(h, expected) < 1e-5


def test_torch_compile_traces_through_the_op():
    steerer = innsteer.INNSteerer(random_inn(40), torch.randn(40), layer=0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(40, 40)
            self.steerer = steerer

        def forward(self, x):
            return self.steerer(self.proj(x), 0.9, residual=x)

    block = Block()
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


class TestBadInput:
    inn = random_inn(16)
    flow = inn.flow_args()

    def test_wrong_hidden_size(self):
        with pytest.raises(RuntimeError, match="hidden size 15 but the flow was built for hidden size 16"):
            ops.steer(torch.randn(2, 15), None, torch.randn(16), 1.0, *self.flow)

    def test_wrong_dtype(self):
        with pytest.raises(RuntimeError, match="must be float32, bfloat16, float16 or float64"):
            ops.coupling_forward(torch.ones(2, 16, dtype=torch.int32), *self.flow)

    def test_float64_activations_need_float64_parameters(self):
        with pytest.raises(RuntimeError, match="mean has dtype Float, expected Double"):
            ops.coupling_forward(torch.randn(2, 16, dtype=torch.float64), *self.flow)

    def test_wrong_device(self):
        mean, *rest = self.flow
        with pytest.raises(RuntimeError, match="mean is on meta"):
            ops.coupling_forward(torch.randn(2, 16), mean.to("meta"), *rest)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_activations(self, bad):
        h = torch.randn(3, 16)
        h[1, 4] = bad
        with pytest.raises(RuntimeError, match="hidden contains NaN or Inf"):
            ops.steer(h, None, torch.randn(16), 1.0, *self.flow)
        residual = torch.zeros(3, 16)
        residual[2, 0] = bad
        with pytest.raises(RuntimeError, match="residual contains NaN or Inf"), torch.no_grad():
            ops.steer_(torch.randn(3, 16), residual, torch.randn(16), 1.0, *self.flow)

    def test_residual_shape_mismatch(self):
        with pytest.raises(RuntimeError, match="residual has shape"):
            ops.steer(torch.randn(3, 16), torch.randn(2, 16), torch.randn(16), 1.0, *self.flow)

    def test_direction_shape(self):
        with pytest.raises(RuntimeError, match="direction has shape"):
            ops.steer(torch.randn(3, 16), None, torch.randn(17), 1.0, *self.flow)

    def test_index_outside_row_and_duplicates(self):
        mean, scale, cond, trans, *rest = self.flow
        bad = [c.clone() for c in cond]
        bad[1][0] = 16
        with pytest.raises(RuntimeError, match="index 16 is outside"):
            ops.coupling_forward(torch.randn(2, 16), mean, scale, bad, trans, *rest)
        bad[1][0] = bad[1][1]
        with pytest.raises(RuntimeError, match="twice"):
            ops.coupling_forward(torch.randn(2, 16), mean, scale, bad, trans, *rest)

    def test_mismatched_coupling_lists(self):
        mean, scale, cond, trans, w1, *rest = self.flow
        with pytest.raises(RuntimeError, match="same number of couplings"):
            ops.coupling_forward(torch.randn(2, 16), mean, scale, cond, trans, w1[:3], *rest)

    def test_non_finite_alpha(self):
        with pytest.raises(RuntimeError, match="alpha must be finite"):
            ops.steer(torch.randn(2, 16), None, torch.randn(16), float("nan"), *self.flow)


def test_compiled_library_is_loaded_not_the_reference():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("innsteer::steer", "CPU")
    assert innsteer_ext.ops is torch.ops.innsteer
