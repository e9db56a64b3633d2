"""The bidirectional tagger: its layers against an independent float64 NumPy reference, the
mirror symmetry of its two directions, padding, gradients against finite differences, and a
rule that only right context can learn."""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from charlm.errors import CharlmError
from charlm.punctuation import model as tagger
from charlm.punctuation.model import TaggerConfig

CELLS = ["lstm", "gru", "rnn"]
SMALL = dict(vocab_size=7, num_labels=3, embed_size=4, hidden_size=5, layers=2)
BATCH, TIME = 3, 6


@partial(jax.jit, static_argnums=2)
def features_and_logits(params, tokens, config, lengths=None):
    """Batch-first features and logits, compiled once per config."""
    x = tagger.features(params, jnp.swapaxes(tokens, 0, 1), config, lengths)
    return jnp.swapaxes(x, 0, 1), tagger.apply(params, tokens, config, lengths)


def setup(cell, seed=0, bidirectional=True, batch=BATCH, time=TIME, **sizes):
    config = TaggerConfig(cell=cell, bidirectional=bidirectional, **{**SMALL, **sizes})
    params = tagger.init(jax.random.key(seed), config)
    rng = np.random.default_rng(seed)
    # Non-zero biases, so that a bias applied in the wrong place or not at all shows.
    params = jax.tree.map(
        lambda p: np.asarray(p) + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params
    )
    tokens = rng.integers(0, config.vocab_size, (batch, time))
    return config, params, tokens


# ---------------------------------------------------------------------------------------------
# An independent float64 NumPy reference, from the cells' equations: x W_x + b inside each
# step, gates in the order i, f, g, o (LSTM) and r, z, n (GRU, with b_hn inside r ⊙ (…)).


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_step(cell, layer, state, x):
    h = state[0]
    size = h.shape[-1]
    x_proj = x @ layer["w_x"] + layer["b"]
    h_proj = h @ layer["w_h"]
    gate = [slice(k * size, (k + 1) * size) for k in range(4)]
    if cell == "lstm":
        a = x_proj + h_proj
        i, f, g, o = (a[:, s] for s in gate)
        c = sigmoid(f) * state[1] + sigmoid(i) * np.tanh(g)
        return (sigmoid(o) * np.tanh(c), c)
    if cell == "gru":
        r = sigmoid(x_proj[:, gate[0]] + h_proj[:, gate[0]])
        z = sigmoid(x_proj[:, gate[1]] + h_proj[:, gate[1]])
        n = np.tanh(x_proj[:, gate[2]] + r * (h_proj[:, gate[2]] + layer["b_hn"]))
        return ((1.0 - z) * n + z * h,)
    return (np.tanh(x_proj + h_proj),)


def np_direction(cell, layer, x):
    """One direction over x (batch, time, ·) from the zero state: h at every step."""
    batch, time, _ = x.shape
    size = layer["w_h"].shape[0]
    state = tuple(np.zeros((batch, size)) for _ in range(2 if cell == "lstm" else 1))
    outputs = []
    for t in range(time):
        state = np_step(cell, layer, state, x[:, t])
        outputs.append(state[0])
    return np.stack(outputs, axis=1)


