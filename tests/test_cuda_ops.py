"""The CUDA ops against the float64 pure-PyTorch reference and the CPU kernel, plus opcheck,
gradients, exactness properties, CUDA-graph capture and torch.compile. Skipped without a GPU or
without the CUDA kernels built (`python setup.py build_ext --inplace` against a CUDA torch)."""

import pytest
import torch
from flows import as_float64, random_inn, rel_err

import innsteer
import innsteer_ext
from innsteer_ext import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not innsteer_ext.HAS_CUDA_KERNELS, reason="innsteer_ext._C was built without CUDA kernels"),
]

ops = torch.ops.innsteer
CUDA = "cuda"

# (dim, hidden, tokens): odd sizes (scalar weight loads), decode with and without split-K, the
# tensor-core path for 16-bit activations past 8 tokens, and prefill.
CASES = [
    (3, 16, 1),
    (7, 20, 5),
    (576, 512, 1),
    (576, 512, 8),
    (576, 512, 64),
    (2048, 512, 3),
    (4096, 512, 1),
    (4096, 512, 8),
    (4096, 512, 64),
    (576, 64, 512),
    (4096, 128, 300),
]


def _flow(inn, weight_dtype=None):
    # no requires_grad: steer_ refuses arguments that require grad under grad mode
    return inn.to(CUDA).requires_grad_(False).flow_args(weight_dtype)


def _activations(dim, tokens, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, dim, generator=generator) * 2 + 0.5).to(dtype).to(CUDA)


def _direction(dim, dtype=torch.float32, seed=2):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed)).to(dtype).to(CUDA)


def _tolerance(dtype):
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


@pytest.mark.parametrize("dim,hidden,tokens", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16])
def test_ops_match_float64_reference(dim, hidden, tokens, dtype, weight_dtype):
    flow = _flow(random_inn(dim, mlp_hidden=hidden), weight_dtype)
    flow64 = as_float64(flow)
    x = _activations(dim, tokens, dtype)
    x64 = x.double()
    tol = _tolerance(dtype)

    z, logdet = ops.coupling_forward(x, *flow)
    z64, logdet64 = reference.coupling_forward(x64, *flow64)
    assert z.device.type == CUDA and z.dtype == dtype and z.shape == x.shape and logdet.shape == (tokens,)
    assert rel_err(z, z64) < tol
    assert rel_err(logdet, logdet64) < tol

    z_in = z64.to(dtype)
    x_back = ops.coupling_inverse(z_in, *flow)
    assert x_back.dtype == dtype
    assert rel_err(x_back, reference.coupling_inverse(z_in.double(), *flow64)) < tol

    direction = _direction(dim)
    steered = ops.steer(x, None, direction, 1.5, *flow)
    assert steered.dtype == dtype
    assert rel_err(steered, reference.steer(x64, None, direction.double(), 1.5, *flow64)) < tol


@pytest.mark.parametrize("dim,hidden,tokens", [(576, 512, 1), (4096, 512, 8), (576, 64, 200)])
def test_float32_matches_the_cpu_kernel(dim, hidden, tokens):
    inn = random_inn(dim, mlp_hidden=hidden)
    x_cpu = _activations(dim, tokens, torch.float32).cpu()
    direction = _direction(dim).cpu()
    expected = ops.steer(x_cpu, None, direction, 1.0, *inn.flow_args())
    z_cpu, logdet_cpu = ops.coupling_forward(x_cpu, *inn.flow_args())
    flow = _flow(inn)
    assert rel_err(ops.steer(x_cpu.to(CUDA), None, direction.to(CUDA), 1.0, *flow).cpu(), expected) < 5e-6
    z, logdet = ops.coupling_forward(x_cpu.to(CUDA), *flow)
    assert rel_err(z.cpu(), z_cpu) < 5e-6 and rel_err(logdet.cpu(), logdet_cpu) < 5e-6


def test_float64_matches_reference_to_float64_precision():
    inn = random_inn(96, mlp_hidden=40, strength=1.0).double()
    flow = _flow(inn)
    x = torch.randn(11, 96, dtype=torch.float64, device=CUDA)
    z, logdet = ops.coupling_forward(x, *flow)
    z64, logdet64 = reference.coupling_forward(x, *flow)
    assert rel_err(z, z64) < 1e-12 and rel_err(logdet, logdet64) < 1e-12
    direction = torch.randn(96, dtype=torch.float64, device=CUDA)
    assert rel_err(ops.steer(x, None, direction, 0.7, *flow), reference.steer(x, None, direction, 0.7, *flow)) < 1e-12


