"""Training throughput and model FLOPs utilisation (MFU) of GPT-2 small on one GPU, under JAX.

    KERAS_BACKEND=jax python bench/gpt_mfu.py                      # H100: GPT-2 small, batch 16 x 1024
    KERAS_BACKEND=jax python bench/gpt_mfu.py --batch 32 --peak-tflops 989
    KERAS_BACKEND=jax python bench/gpt_mfu.py --loop jax --logits bfloat16 --vocab 50304
    KERAS_BACKEND=jax python bench/gpt_mfu.py --smoke              # tiny sizes, seconds on a CPU

The GPT-2 small shape (12 layers, 12 heads, width 768, vocabulary 50,257, 124,439,808
parameters at context 1024) from trainer.models.gpt, under `mixed_bfloat16`, compiled with
AdamW and `jit_compile=True`, trained on random token batches: `--warmup` steps (the first
compiles), then `--steps` timed steps. `--loop` picks how the steps are driven:
- `train_on_batch`: Keras' `train_on_batch`, which reads the loss back as a Python float after
  each step, so the device idles while Python prepares the next step;
- `fit`: `model.fit` over the batches, as `kcp train` drives training (its callbacks are
  dispatched asynchronously under JAX, so steps queue up on the device);
- `jax`: one `jax.jit` step from Keras' stateless API (`stateless_call`, the optimizer's
  `stateless_apply`), buffers donated, as in Keras' "training loop from scratch in JAX" guide.
Every loop ends by reading the last step's loss, which depends on every earlier step, so the
clock measures finished work. `--logits bfloat16` keeps the output layer's logits in bf16 (the
loss still computes in float32, inside the same XLA program): the float32 logits of a batch of
16 x 1024 x 50,304 are 3.3 GB written and read each step.

Model FLOPs per token (nanoGPT's and PaLM's estimate, appendix B of Chowdhery et al. 2022):
6 x N + 12 x layers x context x width, where N counts the parameters that take part in
matmuls (all but the position table: the tied token matrix is also the output layer), and
the second term is the attention's score and value matmuls, forward and backward, counted
full (not halved for the causal mask). MFU = FLOPs per token x tokens/s / `--peak-tflops`
(989: H100 SXM dense bf16; 756 for H100 PCIe, 312 for A100).

It needs only Keras and JAX: this file imports trainer.models.gpt and trainer.models.common,
whose import chain never imports TensorFlow (the GPU machine has none); the last line says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

GPT2_VOCABULARY = 50_257
SMOKE = {"layers": 2, "heads": 2, "dim": 64, "vocab": 512, "context": 64, "batch": 4, "steps": 3, "warmup": 1}


def model_flops_per_token(*, parameters: int, position_parameters: int, layers: int, context: int,
                          width: int) -> int:
    """Training FLOPs per token: 6 x matmul parameters + 12 x layers x context x width (attention)."""
    return 6 * (parameters - position_parameters) + 12 * layers * context * width


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak dense bf16 TFLOP/s")
    parser.add_argument("--vocab", type=int, default=GPT2_VOCABULARY,
                        help="vocabulary; 50304 (padded to a multiple of 64, as nanoGPT does) shows the cost of 50257")
    parser.add_argument("--loop", choices=("train_on_batch", "fit", "jax"), default="train_on_batch",
                        help="how the steps are driven (see above)")
    parser.add_argument("--logits", choices=("float32", "bfloat16"), default="float32",
                        help="the dtype of the model's output logits")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script on a CPU in seconds")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from kcp.core.config_load import load_config
    from trainer.models.common import ModelInputs
    from trainer.models.gpt import build

    if args.smoke:
        args.batch, args.context, args.steps, args.warmup = (SMOKE[key] for key in ("batch", "context", "steps",
                                                                                   "warmup"))
        shape = [f"model.layers={SMOKE['layers']}", f"model.heads={SMOKE['heads']}", f"model.dim={SMOKE['dim']}"]
        vocab_size = SMOKE["vocab"]
    else:
        shape, vocab_size = ["model.size=gpt2-small"], args.vocab
    config = load_config([], ["model.name=gpt", "model.dropout=0.0", *shape]).model
    spec = ModelInputs("language", (args.context,), vocab_size, vocab_size=vocab_size, input_name="tokens")

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build(spec, config)  # unseeded: keras.utils.set_random_seed would import TensorFlow where installed
    if args.logits == "bfloat16":  # the same layers, without the final float32 cast
        model = keras.Model(model.inputs, model.get_layer("logits").input, name="gpt_bf16_logits")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=6e-4, weight_decay=0.1), loss=loss_fn,
                  jit_compile=True)
    parameters = model.count_params()
    flops_per_token = model_flops_per_token(
        parameters=parameters, position_parameters=args.context * config.dim, layers=config.layers,
        context=args.context, width=config.dim)
    tokens = np.random.default_rng(0).integers(3, vocab_size, size=(args.batch, args.context + 1)).astype("int32")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    device = keras.distribution.list_devices()[0]
    print(f"backend {keras.backend.backend()}, device {device}, policy {keras.mixed_precision.global_policy().name}")
    print(f"gpt {config.layers} layers, {config.heads} heads, width {config.dim}, vocabulary {vocab_size:,}, "
          f"{parameters:,} parameters; batch {args.batch} x context {args.context}; loop {args.loop}, "
          f"logits {model.outputs[0].dtype}")

    run_steps = {"train_on_batch": train_on_batch_loop, "fit": fit_loop, "jax": jax_loop}[args.loop]
    warmup_seconds, first_loss = run_steps(model, loss_fn, inputs, targets, args.warmup)
    seconds, loss = run_steps(model, loss_fn, inputs, targets, args.steps)
    tokens_per_second = args.steps * args.batch * args.context / seconds
    achieved_tflops = flops_per_token * tokens_per_second / 1e12
    print(f"warmup   {args.warmup} steps in {warmup_seconds:.1f} s (compile included), loss {first_loss:.3f}")
    print(f"timed    {args.steps} steps in {seconds:.2f} s: {1000 * seconds / args.steps:.1f} ms/step, "
          f"loss {loss:.3f}")
    print(f"tokens/s {tokens_per_second:,.0f}")
    print(f"FLOPs    {flops_per_token / 1e6:,.1f} MFLOP/token (6 x {parameters - args.context * config.dim:,} "
          f"+ 12 x {config.layers} x {args.context} x {config.dim}) -> {achieved_tflops:,.2f} TFLOP/s")
    print(f"MFU      {100 * achieved_tflops / args.peak_tflops:.2f}% of {args.peak_tflops:g} TFLOP/s peak")
    print(f"tensorflow imported: {'tensorflow' in sys.modules}")


def train_on_batch_loop(model, loss_fn, inputs, targets, steps: int) -> tuple[float, float]:
    """(seconds, last loss) of `steps` train_on_batch calls; each reads its loss back."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = float(model.train_on_batch(inputs, targets))
    return time.perf_counter() - start, loss