def np_tagger(params, tokens, cell, bidirectional):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = params["embed"][tokens]
    for layer in params["layers"]:
        parts = [np_direction(cell, layer["forward"], x)]
        if bidirectional:
            parts.append(np_direction(cell, layer["backward"], x[:, ::-1])[:, ::-1])
        x = np.concatenate(parts, axis=-1)
    return x, x @ params["head"]["w"] + params["head"]["b"]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_layers_match_numpy_reference(cell, bidirectional):
    config, params, tokens = setup(cell, bidirectional=bidirectional)
    expected_features, expected_logits = np_tagger(params, tokens, cell, bidirectional)
    x, logits = features_and_logits(params, jnp.asarray(tokens), config)
    assert x.shape == (BATCH, TIME, config.output_size)
    assert config.output_size == (2 if bidirectional else 1) * config.hidden_size
    assert logits.shape == (BATCH, TIME, config.num_labels) and logits.dtype == jnp.float32
    np.testing.assert_allclose(x, expected_features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_reversing_the_sequence_mirrors_the_directions(cell):
    """For a 1-layer model with outputs [F(x), B(x)] (forward half, backward half, each
    (batch, time, hidden)), let p' be its parameters with its two directions swapped. Then
    F_p'(rev x)[t] = B_p(x)[T-1-t] and B_p'(rev x)[t] = F_p(x)[T-1-t] for every t: the
    forward direction's output on the reversed sequence is the backward direction's output on
    the sequence, reversed, and the other way round."""
    config, params, tokens = setup(cell, layers=1)
    layer = params["layers"][0]
    swapped = {**params, "layers": [{"forward": layer["backward"], "backward": layer["forward"]}]}
    x, _ = features_and_logits(params, jnp.asarray(tokens), config)
    mirrored, _ = features_and_logits(swapped, jnp.asarray(tokens[:, ::-1]), config)
    forward, backward = np.split(np.asarray(x), 2, axis=-1)
    mirrored_forward, mirrored_backward = np.split(np.asarray(mirrored), 2, axis=-1)
    np.testing.assert_allclose(mirrored_forward, backward[:, ::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mirrored_backward, forward[:, ::-1], rtol=1e-6, atol=1e-6)
    # And the two directions differ, so the equalities above are not those of a symmetric x.
    assert not np.allclose(forward, backward, atol=1e-3)


def test_lengths_keep_padding_out_of_the_backward_direction():
    config, params, tokens = setup("lstm", batch=2)
    lengths = np.array([TIME, 3])
    weights = np.arange(TIME)[None, :] < lengths[:, None]
    other_padding = np.where(weights, tokens, (tokens + 1) % config.vocab_size)
    x, _ = features_and_logits(params, jnp.asarray(tokens), config, jnp.asarray(lengths))
    x_other, _ = features_and_logits(
        params, jnp.asarray(other_padding), config, jnp.asarray(lengths)
    )
    labels = np.random.default_rng(1).integers(0, config.num_labels, tokens.shape)
    losses = []
    for row, length in enumerate(lengths):
        alone, logits = features_and_logits(params, tokens[row : row + 1, :length], config)
        np.testing.assert_allclose(x[row, :length], alone[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x_other[row, :length], alone[0], rtol=1e-5, atol=1e-6)
        a = np.asarray(logits[0], np.float64)
        log_p = a - np.log(np.exp(a).sum(axis=-1, keepdims=True))
        losses.extend(-log_p[np.arange(length), labels[row, :length]])
    # Without lengths the backward direction reads the padding first: the outputs change.
    unmasked, _ = features_and_logits(params, jnp.asarray(other_padding), config)
    assert not np.allclose(unmasked[1, :3], x[1, :3], atol=1e-3)
    # The weighted loss is the mean over the real positions of each sequence run alone.
    masked = jax.jit(tagger.loss, static_argnums=3)(
        params, tokens, labels, config, weights.astype(np.float32), lengths
    )
    assert float(masked) == pytest.approx(np.mean(losses), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients against central finite differences, in float64.


@contextlib.contextmanager
def x64():
    """64-bit JAX inside the block only (jax.enable_x64 from jax 0.7; jax.experimental's before)."""
    manager = getattr(jax, "enable_x64", None)
    if manager is None:
        manager = jax.experimental.enable_x64
    with manager(True):
        yield


@pytest.mark.parametrize("cell", CELLS)
def test_loss_gradients_match_finite_differences(cell):
    sizes = dict(vocab_size=5, num_labels=3, embed_size=3, hidden_size=4, layers=2)
    config, params, tokens = setup(cell, seed=3, batch=2, time=5, **sizes)
    labels = np.random.default_rng(4).integers(0, config.num_labels, tokens.shape)
    lengths = np.array([5, 3])
    # Zero weight on the padding, and uneven weights elsewhere, so that both count.
    weights = (np.arange(5)[None, :] < lengths[:, None]) * np.array([[1.0, 2.0, 1.0, 0.5, 1.0]])
    with x64():
        leaves, treedef = jax.tree.flatten(
            jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        )

        # One compiled function, for the gradient and the differences alike.
        @jax.jit
        @jax.value_and_grad
        def loss(leaves):
            p = jax.tree.unflatten(treedef, leaves)
            return tagger.loss(p, tokens, labels, config, weights, lengths)

        grads = jax.device_get(loss(leaves)[1])
        assert all(g.dtype == np.float64 for g in grads)
        rng = np.random.default_rng(5)
        eps = 1e-6
        for n, leaf in enumerate(leaves):
            for _ in range(3):
                index = tuple(int(rng.integers(s)) for s in leaf.shape)
                if n == 0:  # the embedding: only the rows of tokens read have a gradient
                    index = (int(rng.choice(tokens[:, :3].ravel())), index[1])

                def shifted(delta, n=n, index=index):
                    moved = list(leaves)
                    moved[n] = leaves[n].copy()
                    moved[n][index] += delta
                    return float(loss(moved)[0])

                numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
                assert float(grads[n][index]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), (
                    n,
                    index,
                )


def batch_first_features(params, tokens, config, masks=None):
    return jnp.swapaxes(
        tagger.features(params, jnp.swapaxes(tokens, 0, 1), config, None, masks), 0, 1
    )


@pytest.mark.parametrize("rate", ["dropout", "embed_dropout", "weight_drop"])
def test_dropout_masks_do_what_each_kind_says(rate):
    """On a one-layer tagger: output dropout scales each direction's outputs unit by unit with
    one mask per sequence for all its time steps; embedding dropout zeroes whole characters'
    rows; weight drop masks each direction's W_h. The directions draw their own masks."""
    config, params, tokens = setup("lstm", layers=1, **{rate: 0.5})
    plain = dataclasses.replace(config, **{rate: 0.0})
    assert tagger.training_masks(jax.random.key(1), plain, BATCH) is None
    masks = tagger.training_masks(jax.random.key(1), config, BATCH)
    assert masks is not None and len(masks) == 2
    dropped = batch_first_features(params, tokens, config, masks)
    if rate == "dropout":
        first, second = (m.outputs[0] for m in masks)
        assert first.shape == (BATCH, config.hidden_size)
        assert not np.array_equal(first, second)
        scale = jnp.concatenate([first, second], axis=-1)[:, None, :]
        expected = batch_first_features(params, tokens, plain) * scale
    elif rate == "embed_dropout":
        assert masks[0].embed.shape == (config.vocab_size, 1)
        expected = batch_first_features(
            {**params, "embed": params["embed"] * masks[0].embed}, tokens, plain
        )
    else:
        layer = {
            name: {**params["layers"][0][name], "w_h": params["layers"][0][name]["w_h"] * m.w_h[0]}
            for name, m in zip(config.directions, masks)
        }
        assert not np.array_equal(masks[0].w_h[0], masks[1].w_h[0])
        expected = batch_first_features({**params, "layers": [layer]}, tokens, plain)
    np.testing.assert_allclose(dropped, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(dropped, batch_first_features(params, tokens, plain), atol=1e-3)


def test_bfloat16_stays_close_to_float32():
    config, params, tokens = setup("lstm")
    _, logits = features_and_logits(params, jnp.asarray(tokens), config)
    bf16 = dataclasses.replace(config, precision="bfloat16")
    _, rounded = features_and_logits(params, jnp.asarray(tokens), bf16)
    assert rounded.dtype == jnp.float32
    assert not np.array_equal(rounded, logits)
    np.testing.assert_allclose(rounded, logits, atol=0.1)


def test_config_and_parameters():
    config = TaggerConfig(
        vocab_size=9, num_labels=4, cell="gru", layers=2, hidden_size=6, embed_size=3
    )
    assert TaggerConfig.from_dict(config.to_dict()) == config
    # Shapes only: eval_shape runs nothing.
    params = jax.eval_shape(partial(tagger.init, config=config), jax.random.key(0))
    assert params["layers"][0]["backward"]["w_x"].shape == (3, 18)
    assert params["layers"][1]["forward"]["w_x"].shape == (12, 18)
    assert params["layers"][1]["backward"]["b_hn"].shape == (6,)
    assert params["head"]["w"].shape == (12, 4)
    one_way = dataclasses.replace(config, bidirectional=False)
    one_way_params = jax.eval_shape(partial(tagger.init, config=one_way), jax.random.key(0))
    assert [set(layer) for layer in one_way_params["layers"]] == [{"forward"}] * 2
    assert one_way_params["layers"][1]["forward"]["w_x"].shape == (6, 18)
    assert one_way_params["head"]["w"].shape == (6, 4)
    lstm = TaggerConfig(vocab_size=9, num_labels=4, layers=1, hidden_size=6)
    biases = jax.jit(tagger.init, static_argnums=1)(jax.random.key(0), lstm)["layers"][0]
    for direction in ("forward", "backward"):
        expected = np.zeros(24)
        expected[6:12] = 1.0  # the forget gate, the second of i, f, g, o
        np.testing.assert_array_equal(biases[direction]["b"], expected)
    for bad in (dict(num_labels=1), dict(cell="transformer"), dict(precision="float16")):
        with pytest.raises(CharlmError, match=f"--{next(iter(bad)).replace('_', '-')} must be"):
            dataclasses.replace(config, **bad)


# ---------------------------------------------------------------------------------------------
# A rule that needs right context: the label of a position is 1 iff the next character is 0.

ALPHABET, RULE_TIME, RULE_BATCH, RULE_STEPS = 4, 20, 32, 200


def rule_data(rng, batch):
    tokens = rng.integers(0, ALPHABET, (batch, RULE_TIME))
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:] == 0
    return tokens, labels


def train_on_rule(bidirectional):
    """A 1-layer LSTM tagger trained with Adam on fresh sequences: its predictions on held-out
    sequences, and their labels."""
    config = TaggerConfig(
        vocab_size=ALPHABET,
        num_labels=2,
        layers=1,
        hidden_size=16,
        embed_size=8,
        bidirectional=bidirectional,
    )
    optimizer = optax.adam(0.02)
    params = jax.jit(partial(tagger.init, config=config))(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens, labels = rule_data(rng, RULE_STEPS * RULE_BATCH)
    batches = tuple(a.reshape(RULE_STEPS, RULE_BATCH, RULE_TIME) for a in (tokens, labels))

    def step(carry, batch):
        params, opt_state = carry
        grads = jax.grad(tagger.loss)(params, *batch, config)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    train = jax.jit(lambda carry, batches: jax.lax.scan(step, carry, batches)[0])
    params, _ = train((params, optimizer.init(params)), batches)
    tokens, labels = rule_data(np.random.default_rng(1), 256)
    logits = jax.jit(partial(tagger.apply, config=config))(params, tokens)
    predictions = np.asarray(jnp.argmax(logits, axis=-1))
    return predictions, labels


def test_only_the_bidirectional_tagger_learns_a_rule_of_right_context():
    predictions, labels = train_on_rule(bidirectional=True)
    positive = labels == 1
    assert (predictions == labels).mean() > 0.95
    assert (predictions[positive] == 1).mean() > 0.9
    # Without the backward direction the next character is unseen and, being uniform, each
    # position is positive with probability 1/4 whatever came before: the best a forward-only
    # tagger can do is to say "no mark" nearly everywhere.
    predictions, labels = train_on_rule(bidirectional=False)
    positive = labels == 1
    assert (predictions[positive] == 1).mean() < 0.6
    assert (predictions == labels).mean() < 0.85
