"""A bidirectional recurrent tagger: one label per character, from the characters on both sides.

Which marks follow a character (`charlm.punctuation.marks`) depends on what comes after it as much as
on what came before. A bidirectional recurrent network (Schuster & Paliwal 1997) runs one
recurrence forward over time and another over the reversed sequence, and joins their outputs at
each position, so that every position sees its whole sequence. Layers stack (a deep BiRNN,
Graves et al. 2013), each reading both directions of the layer below; a linear head makes the
labels' logits. With `bidirectional=False` only the forward recurrence runs: the same network
without right context, the baseline that shows what the backward direction adds.

A tagger is trained on one book, which its parameters can learn by heart long before its marks
generalise, so it is regularised as the language model is (`charlm.lm.dropout`, after
AWD-LSTM): whole characters dropped from the embedding, variational dropout on every layer's
output, and DropConnect on each direction's recurrent matrix. Each direction draws its own
masks.

Parameters are a plain pytree and every function is pure, as in `charlm.lm.model`, whose
`run_layer` (and through it the cells and the hand-written gradient of `charlm.lm.recurrence`)
runs each direction. Each direction starts from the zero state: a tagger reads whole sequences
and carries no state from one call to the next.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from charlm.lm.config import MODEL_RULES, ModelConfig
from charlm.lm.dropout import DropoutMasks, apply_mask, dropout_masks, is_regularised
from charlm.lm.matmul import PRECISIONS, matmul
from charlm.lm.model import run_layer
from charlm.lm.recurrence import GATES, STATE_PARTS
from charlm.training.config import at_least, check, shared_fields

Params = dict[str, Any]
DIRECTIONS = ("forward", "backward")
TAGGER_RULES = {**MODEL_RULES, "num_labels": at_least(2)}


@dataclass(frozen=True)
class TaggerConfig:
    """The shape of a tagger: `layers` recurrent layers of `hidden_size` per direction over an
    embedding of `embed_size`, and a head to `num_labels` classes; and its regularisation in
    training, as `charlm.lm.model.ModelConfig`'s: `dropout` on every layer's output,
    `embed_dropout` of whole characters, `weight_drop` on the recurrent matrices."""

    vocab_size: int
    num_labels: int
    cell: str = "lstm"
    layers: int = 2
    hidden_size: int = 128
    embed_size: int = 64
    bidirectional: bool = True
    precision: str = "float32"
    dropout: float = 0.0
    embed_dropout: float = 0.0
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        check(self, TAGGER_RULES)

    @property
    def dtype(self) -> Any:
        """The operand type of the tagger's matmuls, as `ModelConfig.dtype`."""
        return PRECISIONS[self.precision]

    @property
    def layer_config(self) -> ModelConfig:
        """The language model's config with which `model.run_layer` runs one direction."""
        return ModelConfig(**shared_fields(self, ModelConfig))

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions each layer runs: forward, and backward when bidirectional."""
        return DIRECTIONS if self.bidirectional else DIRECTIONS[:1]

    @property
    def output_size(self) -> int:
        """The width of each layer's output: the directions' outputs side by side."""
        return len(self.directions) * self.hidden_size

    def describe(self) -> str:
        """The cell, direction and layers' shape, as the log and listings name a tagger:
        "BiLSTM 2×256" (the hidden size per direction), or "LSTM 2×256" forward only."""
        return f"{'Bi' if self.bidirectional else ''}{self.cell.upper()} {self.layers}×{self.hidden_size}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaggerConfig:
        return cls(**data)


def init(key: jax.Array, config: TaggerConfig) -> Params:
    """Random parameters, as `charlm.lm.model.init` makes a language model's: per layer and
    direction, w_x, w_h and b (and the GRU's b_hn), the weights uniform in ±1/√hidden as in
    PyTorch, the biases 0 but the LSTM's forget gate's, 1; an N(0, 1) embedding; a head w
    (output_size, num_labels), uniform in ±1/√output_size as PyTorch's Linear, and b, 0."""
    hidden, gates = config.hidden_size, GATES[config.cell]
    keys = iter(jax.random.split(key, 2 * config.layers * len(config.directions) + 2))

    def uniform(shape: tuple[int, ...], size: int) -> jax.Array:
        bound = size**-0.5
        return jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound)

    def direction(fan_in: int) -> Params:
        bias = jnp.zeros(gates * hidden, jnp.float32)
        if config.cell == "lstm":
            bias = bias.at[hidden : 2 * hidden].set(1.0)
        layer = {
            "w_x": uniform((fan_in, gates * hidden), hidden),
            "w_h": uniform((hidden, gates * hidden), hidden),
            "b": bias,
        }
        if config.cell == "gru":
            layer["b_hn"] = jnp.zeros(hidden, jnp.float32)
        return layer

    layers = [
        {
            name: direction(config.embed_size if n == 0 else config.output_size)
            for name in config.directions
        }
        for n in range(config.layers)
    ]
    embed = jax.random.normal(next(keys), (config.vocab_size, config.embed_size), jnp.float32)
    head = {
        "w": uniform((config.output_size, config.num_labels), config.output_size),
        "b": jnp.zeros(config.num_labels, jnp.float32),
    }
    return {"embed": embed, "layers": layers, "head": head}