def _float64_inputs(dim=5, mlp_hidden=6, tokens=3):
    inn = random_inn(dim, mlp_hidden=mlp_hidden, num_couplings=2, strength=1.0).double().to(CUDA)
    mean, scale, cond, trans, w1, b1, w2, b2, clamp = inn.flow_args()
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x = torch.randn(tokens, dim, dtype=torch.float64, device=CUDA, requires_grad=True)
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

    def forward(x, mean, scale, w1a, b1a, w2b, b2b):
        return ops.coupling_forward(
            x, mean, scale, cond, trans, [w1a, w1[1]], [b1a, b1[1]], [w2[0], w2b], [b2[0], b2b], clamp
        )

    assert torch.autograd.gradcheck(forward, (x, mean, scale, w1[0], b1[0], w2[1], b2[1]))

    def inverse(z, w1b, w2a, b2a):
        return ops.coupling_inverse(z, mean, scale, cond, trans, [w1[0], w1b], b1, [w2a, w2[1]], [b2a, b2[1]], clamp)

    assert torch.autograd.gradcheck(inverse, (x, w1[1], w2[0], b2[0]))

    residual = torch.randn_like(x, requires_grad=True)
    direction = torch.randn(x.shape[-1], dtype=torch.float64, device=CUDA, requires_grad=True)

    def steer(h, residual, direction, w2a):
        return ops.steer(h, residual, direction, 0.7, mean, scale, cond, trans, w1, b1, [w2a, w2[1]], b2, clamp)

    assert torch.autograd.gradcheck(steer, (x, residual, direction, w2[0]))


def test_opcheck_every_op():
    x, flow = _float64_inputs()
    direction = torch.randn(x.shape[-1], dtype=torch.float64, device=CUDA)
    residual = torch.randn_like(x)
    torch.library.opcheck(ops.coupling_forward, (x, *flow))
    torch.library.opcheck(ops.coupling_inverse, (x, *flow))
    torch.library.opcheck(ops.steer, (x, residual, direction, 0.5, *flow))
    torch.library.opcheck(ops.steer, (x, None, direction, 0.0, *flow))
    flow32 = _flow(random_inn(64))
    hidden = torch.randn(4, 64, device=CUDA)
    torch.library.opcheck(ops.steer_, (hidden, torch.randn(4, 64, device=CUDA), _direction(64), 0.5, *flow32))
    torch.library.opcheck(ops.coupling_forward, (hidden.bfloat16(), *flow32))
    torch.library.opcheck(ops.steer, (torch.randn(32, 64, device=CUDA).bfloat16(), None, _direction(64), 1.0, *flow32))


@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_round_trip_with_massive_activation_rows(tokens):
    dim = 576
    inn = random_inn(dim, mlp_hidden=128)
    generator = torch.Generator().manual_seed(3)
    inn.fit_standardization(torch.randn(64, dim, generator=generator))
    x = torch.randn(tokens, dim, generator=generator)
    x[0] *= 100  # LLMs have rows like this (e.g. the first token)
    x = x.to(CUDA)
    flow = _flow(inn)
    z, _ = ops.coupling_forward(x, *flow)
    back = ops.coupling_inverse(z, *flow)
    for row in range(tokens):
        assert rel_err(back[row], x[row]) <= 1e-5, row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("tokens", [1, 64])
def test_alpha_zero_is_exact_identity(dtype, tokens):
    inn = random_inn(64)
    flow = _flow(inn.double() if dtype == torch.float64 else inn)
    direction = _direction(64, torch.float64 if dtype == torch.float64 else torch.float32)
    h = torch.randn(tokens, 64, device=CUDA).to(dtype)
    residual = torch.randn(tokens, 64, device=CUDA).to(dtype)
    assert torch.equal(ops.steer(h, None, direction, 0.0, *flow), h)
    assert torch.equal(ops.steer(h, residual, direction, 0.0, *flow), h + residual)
    inplace = h.clone()
    ops.steer_(inplace, residual, direction, 0.0, *flow)
    assert torch.equal(inplace, h + residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 64])
def test_residual_fusion_equals_add_then_steer(dtype, tokens):
    flow = _flow(random_inn(96))
    direction = _direction(96)
    h = torch.randn(tokens, 96, device=CUDA).to(dtype)
    residual = torch.randn(tokens, 96, device=CUDA).to(dtype)
    fused = ops.steer(h, residual, direction, 0.8, *flow)
    assert torch.equal(fused, ops.steer(h + residual, None, direction, 0.8, *flow))


def test_results_are_deterministic():
    flow = _flow(random_inn(4096, mlp_hidden=512), torch.bfloat16)  # split-K at decode and prefill
    direction = _direction(4096)
    for tokens, dtype in ((1, torch.float32), (64, torch.bfloat16)):
        h = _activations(4096, tokens, dtype)
        first = ops.steer(h, None, direction, 1.0, *flow)
        assert torch.equal(first, ops.steer(h, None, direction, 1.0, *flow))
        z, logdet = ops.coupling_forward(h, *flow)
        z2, logdet2 = ops.coupling_forward(h, *flow)
        assert torch.equal(z, z2) and torch.equal(logdet, logdet2)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_in_place_equals_out_of_place(contiguous, with_residual):
    flow = _flow(random_inn(48))
    direction = _direction(48)
    base = torch.randn(7, 48, device=CUDA) if contiguous else torch.randn(48, 7, device=CUDA)
    h = base if contiguous else base.t()
    residual = torch.randn(7, 48, device=CUDA) if with_residual else None
    expected = ops.steer(h, residual, direction, 1.2, *flow)
    inplace = h.clone() if contiguous else torch.randn(48, 7, device=CUDA).t().copy_(h)
    assert inplace.is_contiguous() == contiguous
    ops.steer_(inplace, residual, direction, 1.2, *flow)
    assert torch.equal(inplace, expected)


