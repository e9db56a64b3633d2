"""The model: cells and forward pass against an independent float64 NumPy reference, state
carrying, gradients against finite differences, initialisation, dropout, and overfitting."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlm.data.corpus import BatchStream
from charlm.data.text import Vocabulary
from charlm.errors import CharlmError
from charlm.lm import dropout as regularisation
from charlm.lm import matmul as products
from charlm.lm import model, recurrence
from charlm.lm.config import TrainConfig
from charlm.lm.dropout import DROPOUTS
from charlm.lm.loss import head_loss
from charlm.lm.step import init_state, make_train_step
from charlm.training.schedule import learning_rate, make_optimizer

CELLS = ["lstm", "gru", "rnn"]
SMALL = dict(layers=2, vocab_size=11, embed_size=5, hidden_size=6)
BATCH, TIME = 3, 7

# Compiled once per config and shape: op-by-op eager dispatch of the scans is much slower.
apply = jax.jit(model.apply, static_argnums=3)


# ---------------------------------------------------------------------------------------------
# An independent float64 NumPy reference, written from the equations in the cell docstrings.
# It computes x W_x + b inside each step (the model precomputes it for all steps) and loops
# over time and layers explicitly.


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm(layer, state, x):
    # i, f, g, o = split(x W_x + b + h W_h); c' = σ(f)c + σ(i)tanh(g); h' = σ(o)tanh(c')
    h, c = state
    hidden = h.shape[-1]
    a = x @ layer["w_x"] + layer["b"] + h @ layer["w_h"]
    i, f, g, o = (a[:, k * hidden : (k + 1) * hidden] for k in range(4))
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    return (h_new, c_new)


def np_gru(layer, state, x):
    # r = σ(x̃_r + a_r); z = σ(x̃_z + a_z); n = tanh(x̃_n + r(a_n + b_hn)); h' = (1-z)n + zh
    (h,) = state
    hidden = h.shape[-1]
    xt = x @ layer["w_x"] + layer["b"]
    a = h @ layer["w_h"]
    xr, xz, xn = (xt[:, k * hidden : (k + 1) * hidden] for k in range(3))
    ar, az, an = (a[:, k * hidden : (k + 1) * hidden] for k in range(3))
    r = sigmoid(xr + ar)
    z = sigmoid(xz + az)
    n = np.tanh(xn + r * (an + layer["b_hn"]))
    return ((1.0 - z) * n + z * h,)


def np_rnn(layer, state, x):
    # h' = tanh(x W_x + b + h W_h)
    (h,) = state
    return (np.tanh(x @ layer["w_x"] + layer["b"] + h @ layer["w_h"]),)


NP_CELLS = {"lstm": np_lstm, "gru": np_gru, "rnn": np_rnn}


def np_forward(params, tokens, state, cell, masks=None):
    """Embedding lookup, stacked layers stepped over time, linear head; all float64. `masks`
    (NumPy, as `regularisation.dropout_masks` makes them) zero or scale, independently of the
    model's code: embedding rows, the first layer's input per stream, each W_h, and each
    layer's output per stream. A tied head (no "w") is the embedding, projected if "proj"."""
    embed = (
        params["embed"] if masks is None or masks.embed is None else params["embed"] * masks.embed
    )
    x = embed[tokens]  # (batch, time, embed)
    if masks is not None and masks.inputs is not None:
        x = x * masks.inputs[:, None, :]
    final = []
    for n, (layer, layer_state) in enumerate(zip(params["layers"], state)):
        if masks is not None and masks.w_h[n] is not None:
            layer = {**layer, "w_h": layer["w_h"] * masks.w_h[n]}
        outputs = []
        for t in range(x.shape[1]):
            layer_state = NP_CELLS[cell](layer, layer_state, x[:, t])
            outputs.append(layer_state[0])  # the layer's output is h
        x = np.stack(outputs, axis=1)
        if masks is not None and masks.outputs[n] is not None:
            x = x * masks.outputs[n][:, None, :]
        final.append(layer_state)
    head = params["head"]
    if "w" in head:
        w = head["w"]
    else:
        w = params["embed"].T if "proj" not in head else head["proj"] @ params["embed"].T
    logits = x @ w + head["b"]
    return logits, tuple(final)


def to_f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_state(config, batch, rng):
    """A non-zero state: h in (-1, 1) as a tanh output would be, LSTM c of any sign and size."""
    parts = recurrence.STATE_PARTS[config.cell]
    return tuple(
        tuple(
            rng.uniform(-1, 1, (batch, config.hidden_size))
            if k == 0
            else rng.normal(0, 1.5, (batch, config.hidden_size))
            for k in range(parts)
        )
        for _ in range(config.layers)
    )