def training_masks(
    key: jax.Array, config: TaggerConfig, batch_size: int
) -> tuple[DropoutMasks, ...] | None:
    """The dropout masks of one training step of `batch_size` windows, drawn from `key`: one
    set per direction, as `charlm.lm.dropout.dropout_masks` draws a language model's (the
    first direction's embedding mask is the one used); None when the config drops nothing."""
    if not is_regularised(config.layer_config):
        return None
    keys = jax.random.split(key, len(config.directions))
    return tuple(dropout_masks(k, config.layer_config, batch_size) for k in keys)


def reverse_time(x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """x (time, batch, …) with its time axis reversed; with `lengths` (batch,) only each
    sequence's first `lengths` steps are, and the padding after them stays in place, so that
    the backward direction reads a sequence's last character first, whatever its padding.
    Its own inverse."""
    if lengths is None:
        return jnp.flip(x, axis=0)
    time = jnp.arange(x.shape[0])[:, None]
    order = jnp.where(time < lengths, lengths - 1 - time, time)
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=0)


def run_direction(
    config: TaggerConfig,
    layer: Params,
    x: jax.Array,
    reverse: bool,
    lengths: jax.Array | None = None,
    w_h_mask: jax.Array | None = None,
) -> jax.Array:
    """One direction of a layer over its input x (time, batch, ·), from the zero state: its
    outputs (time, batch, hidden). The backward direction (`reverse`, Schuster & Paliwal 1997)
    runs the recurrence over the time-reversed input and reverses its outputs back, so that
    the output at t summarises the input from t to the sequence's end. A weight-drop mask
    applies to the direction's W_h."""
    if reverse:
        x = reverse_time(x, lengths)
    x_proj = matmul(x, layer["w_x"], config.dtype)
    shape = (x.shape[1], config.hidden_size)
    state = tuple(jnp.zeros(shape, x_proj.dtype) for _ in range(STATE_PARTS[config.cell]))
    outputs, _ = run_layer(config.layer_config, layer, x_proj, state, w_h_mask)
    return reverse_time(outputs, lengths) if reverse else outputs


def features(
    params: Params,
    tokens: jax.Array,
    config: TaggerConfig,
    lengths: jax.Array | None = None,
    masks: tuple[DropoutMasks, ...] | None = None,
) -> jax.Array:
    """The last layer's outputs (time, batch, output_size) for integer tokens (time, batch),
    time-major as the scans run: a deep bidirectional RNN (Schuster & Paliwal 1997), each layer
    its directions' outputs side by side, forward first. `lengths` (batch,), when sequences
    are padded at the end, keeps the padding out of the backward direction's outputs. `masks`
    (training, `training_masks`) drop characters, outputs and recurrent weights."""
    embed = params["embed"] if masks is None else apply_mask(params["embed"], masks[0].embed)
    x = embed[tokens]
    for n, layer in enumerate(params["layers"]):
        outputs = []
        for d, name in enumerate(config.directions):
            w_h_mask = None if masks is None else masks[d].w_h[n]
            out = run_direction(config, layer[name], x, name == "backward", lengths, w_h_mask)
            outputs.append(out if masks is None else apply_mask(out, masks[d].outputs[n]))
        x = jnp.concatenate(outputs, axis=-1)
    return x


def apply(
    params: Params,
    tokens: jax.Array,
    config: TaggerConfig,
    lengths: jax.Array | None = None,
    masks: tuple[DropoutMasks, ...] | None = None,
) -> jax.Array:
    """Logits (batch, time, num_labels) for integer tokens (batch, time): the bidirectional
    RNN of Schuster & Paliwal (1997), `features` (with dropout `masks` in training), and the
    linear head."""
    x = features(params, jnp.swapaxes(tokens, 0, 1), config, lengths, masks)
    logits = matmul(x, params["head"]["w"], config.dtype) + params["head"]["b"]
    return jnp.swapaxes(logits, 0, 1)


def loss(
    params: Params,
    tokens: jax.Array,
    labels: jax.Array,
    config: TaggerConfig,
    weights: jax.Array | None = None,
    lengths: jax.Array | None = None,
    masks: tuple[DropoutMasks, ...] | None = None,
) -> jax.Array:
    """The mean cross-entropy, in nats, of the labels (batch, time) under `apply`'s logits (the
    BRNN of Schuster & Paliwal 1997): the mean over positions weighted by `weights` (batch,
    time), whose 0s leave out padding; 0 where every weight is 0. The padding reaches the
    backward direction's outputs unless `lengths` are given too. `masks` are training's
    dropout."""
    logits = apply(params, tokens, config, lengths, masks)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return jnp.mean(losses)
    total = jnp.sum(weights)
    return jnp.sum(weights * losses) / jnp.where(total > 0, total, 1)