def test_non_contiguous_inputs_and_leading_dimensions():
    inn = random_inn(40)
    flow = _flow(inn)
    direction = _direction(40)
    x = torch.randn(40, 2, 3, device=CUDA).permute(1, 2, 0)  # [2, 3, 40], not contiguous
    residual = torch.randn(3, 2, 40, device=CUDA).transpose(0, 1)
    assert not x.is_contiguous() and not residual.is_contiguous()
    z, logdet = ops.coupling_forward(x, *flow)
    assert z.shape == (2, 3, 40) and logdet.shape == (2, 3)
    z_ref, logdet_ref = ops.coupling_forward(x.contiguous(), *flow)
    assert torch.equal(z, z_ref) and torch.equal(logdet, logdet_ref)
    steered = ops.steer(x, residual, direction, 0.6, *flow)
    assert torch.equal(steered, ops.steer(x.contiguous(), residual.contiguous(), direction, 0.6, *flow))
    assert torch.equal(ops.coupling_inverse(x, *flow), ops.coupling_inverse(x.contiguous(), *flow))


def test_unaligned_weights_take_the_scalar_path():
    inn = random_inn(64, mlp_hidden=64)
    mean, scale, cond, trans, w1, b1, w2, b2, clamp = _flow(inn)

    def unaligned(w):  # same values, storage offset of one element: not 16-byte aligned
        buffer = torch.empty(w.numel() + 1, dtype=w.dtype, device=w.device)
        view = buffer[1:].view(w.shape)
        view.copy_(w)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    shifted = (mean, scale, cond, trans, [unaligned(w) for w in w1], b1, [unaligned(w) for w in w2], b2, clamp)
    x = _activations(64, 3, torch.float32)
    direction = _direction(64)
    aligned_out = ops.steer(x, None, direction, 1.0, mean, scale, cond, trans, w1, b1, w2, b2, clamp)
    assert rel_err(ops.steer(x, None, direction, 1.0, *shifted), aligned_out) < 1e-6


def test_runs_on_the_current_stream():
    flow = _flow(random_inn(576, mlp_hidden=256))
    direction = _direction(576)
    x = _activations(576, 4, torch.float32)
    expected = ops.steer(x, None, direction, 1.0, *flow)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # queue work so a kernel on the wrong stream would race
            out = ops.steer(x, None, direction, 1.0, *flow)
            x_back = ops.coupling_inverse(ops.coupling_forward(out, *flow)[0], *flow)
    side.synchronize()
    assert torch.equal(out, expected)
    assert rel_err(x_back, out) < 1e-5


@pytest.mark.parametrize("tokens,dtype", [(1, torch.bfloat16), (8, torch.float32), (256, torch.bfloat16)])
def test_cuda_graph_capture_and_replay(tokens, dtype):
    flow = _flow(random_inn(2048, mlp_hidden=512), torch.bfloat16)
    direction = _direction(2048)
    static_h = _activations(2048, tokens, dtype, seed=5)
    static_res = _activations(2048, tokens, dtype, seed=6)
    inplace = static_h.clone()

    def body():
        inplace.copy_(static_h)
        ops.steer_(inplace, static_res, direction, 1.0, *flow)
        return ops.steer(static_h, static_res, direction, 1.0, *flow), ops.coupling_forward(static_h, *flow)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs recommends
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steered, (z, logdet) = body()

    for seed in (7, 8):
        static_h.copy_(_activations(2048, tokens, dtype, seed=seed))
        static_res.copy_(_activations(2048, tokens, dtype, seed=seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        eager = ops.steer(static_h, static_res, direction, 1.0, *flow)
        assert torch.equal(steered, eager)
        assert torch.equal(inplace, eager)
        z_eager, logdet_eager = ops.coupling_forward(static_h, *flow)
        assert torch.equal(z, z_eager) and torch.equal(logdet, logdet_eager)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(mode):
    steerer = innsteer.INNSteerer(random_inn(64), torch.randn(64), layer=0).to(CUDA)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)
            self.steerer = steerer

        def forward(self, x):
            return self.steerer(self.proj(x), 0.9, residual=x)

    block = Block().to(CUDA)
    compiled = torch.compile(block, fullgraph=True, mode=mode)
    with torch.no_grad():
        for seed in range(4):  # reduce-overhead records a CUDA graph after warm-up runs, then replays it
            x = _activations(64, 6, torch.float32, seed=seed)
            out = compiled(x).clone()
            torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)


def test_mixed_devices_are_rejected():
    mean, *rest = _flow(random_inn(16))
    with pytest.raises(RuntimeError, match="mean is on cpu but the activations are on cuda"):
        ops.coupling_forward(torch.randn(2, 16, device=CUDA), mean.cpu(), *rest)