def fit_loop(model, loss_fn, inputs, targets, steps: int) -> tuple[float, float]:
    """(seconds, last loss) of one `model.fit` epoch of `steps` batches (the same batch repeated)."""
    import numpy as np

    batch = len(inputs)
    start = time.perf_counter()
    history = model.fit(np.tile(inputs, (steps, 1)), np.tile(targets, (steps, 1)), batch_size=batch, epochs=1,
                        shuffle=False, verbose=0)
    return time.perf_counter() - start, float(history.history["loss"][-1])


_JAX_STEP = {}


def jax_loop(model, loss_fn, inputs, targets, steps: int) -> tuple[float, float]:
    """(seconds, last loss) of `steps` calls of one jitted stateless training step; the model's
    variables are written back at the end."""
    import jax

    optimizer = model.optimizer
    if model not in _JAX_STEP:
        optimizer.build(model.trainable_variables)

        def compute_loss(trainable, non_trainable, x, y):
            logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, logits), non_trainable

        def step(state, x, y):
            trainable, non_trainable, optimizer_variables = state
            (loss, non_trainable), grads = jax.value_and_grad(compute_loss, has_aux=True)(
                trainable, non_trainable, x, y)
            trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, grads, trainable)
            return (trainable, non_trainable, optimizer_variables), loss

        _JAX_STEP[model] = jax.jit(step, donate_argnums=0)
    step = _JAX_STEP[model]
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    x, y = jax.numpy.asarray(inputs), jax.numpy.asarray(targets)
    start = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, x, y)
    loss = float(loss)  # the last step depends on every earlier one: all of them are done
    seconds = time.perf_counter() - start
    for variables, values in zip((model.trainable_variables, model.non_trainable_variables, optimizer.variables),
                                 state):
        for variable, value in zip(variables, values):
            variable.assign(value)
    return seconds, loss


if __name__ == "__main__":
    main()
