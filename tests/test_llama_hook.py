"""The native llama.cpp hook on the real default model (SmolLM2-135M-Instruct Q4_1).

References: the torch op (the C steer must equal it), llama.cpp without a hook (alpha = 0),
llama.cpp's own control vectors (a linear-equivalent INN must match them at the same layer), and
the PyTorch path on the same GGUF dequantized by transformers (A/B probabilities).
"""

import ctypes
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

from llama_helpers import SMOLLM_DIM, SMOLLM_LAYERS, last_logits, linear_equivalent_steerer, random_inn_steerer  # noqa: E402

from innsteer import SteerFileError  # noqa: E402
from innsteer.hf.models import default_gguf_path  # noqa: E402
from innsteer.llama.bindings import SteerGGUF, SteerHookError  # noqa: E402
from innsteer.llama.export import export_steer_gguf  # noqa: E402
from innsteer.llama.steering import SteeredLlama, attach  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. In the morning, the farmer"


@pytest.fixture(scope="module")
def gguf_path():
    return str(default_gguf_path())


def test_load_llama_keeps_the_weights_out_of_the_amx_buffers_where_llama_cpp_has_amx_kernels(gguf_path):
    """llama.cpp's AMX matmul crashes the process on any batch of two or more tokens (llama.cpp
    #20824; seen on a Sapphire Rapids host): load_llama and SteeredLlama must not use it there, and
    elsewhere load as llama_cpp.Llama does. In a child process, because the failure is a segfault."""
    code = f"""
import llama_cpp
from innsteer.llama.loading import amx_kernels_built, load_llama
from innsteer.llama.steering import SteeredLlama
path = {gguf_path!r}
for llm in (load_llama(path, n_ctx=64, n_threads=2, verbose=False), SteeredLlama(path, n_ctx=64, n_threads=2)):
    assert llm.model_params.use_extra_bufts is not amx_kernels_built()
    llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog"))
assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's defaults are back
print("evaluated")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "evaluated", result.stderr[-3000:]


@pytest.fixture(scope="module")
def plain_llm(gguf_path):
    from innsteer.llama.loading import load_llama

    return load_llama(gguf_path, n_ctx=256, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def tokens(plain_llm):
    return plain_llm.tokenize(PROMPT.encode())


@pytest.fixture(scope="module")
def random_steer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer") / "random.gguf"
    export_steer_gguf(random_inn_steerer(layer=10, alpha=3.0, model_id="test"), path)
    return str(path)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("scaling", ["latent", "displacement"])
def test_c_steer_equals_torch_op(tmp_path, weight_dtype, n_threads, scaling):
    steerer = random_inn_steerer(mlp_hidden=256, weight_scale=0.1)
    steerer.scaling = scaling
    path = tmp_path / "s.gguf"
    export_steer_gguf(steerer, path, weight_dtype=weight_dtype)
    if weight_dtype == "bfloat16":
        steerer.weight_dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(37, SMOLLM_DIM, generator=gen) * 5  # 37 rows: several tiles, a partial one
    h[0] *= 150  # a massive-activation row like SmolLM2's first token
    steer = SteerGGUF.load(path)
    assert steer.bf16_weights == (weight_dtype == "bfloat16") and steer.meta("scaling") == scaling
    for alpha in (0.0, 0.7, -3.0):
        # The hook runs the op's row-streaming path (8-row tiles); from 32 rows the op takes its
        # BLAS path, whose float32 rounding differs on this ill-conditioned flow by ~1e-4 (like
        # eager PyTorch's): compare with the op on slices that stay on the streaming path.
        ref = torch.cat([steerer(h[i : i + 8], alpha) for i in range(0, len(h), 8)]).numpy()
        out = steer.apply(h.numpy(), alpha, n_threads=n_threads)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel <= 1e-5, (alpha, rel)
        if alpha == 0:
            assert np.array_equal(out, h.numpy())
        else:
            assert np.abs(out - h.numpy()).max() > 1e-2  # it really steered


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_one_tile_split_across_threads_gives_the_same_bits(tmp_path, weight_dtype):
    """A decode's few rows (one tile) run their gemms' columns on several threads: each column sums
    in the same order, so the rows equal one thread's bit for bit (H = 512 splits into 64-column
    chunks per thread)."""
    export_steer_gguf(
        random_inn_steerer(mlp_hidden=512, weight_scale=0.1), tmp_path / "s.gguf", weight_dtype=weight_dtype
    )
    steer = SteerGGUF.load(tmp_path / "s.gguf")
    h = torch.randn(8, SMOLLM_DIM, generator=torch.Generator().manual_seed(2)).numpy() * 5
    for n_rows in (1, 3, 8):
        one = steer.apply(h[:n_rows], 2.5, n_threads=1)
        assert np.abs(one - h[:n_rows]).max() > 1e-2
        for n_threads in (2, 3, 7):
            assert np.array_equal(steer.apply(h[:n_rows], 2.5, n_threads=n_threads), one), (n_rows, n_threads)


def test_alpha_zero_and_disabled_give_unhooked_logits(gguf_path, plain_llm, tokens, random_steer_file):
    base = last_logits(plain_llm, tokens)
    llm = SteeredLlama(gguf_path, steer=random_steer_file, alpha=0.0, n_ctx=256, n_threads=2)
    assert np.array_equal(last_logits(llm, tokens), base)
    llm.steering.set_alpha(3.0)
    before = llm.steering.applied_count
    steered = last_logits(llm, tokens)
    assert llm.steering.applied_count > before
    assert np.abs(steered - base).max() > 0.1
    llm.steering.disable()
    assert np.array_equal(last_logits(llm, tokens), base)
    llm.steering.enable()
    assert np.array_equal(last_logits(llm, tokens), steered)  # deterministic, and alpha survived


def test_changing_alpha_never_reuses_a_steered_prefix(gguf_path, plain_llm, random_steer_file):
    plain = plain_llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm = SteeredLlama(gguf_path, steer=random_steer_file, alpha=6.0, n_ctx=256, n_threads=2)
    steered = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert steered != plain
    llm.steering.set_alpha(0.0)  # same prompt next: llama-cpp-python would reuse its cached prefix
    assert llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"] == plain


def test_a_steering_change_keeps_the_unsteered_prefix_and_only_that(gguf_path, random_steer_file):
    """Steering from the last prompt token on, a change of alpha keeps the prompt's cache before it
    (evaluated once), and the reply equals the one from an empty cache; a control vector, which
    acts at every position, keeps nothing."""
    llm = SteeredLlama(gguf_path, steer=random_steer_file, alpha=3.0, n_ctx=256, n_threads=2)
    prompt = llm.tokenize(PROMPT.encode())
    evaluated = []
    evaluate = llm.eval
    llm.eval = lambda tokens: evaluated.append(len(tokens)) or evaluate(tokens)

    def reply(alpha, fresh=False):
        if fresh:
            llm.reset()
        llm.steering.set_alpha(alpha)
        llm.steering.steer_from(len(prompt) - 1)
        evaluated.clear()
        return llm.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]

    first = reply(3.0, fresh=True)
    assert evaluated[0] == len(prompt)
    for alpha in (-4.0, 6.0, 3.0):
        text = reply(alpha)
        assert evaluated[0] == 2  # only the last (steered) prompt token and the one before it, again
        assert text == reply(alpha, fresh=True) and evaluated[0] == len(prompt)
    assert reply(3.0) == first
    assert llm.n_tokens > len(prompt)
    llm.steering.set_control_vector({5: _vector(1, 1.0).numpy()}, 1.0)
    assert llm.n_tokens == 0  # a control vector changes every position


def _vector(seed, scale=4.0):
    return torch.randn(SMOLLM_DIM, generator=torch.Generator().manual_seed(seed)) * scale


def test_linear_inn_at_layer_l_equals_control_vector_direction_l(gguf_path, tokens, tmp_path):
    """l_out-L (the hook's target for layer=L) is where llama.cpp adds direction.L."""
    layer, vector = 12, _vector(0)
    path = tmp_path / "lin.gguf"
    export_steer_gguf(linear_equivalent_steerer(vector, layer), path)
    llm = SteeredLlama(gguf_path, steer=str(path), alpha=1.0, n_ctx=256, n_threads=2)
    hooked = last_logits(llm, tokens)
    llm.steering.disable()
    scores = {}
    for cv_layer in (layer - 1, layer, layer + 1):
        llm.steering.set_control_vector({cv_layer: vector.numpy()})
        scores[cv_layer] = np.abs(last_logits(llm, tokens) - hooked).mean()
    llm.steering.clear_control_vector()
    # llama.cpp quantizes activations for its Q4 matmuls, so a 1e-6 relative change of h moves
    # logits by ~0.1 on average: "equal" is judged against the off-by-one layers (~1.5).
    assert scores[layer] < 0.15 * min(scores[layer - 1], scores[layer + 1]), scores


def test_several_layers_at_once_match_control_vectors(gguf_path, tokens, tmp_path):
    vectors = {6: _vector(1, 3.0), 15: _vector(2, 3.0)}
    llm = SteeredLlama(gguf_path, n_ctx=256, n_threads=2)
    for layer, vector in vectors.items():
        path = tmp_path / f"lin{layer}.gguf"
        export_steer_gguf(linear_equivalent_steerer(vector, layer, seed=layer), path)
        llm.steering.add(str(path))
    hooked = last_logits(llm, tokens)
    llm.steering.disable()
    llm.steering.set_control_vector({k: v.numpy() for k, v in vectors.items()})
    reference = last_logits(llm, tokens)
    llm.steering.set_control_vector({6: vectors[6].numpy()})
    only_one = last_logits(llm, tokens)
    assert np.abs(hooked - reference).mean() < 0.15 * np.abs(only_one - reference).mean()


def test_attach_to_existing_llama(gguf_path, plain_llm, tokens, random_steer_file):
    from innsteer.llama.loading import load_llama

    llm = load_llama(gguf_path, n_ctx=256, n_threads=2, verbose=False)
    base = last_logits(llm, tokens)
    steering = attach(llm, random_steer_file, alpha=3.0)
    assert attach(llm) is steering  # attaching again reuses the installed hook
    assert np.abs(last_logits(llm, tokens) - base).max() > 0.1
    steering.set_alpha(0.0)
    assert np.array_equal(last_logits(llm, tokens), base)


def test_missing_l_out_tensor_fails_loudly(gguf_path, tokens, random_steer_file):
    """An entry whose l_out-L never appears (architectures without l_out) must raise, not pass."""
    llm = SteeredLlama(gguf_path, n_ctx=256, n_threads=2)
    from innsteer.llama.steering import _Entry

    steer = SteerGGUF.load(random_steer_file)
    steering = llm.steering
    steering._steer_entries.append(_Entry(steer, 77, 1.0))
    err = ctypes.create_string_buffer(256)
    # bypass add()'s layer check to stand in for a graph without that tensor name
    assert steering._lib.innsteer_hook_add(steering._hook, steer.handle, 77, 1.0, err, 256) == 0
    with pytest.raises(SteerHookError, match="l_out-77"):
        llm.eval(tokens)
    assert llm.n_tokens == 0  # the cache is dropped after a failed call


def test_refuses_bad_layers_and_incompatible_steers(gguf_path, tmp_path, random_steer_file):
    llm = SteeredLlama(gguf_path, n_ctx=256, n_threads=2)
    with pytest.raises(ValueError, match="last layer"):
        llm.steering.add(random_steer_file, layer=SMOLLM_LAYERS - 1)
    small = tmp_path / "small.gguf"
    export_steer_gguf(random_inn_steerer(64, model_id="tiny-model"), small)
    with pytest.raises(SteerFileError, match="hidden size 64.*has 576"):
        llm.steering.add(str(small))
    other = tmp_path / "qwen.gguf"
    export_steer_gguf(random_inn_steerer(), other, model_hint="qwen2")
    with pytest.raises(SteerFileError, match="'qwen2' model, but this model is 'llama'"):
        llm.steering.add(str(other))
    with pytest.raises(SteerFileError, match="made for model 'test'"):
        llm.steering.add(random_steer_file, expect_model_id="SmolLM2-135M-Instruct.Q4_1")
    with pytest.raises(SteerFileError, match="hidden size is 576"):
        llm.steering.set_control_vector({5: np.ones(10, np.float32)})
    from innsteer.core.steerers import LinearSteerer
    from innsteer.llama.export import export_control_vector

    export_control_vector(LinearSteerer(torch.ones(SMOLLM_DIM), 5), tmp_path / "cv.gguf", model_hint="qwen2")
    with pytest.raises(SteerFileError, match="control vector for a 'qwen2' model"):
        llm.steering.set_control_vector(tmp_path / "cv.gguf")


def test_steer_from_position_across_ubatches(gguf_path, tokens, random_steer_file):
    """steer_from(k) leaves tokens before k unsteered, also when llama.cpp splits the call into ubatches."""
    from innsteer.llama.loading import load_llama

    n = len(tokens)
    plain = load_llama(gguf_path, n_ctx=256, n_threads=2, n_batch=64, n_ubatch=4, verbose=False)
    base = last_logits(plain, tokens)
    results = {}
    for n_ubatch in (4, 64):
        llm = SteeredLlama(
            gguf_path, steer=random_steer_file, alpha=3.0, n_ctx=256, n_threads=2, n_batch=64, n_ubatch=n_ubatch
        )
        for start in (0, n - 3, n):
            llm.steering.steer_from(start)
            results[n_ubatch, start] = last_logits(llm, tokens)
    assert np.array_equal(results[4, n], base)  # nothing at or after position n in this call
    assert np.array_equal(results[4, n - 3], results[64, n - 3])  # the same rows steered in 4-token ubatches
    assert np.abs(results[64, n - 3] - base).mean() > 1.0
    assert np.abs(results[64, n - 3] - results[64, 0]).mean() > 1.0


@pytest.mark.slow
def test_steering_shifts_ab_probabilities_as_the_pytorch_path_does(tmp_path, default_lm):
    """A trained INN steerer moves the CAA test-split A/B probabilities through llama.cpp (Q4_1 +
    C hook) as it moves them in the PyTorch path (the same GGUF dequantized, torch op).

    The two paths differ by quantization already at alpha = 0, by an amount that depends on which
    quantized kernels llama.cpp picks for the host's SIMD level. So each path's steering shift is
    taken against its own alpha = 0 scores, and the shifts are compared over all 50 items: the
    hook must add nothing beyond that quantization noise, whatever the host."""
    from innsteer.core.flow import FlowConfig
    from innsteer.core.train import TrainConfig, train_innsteer
    from innsteer.datasets.caa import load_ab
    from innsteer.eval.metrics import ABScorer
    from innsteer.hf.collect import contrastive_activations
    from innsteer.llama.scoring import behaviour_scores as llama_scores

    behavior, layer = "corrigible-neutral-HHH", 12
    lm = default_lm
    train_items = load_ab(behavior, "generate", limit=48)
    acts = contrastive_activations(lm, train_items, layer, behavior=behavior, split="generate", progress=False)
    config = TrainConfig(flow=FlowConfig(mlp_hidden=64), max_epochs=10)
    steerer = train_innsteer(*acts[layer], layer=layer, model_id=lm.model_id, config=config, progress=False).steerer
    path = tmp_path / "trained.gguf"
    export_steer_gguf(steerer, path)
    test_items = load_ab(behavior, "test_ab")
    metrics = ("letter", "fork")
    scorer = ABScorer(lm, test_items, metrics)
    llm = SteeredLlama(str(default_gguf_path()), steer=str(path), n_ctx=512, n_threads=2)
    torch_p, llama_p = {}, {}
    for alpha in (0.0, -6.0, 6.0):
        llm.steering.set_alpha(alpha)
        for metric, scores in scorer.scores(steerer, alpha).items():
            torch_p[metric, alpha] = scores.numpy()
            llama_p[metric, alpha] = llama_scores(llm, lm.tokenizer, test_items, metric)
    for metric, alpha in itertools.product(metrics, (-6.0, 6.0)):
        quantization_gap = np.abs(llama_p[metric, 0.0] - torch_p[metric, 0.0]).mean()
        torch_shift = torch_p[metric, alpha] - torch_p[metric, 0.0]
        llama_shift = llama_p[metric, alpha] - llama_p[metric, 0.0]
        disagreement = np.abs(llama_shift - torch_shift).mean()
        moved = np.abs(torch_shift).mean()
        correlation = np.corrcoef(torch_shift, llama_shift)[0, 1]
        print(
            f"{metric}, alpha {alpha}: quantization gap {quantization_gap:.4f}; "
            f"mean shift pytorch {torch_shift.mean():+.4f} "
            f"llama.cpp {llama_shift.mean():+.4f}; mean |shift difference| {disagreement:.4f} of |shift| {moved:.4f}; "
            f"per-item correlation {correlation:.3f}"
        )
        # measured on an AVX-512 host: letter |shift difference| 0.025 / 0.025 of |shift| 0.186 / 0.150,
        # correlation 0.99 / 0.99, quantization gap 0.021 (AVX2 hosts: gap 0.023); fork 0.027 / 0.022 of
        # 0.296 / 0.196, correlation 0.99 / 0.98, gap 0.016 (2026-12-07)
        assert moved > 0.05  # steering really moved the scores
        assert disagreement <= 0.5 * moved
        assert correlation >= 0.7


def test_cli_generate_gguf_and_export(tmp_path, capsys):
    """`innsteer export` then `innsteer generate --gguf`: unsteered and steered replies differ."""
    from innsteer.cli import main

    steer_file = tmp_path / "inn.safetensors"
    random_inn_steerer(layer=10, alpha=4.0).save(steer_file)
    assert main(["export", str(steer_file), "-o", str(tmp_path / "inn.gguf")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--gguf",
                "smollm2",
                "--steer",
                str(tmp_path / "inn.gguf"),
                "--alpha",
                "6",
                "--max-new-tokens",
                "8",
                "Name a fruit.",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    unsteered = next(line for line in lines if line.startswith("[unsteered]"))
    steered = next(line for line in lines if line.startswith("[innsteer alpha=6]"))
    assert unsteered[len("[unsteered]") :] != steered[len("[innsteer alpha=6]") :]
    assert main(["generate", "--gguf", str(steer_file), "x"]) != 0  # not a GGUF model: a clear error