def setup(cell, seed=0, batch=BATCH, time=TIME, **sizes):
    config = model.ModelConfig(cell=cell, **{**SMALL, **sizes})
    params = model.init(jax.random.key(seed), config)
    rng = np.random.default_rng(seed)
    # Non-zero biases, so a bias applied in the wrong place or not at all shows. NumPy arrays
    # from here on: eager JAX ops would each be compiled, which is slow.
    params = jax.tree.map(
        lambda p: np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params
    )
    tokens = rng.integers(0, config.vocab_size, (batch, time))
    state = random_state(config, batch, rng)
    return config, params, tokens, state


def as_f32(state):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# 1. Forward pass and final state against the reference.


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [BATCH, 1])
def test_apply_matches_numpy_reference(cell, batch):
    """With 3×7 tokens the embedding table (11 rows) is projected whole and gathered; with 1×7
    every gathered row is projected: both paths against the reference."""
    config, params, tokens, state = setup(cell, batch=batch)
    expected_logits, expected_state = np_forward(to_f64(params), tokens, state, cell)
    logits, new_state = apply(params, jnp.asarray(tokens), as_f32(state), config)
    assert logits.shape == (batch, TIME, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert_close(logits, expected_logits)
    # Same structure: per layer (h, c) for the LSTM, (h,) otherwise.
    assert jax.tree.structure(new_state) == jax.tree.structure(as_f32(expected_state))
    assert_close(new_state, expected_state)


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_matches_its_equations(cell):
    """One step of the cell alone, given x̃ = x W_x + b as the model precomputes it."""
    config, params, _, state = setup(cell)
    layer = to_f64(params["layers"][0])
    x = np.random.default_rng(1).normal(size=(BATCH, config.embed_size))
    expected = NP_CELLS[cell](layer, state[0], x)
    x_proj = jnp.asarray(x @ layer["w_x"] + layer["b"], jnp.float32)
    h_proj = state[0][0] @ layer["w_h"]
    if cell == "gru":
        h_proj[:, 2 * config.hidden_size :] += layer["b_hn"]
    new_state, out = recurrence.CELLS[cell](
        as_f32(state[0]), x_proj, jnp.asarray(h_proj, jnp.float32)
    )
    assert_close(new_state, expected)
    assert_close(out, expected[0])  # the output is the new h


def test_zero_initial_state_is_zero_and_shaped():
    for cell, parts in [("lstm", 2), ("gru", 1), ("rnn", 1)]:
        config = model.ModelConfig(cell=cell, **SMALL)
        state = model.initial_state(config, BATCH)
        assert len(state) == config.layers
        for layer_state in state:
            assert len(layer_state) == parts
            for a in layer_state:
                assert a.shape == (BATCH, config.hidden_size) and not np.any(a)


# ---------------------------------------------------------------------------------------------
# 2. Carrying the state across calls is exact truncated BPTT bookkeeping.


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_calls(cell):
    config, params, tokens, state = setup(cell)
    tokens, state = jnp.asarray(tokens), as_f32(state)
    whole, whole_state = apply(params, tokens, state, config)
    first, mid_state = apply(params, tokens[:, :4], state, config)
    second, end_state = apply(params, tokens[:, 4:], mid_state, config)
    assert_close(
        jnp.concatenate([first, second], axis=1), np.asarray(whole, np.float64), 1e-6, 1e-6
    )
    assert_close(end_state, to_f64(whole_state), 1e-6, 1e-6)
    # And the state matters: starting the second half from zeros gives other logits.
    fresh, _ = apply(params, tokens[:, 4:], model.initial_state(config, BATCH), config)
    assert not np.allclose(fresh, second, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 3. Gradients against central finite differences, in float64.


@contextlib.contextmanager
def x64():
    """64-bit JAX only inside the block. jax.experimental.enable_x64 is gone in this jax;
    jax.enable_x64 is its replacement, with the config flag as a last resort."""
    manager = getattr(jax, "enable_x64", None)
    if manager is None:
        manager = getattr(jax.experimental, "enable_x64", None)
    if manager is not None:
        with manager(True):
            yield
        return
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def cross_entropy(logits, targets):
    """Mean softmax cross-entropy in nats, as the training step computes it."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_finite_differences(cell):
    sizes = dict(vocab_size=5, embed_size=3, hidden_size=4)
    config, params, tokens, state = setup(cell, seed=3, batch=2, time=6, **sizes)
    targets = np.random.default_rng(4).integers(0, config.vocab_size, tokens.shape)
    with x64():
        params64, state64 = to_f64(params), to_f64(state)

        @jax.jit
        def loss(p):
            logits, _ = model.apply(p, tokens, state64, config)
            return cross_entropy(logits, targets)

        grads = jax.device_get(jax.jit(jax.grad(loss))(params64))
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
        leaves, treedef = jax.tree.flatten(params64)
        grad_leaves = jax.tree.leaves(grads)
        paths = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        rng = np.random.default_rng(5)
        eps = 1e-6
        checked = 0
        for n, (path, leaf) in enumerate(zip(paths, leaves)):
            for _ in range(3):
                if path == "['embed']":
                    # Only rows of tokens that occur have a non-zero gradient.
                    index = (int(rng.choice(tokens.ravel())), int(rng.integers(leaf.shape[1])))
                else:
                    index = tuple(int(rng.integers(s)) for s in leaf.shape)
                base = np.asarray(leaf)

                def shifted(delta, n=n, base=base, index=index):
                    moved = base.copy()
                    moved[index] += delta
                    new = list(leaves)
                    new[n] = moved
                    return float(loss(jax.tree.unflatten(treedef, new)))

                numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
                analytic = float(grad_leaves[n][index])
                assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (path, index)
                checked += 1
        # embed, per layer w_x, w_h, b (and b_hn), head w and b: every leaf was probed.
        assert checked == 3 * len(leaves) >= 3 * (3 + 3 * config.layers)


@pytest.mark.parametrize("cell", CELLS)
def test_hand_written_gradient_matches_autodiff_of_the_scan(cell):
    """`recurrence` has a hand-written VJP; autodiff through the same scan (its undecorated
    function) is the reference. The loss reads every output and every part of the final state,
    so each cotangent path is exercised; float32, to float32 rounding."""
    config = model.ModelConfig(vocab_size=5, cell=cell, hidden_size=8)
    rng = np.random.default_rng(7)
    gates, hidden = recurrence.GATES[cell] * 8, 8
    w_h = rng.uniform(-0.5, 0.5, (hidden, gates)).astype(np.float32)
    x_bias = rng.normal(size=gates).astype(np.float32)
    h_bias = model.recurrent_bias(config, {"b_hn": rng.normal(size=hidden).astype(np.float32)})
    x_proj = rng.normal(size=(9, 3, gates)).astype(np.float32)
    state = as_f32(random_state(config, 3, rng)[0])
    weights = [rng.normal(size=(9, 3, hidden)), *(rng.normal(size=(3, hidden)) for _ in state)]
    cell_fn = recurrence.CELLS[cell]

    def loss(fn, *args):
        final, outputs = fn(cell_fn, None, *args)
        return sum(jnp.sum(w * a) for w, a in zip(weights, [outputs, *final]))

    args = (w_h, x_bias, h_bias, x_proj, state)
    argnums = tuple(n for n, a in enumerate(args) if a is not None)
    fast = jax.jit(jax.grad(partial(loss, recurrence.recurrence), argnums))(*args)
    plain = jax.jit(jax.grad(partial(loss, recurrence.recurrence.fun), argnums))(*args)
    # w_h, x_bias, x_proj and each state part, and h_bias for the GRU.
    expected = 3 + len(state) + (cell == "gru")
    assert len(jax.tree.leaves(fast)) == len(jax.tree.leaves(plain)) == expected
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_matmul_gradient_is_the_products_of_its_rounded_operands(precision):
    """`matmul`'s hand-written VJP, for time-major x as the model passes it: d_x = d_y Wᵀ and
    ∂W = Σ xᵀ d_y, with every operand rounded to the run's precision (bfloat16 in the backward
    pass too), against float64 products of the same rounded operands."""
    dtype = products.PRECISIONS[precision]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 3, 16)).astype(np.float32)
    w = rng.normal(size=(16, 24)).astype(np.float32)
    d_y = rng.normal(size=(7, 3, 24)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: products.matmul(x, w, dtype), x, w)
    d_x, d_w = jax.jit(vjp)(d_y)

    def rounded(a):
        return np.asarray(jnp.asarray(a).astype(dtype or jnp.float32), np.float64)

    np.testing.assert_allclose(y, rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x, rounded(d_y) @ rounded(w).T, rtol=1e-5, atol=1e-5)
    expected_d_w = np.einsum("tbk,tbn->kn", rounded(x), rounded(d_y))
    np.testing.assert_allclose(d_w, expected_d_w, rtol=1e-5, atol=1e-5)
    assert d_x.dtype == d_w.dtype == np.float32


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_head_loss_equals_the_loss_of_whole_logits(precision, monkeypatch):
    """`head_loss` makes the logits a few rows at a time (here 4 of 21, so the last chunk is
    padded) and its gradients in the forward pass: its value and gradients must be those of
    the plain cross-entropy of `matmul`'s logits, and scale with the loss's cotangent."""
    monkeypatch.setattr("charlm.lm.loss.LOSS_CHUNK", 4)
    dtype = products.PRECISIONS[precision]
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(7, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 9)), jnp.float32)
    b = jnp.asarray(rng.normal(size=9), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, size=(7, 3)), jnp.int32)

    def plain(x, w, b):
        return 3.0 * cross_entropy(products.matmul(x, w, dtype) + b, targets)

    def chunked(x, w, b):
        return 3.0 * head_loss(x, w, b, targets, dtype)

    value, gradients = jax.value_and_grad(chunked, (0, 1, 2))(x, w, b)
    expected_value, expected = jax.value_and_grad(plain, (0, 1, 2))(x, w, b)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(head_loss(x, w, b, targets, dtype), value / 3.0, rtol=1e-6)
    # In bfloat16 the logits' gradient is rounded before the cotangent scales it here and
    # after it does there: the two agree to within a rounding step of bfloat16 (2⁻⁸ relative),
    # here 2⁻⁷ of the largest entry.
    tolerance = 1e-5 if dtype is None else 2**-7
    for got, want in zip(gradients, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=tolerance * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_matmuls_stay_close_to_float32(cell):
    """precision="bfloat16" rounds matmul operands to 8 significant bits and keeps float32
    state and accumulation: logits and gradients stay within bfloat16 rounding of float32,
    yet are not identical to them (the rounding did happen)."""
    config, params, tokens, state = setup(cell, batch=4, time=12, hidden_size=32, vocab_size=40)
    rounded = model.ModelConfig(**{**config.to_dict(), "precision": "bfloat16"})
    targets = np.random.default_rng(2).integers(0, config.vocab_size, tokens.shape)

    def loss(p, c):
        logits, _ = model.apply(p, tokens, as_f32(state), c)
        return cross_entropy(logits, targets), logits

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g32, logits32), (g16, logits16) = grad(params, config), grad(params, rounded)
    assert logits16.dtype == jnp.float32
    scale = np.abs(logits32).max()
    assert 0 < np.abs(logits16 - logits32).max() < 3e-2 * scale
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        a, b = np.ravel(a), np.ravel(b)
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.995, cosine


# ---------------------------------------------------------------------------------------------
# 4. Initialisation.


@pytest.mark.parametrize("cell", CELLS)
def test_init_shapes_and_biases(cell):
    config = model.ModelConfig(cell=cell, **SMALL)
    params = model.init(jax.random.key(0), config)
    hidden, vocab, embed = config.hidden_size, config.vocab_size, config.embed_size
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    assert params["embed"].shape == (vocab, embed)
    assert params["head"]["w"].shape == (hidden, vocab)
    assert params["head"]["b"].shape == (vocab,) and not np.any(params["head"]["b"])
    assert len(params["layers"]) == config.layers
    bound = hidden**-0.5
    for n, layer in enumerate(params["layers"]):
        expected_keys = {"w_x", "w_h", "b"} | ({"b_hn"} if cell == "gru" else set())
        assert set(layer) == expected_keys
        assert layer["w_x"].shape == ((embed if n == 0 else hidden), gates * hidden)
        assert layer["w_h"].shape == (hidden, gates * hidden)
        assert layer["b"].shape == (gates * hidden,)
        for w in (layer["w_x"], layer["w_h"]):
            assert np.all(np.abs(w) <= bound) and np.std(w) > 0.2 * bound
        bias = np.asarray(layer["b"])
        if cell == "lstm":
            # Gates in order i, f, g, o: the forget gate's bias is 1, the rest 0.
            np.testing.assert_array_equal(bias[hidden : 2 * hidden], 1.0)
            np.testing.assert_array_equal(np.delete(bias, np.s_[hidden : 2 * hidden]), 0.0)
        else:
            np.testing.assert_array_equal(bias, 0.0)
        if cell == "gru":
            assert layer["b_hn"].shape == (hidden,) and not np.any(layer["b_hn"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # Every weight matrix gets its own key: no two are equal.
    weights = [np.asarray(p).ravel()[:4] for p in jax.tree.leaves(params) if p.ndim == 2]
    assert len({w.tobytes() for w in weights}) == len(weights)


def test_lstm_forget_bias_is_the_second_gate():
    """Behavioural check of the gate order: with all weights zero and only the init biases,
    σ(f) = σ(1) keeps that fraction of c, and σ(i)tanh(g) = 0.5·tanh(0) adds nothing."""
    config = model.ModelConfig(cell="lstm", **SMALL)
    params = model.init(jax.random.key(0), config)
    layer = jax.tree.map(jnp.zeros_like, params["layers"][0]) | {"b": params["layers"][0]["b"]}
    c = jnp.linspace(-2, 2, BATCH * config.hidden_size).reshape(BATCH, config.hidden_size)
    h = jnp.zeros_like(c)
    x_proj = jnp.broadcast_to(layer["b"], (BATCH, 4 * config.hidden_size))
    (_, c_new), _ = recurrence.lstm_cell((h, c), x_proj, h @ layer["w_h"])
    np.testing.assert_allclose(c_new, c / (1 + math.exp(-1)), rtol=1e-6)


def test_model_config_rejects_bad_values():
    with pytest.raises(CharlmError, match="--cell must be one of lstm, gru, rnn"):
        model.ModelConfig(vocab_size=5, cell="transformer")
    with pytest.raises(CharlmError, match="--vocab-size must be at least 1"):
        model.ModelConfig(vocab_size=0)
    with pytest.raises(CharlmError, match=r"--dropout must be in \[0, 1\), got 1.0"):
        model.ModelConfig(vocab_size=5, dropout=1.0)
    with pytest.raises(CharlmError, match="--dropout must be a finite number"):
        model.ModelConfig(vocab_size=5, dropout=float("nan"))
    with pytest.raises(CharlmError, match="--precision must be one of float32, bfloat16"):
        model.ModelConfig(vocab_size=5, precision="auto")
    assert model.ModelConfig(vocab_size=5, precision="bfloat16").dtype == jnp.bfloat16
    assert model.ModelConfig(vocab_size=5).dtype is None
    config = model.ModelConfig(vocab_size=5, cell="gru", dropout=0.25)
    assert model.ModelConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------------------------------------
# 5. Regularisation: dropout masks and the tied head.

REGULARISED = dict(dropout=0.5, input_dropout=0.3, embed_dropout=0.4, weight_drop=0.5)


def test_dropout_masks_are_inverted_locked_and_drawn_from_the_key():
    """Each mask holds 0 or 1/keep, drops about its rate, has no time axis (locked: one mask
    per stream for the whole window), and is a function of the key alone; layers get their
    own masks."""
    sizes = dict(vocab_size=400, embed_size=30, hidden_size=40, layers=2)
    config = model.ModelConfig(cell="gru", **sizes, **REGULARISED)
    masks = regularisation.dropout_masks(jax.random.key(0), config, 50)
    expected = {
        "embed": ((400, 1), config.embed_dropout),
        "inputs": ((50, 30), config.input_dropout),
        "outputs": ((50, 40), config.dropout),
        "w_h": ((40, 120), config.weight_drop),
    }
    for name, (shape, rate) in expected.items():
        entries = getattr(masks, name)
        entries = entries if isinstance(entries, tuple) else (entries,)
        for mask in entries:
            mask = np.asarray(mask)
            assert mask.shape == shape, name
            keep = 1 - rate
            assert np.all(np.isclose(mask, 0) | np.isclose(mask, 1 / keep)), name
            assert abs(np.mean(mask == 0) - rate) < 0.1, (name, np.mean(mask == 0))
    assert not np.array_equal(masks.outputs[0], masks.outputs[1])
    assert not np.array_equal(masks.w_h[0], masks.w_h[1])
    again = regularisation.dropout_masks(jax.random.key(0), config, 50)
    other = regularisation.dropout_masks(jax.random.key(1), config, 50)
    for a, b, c in zip(jax.tree.leaves(masks), jax.tree.leaves(again), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    plain = model.ModelConfig(cell="gru", **sizes)
    assert not regularisation.is_regularised(plain)
    assert jax.tree.leaves(regularisation.dropout_masks(jax.random.key(0), plain, 50)) == []


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "rates", [REGULARISED, dict(embed_dropout=0.4, weight_drop=0.5)], ids=["all", "no-input"]
)
def test_masked_forward_matches_numpy_reference(cell, rates):
    """Each mask lands where it should (embedding rows, the first layer's input per stream,
    W_h, every layer's output per stream, the same at every time step), against the NumPy
    reference; without input dropout the embedding table is projected whole, as untrained."""
    config, params, tokens, state = setup(cell, **rates)
    masks = regularisation.dropout_masks(jax.random.key(4), config, BATCH)
    expected_logits, expected_state = np_forward(to_f64(params), tokens, state, cell, to_f64(masks))
    logits, new_state = apply(params, jnp.asarray(tokens), as_f32(state), config, masks)
    assert_close(logits, expected_logits)
    assert_close(new_state, expected_state)
    plain, _ = apply(params, jnp.asarray(tokens), as_f32(state), config)
    assert not np.allclose(logits, plain, atol=1e-3)


@pytest.mark.parametrize("embed_size", [6, 5], ids=["same-size", "projected"])
def test_tied_head_is_the_embedding(embed_size):
    """A tied head's weight is the embedding, transposed, after a projection when the hidden
    size (6) differs; the head's gradient reaches rows of characters that were never read."""
    config, params, tokens, state = setup("lstm", embed_size=embed_size, tie_embeddings=True)
    assert "w" not in params["head"]
    assert ("proj" in params["head"]) == (embed_size != config.hidden_size)
    expected_logits, expected_state = np_forward(to_f64(params), tokens, state, "lstm")
    logits, new_state = apply(params, jnp.asarray(tokens), as_f32(state), config)
    assert_close(logits, expected_logits)
    assert_close(new_state, expected_state)

    tokens = np.zeros_like(tokens)  # only character 0 is read; all are predicted
    targets = np.arange(tokens.size).reshape(tokens.shape) % config.vocab_size

    def loss(p):
        return cross_entropy(model.apply(p, tokens, as_f32(state), config)[0], targets)

    d_embed = np.asarray(jax.jit(jax.grad(loss))(params)["embed"])
    assert np.all(np.abs(d_embed[1:]).sum(axis=1) > 0)


def test_tied_embedding_starts_small():
    """Tied, the embedding is N(0, 1/embed), so the first logits are near 0 as an untied
    head's are; untied it is N(0, 1)."""
    sizes = dict(vocab_size=500, embed_size=64, hidden_size=64)
    tied = model.init(jax.random.key(0), model.ModelConfig(tie_embeddings=True, **sizes))
    untied = model.init(jax.random.key(0), model.ModelConfig(**sizes))
    assert np.std(tied["embed"]) == pytest.approx(64**-0.5, rel=0.05)
    assert np.std(untied["embed"]) == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------------------------------------
# 6. A small model memorises a short text.

PHRASE = "天下大势，分久必合。Long divided, all must unite. "


def test_small_model_overfits_a_repeated_phrase():
    assert len(PHRASE) == 40
    text = PHRASE * 40
    vocab = Vocabulary.from_text(text)
    tokens = vocab.encode(text)
    config = TrainConfig(
        hidden_size=48,
        embed_size=16,
        layers=1,
        batch_size=4,
        seq_len=40,
        lr=1e-2,
        warmup_steps=10,
        precision="float32",
        **dict.fromkeys(DROPOUTS, 0.0),
    )
    stream = BatchStream(tokens, config.batch_size, config.seq_len)
    steps = 200
    model_config = config.model_config(len(vocab))
    optimizer = make_optimizer(config)
    train_step = make_train_step(model_config, optimizer)
    state = init_state(model_config, optimizer, config.batch_size, seed=0)
    losses = []
    for step in range(steps):
        inputs, targets, reset = stream.batch(step)
        lr = learning_rate(step, config, steps)
        state, loss = train_step(state, inputs, targets, reset, lr)
        losses.append(float(loss))
    uniform = math.log(len(vocab))
    assert losses[0] == pytest.approx(uniform, rel=0.1)  # starts near a uniform guess
    # A uniform guess scores ln(V) ≈ 3.2 nats here. The phrase is deterministic given its
    # context, so a model that has memorised it predicts nearly every character with
    # probability near 1; 0.1 nats means a mean probability of e^-0.1 ≈ 0.9 on the right
    # character, far below anything a character-frequency model could do (≈ 3 nats).
    assert np.mean(losses[-10:]) < 0.1, losses[-10:]
