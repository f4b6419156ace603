"""The quantized-weight kernels against the fp32 reference: the gguf package's dequantize, then torch.mm."""

import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from foreseer.layers.quantized_linear import (
    WEIGHT_FORMATS,
    BlockWeight,
    QuantizedEmbedding,
    QuantizedLinear,
    choose_dataflows,
    load_kernels,
)

FORMATS = list(WEIGHT_FORMATS)
# Where each block keeps its float16 scale (and min) fields: random bytes there would be NaNs or huge values.
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 128, 255, 256, 300]


def random_weight(name: str, out_features: int, in_features: int, seed: int = 0) -> BlockWeight:
    """Random stored bytes of a `name` matrix: any quant values, float16 scales of a realistic size."""
    rng = np.random.default_rng(seed)
    fmt = WEIGHT_FORMATS[name]
    if name in ("F16", "BF16"):
        values = torch.from_numpy(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.1)
        data = values.to(torch.float16 if name == "F16" else torch.bfloat16).view(torch.uint8)
        return BlockWeight(data.contiguous(), fmt, in_features)
    blocks = rng.integers(0, 256, (out_features, in_features // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scales = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)
        blocks[..., offset:offset + 2] = scales[..., None].view(np.uint8)
    return BlockWeight(torch.from_numpy(blocks.reshape(out_features, -1)), fmt, in_features)


def reference_weight(weight: BlockWeight) -> torch.Tensor:
    """The weight as the gguf package dequantizes it (float32)."""
    data = weight.data.numpy()
    if weight.format.name == "F16":
        return torch.from_numpy(data.view(np.float16).astype(np.float32))
    values = gguf_dequantize(data, GGMLQuantizationType[weight.format.name])
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(weight.shape)


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias=None) -> None:
    """out == x W^T (+ b) up to float32 summation-order rounding: each element within 2e-5 of the sum of its
    terms' magnitudes (the classical bound is K * 6e-8 of it)."""
    x, weight = x.double().reshape(-1, weight.shape[1]), weight.double()
    exact = x @ weight.T + (0 if bias is None else bias.double())
    bound = 2e-5 * (x.abs() @ weight.abs().T) + 1e-7
    error = (out.double().reshape(exact.shape) - exact).abs()
    assert (error <= bound).all(), f"worst error {(error / bound).max().item():.2f}x the bound"


def _shape(name: str) -> tuple[int, int]:
    """An odd number of outputs; inputs of a few blocks (F16/BF16: not a multiple of 32, to reach the tail)."""
    block = WEIGHT_FORMATS[name].block_size
    return 37, (70 if block == 1 else 3 * block)


def test_kernels_build():
    assert load_kernels() is not None


def test_a_build_killed_midway_does_not_block_later_loads():
    """torch's lock file, left behind by a process killed while it compiled, would make every later load wait for
    it forever; the loader holds an flock instead and clears such a file."""
    import os
    import subprocess
    import sys

    from foreseer.extensions import build_directory
    from foreseer.layers import quantized_linear

    with open(quantized_linear._SOURCE, "rb") as file:
        directory = build_directory("foreseer_quantized_cpu", file.read(), ("-ffp-contract=off",))
    assert os.path.isdir(directory)  # the build test_kernels_build loaded
    open(os.path.join(directory, "lock"), "w").close()
    code = "from foreseer.layers.quantized_linear import load_kernels; assert load_kernels() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert not os.path.exists(os.path.join(directory, "lock"))


def test_a_build_names_no_checkout_so_checkouts_share_it():
    """torch rebuilds when a build's commands change: were the include path this checkout's package, checkouts at
    two paths would rebuild the shared build in turn, each waiting minutes on the other's lock."""
    import os

    from foreseer.extensions import build_directory
    from foreseer.layers import quantized_linear

    assert load_kernels() is not None
    with open(quantized_linear._SOURCE, "rb") as file:
        directory = build_directory("foreseer_quantized_cpu", file.read(), ("-ffp-contract=off",))
    with open(os.path.join(directory, "build.ninja")) as file:
        commands = file.read()
    package_root = os.path.dirname(os.path.abspath(quantized_linear.__file__)).rpartition(os.sep)[0]
    assert package_root not in commands and os.path.join(directory, "include") in commands
    assert os.path.exists(os.path.join(directory, "include", "layers", "csrc", "quantized.h"))


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_is_bit_identical_to_gguf(name):
    weight = random_weight(name, *_shape(name))
    assert torch.equal(weight.dequantize(), reference_weight(weight))


@pytest.mark.parametrize("name", FORMATS)
def test_flat_and_tiled_matmul_match_the_fp32_reference(name):
    out_features, in_features = _shape(name)
    weight = random_weight(name, out_features, in_features, seed=1)
    reference = reference_weight(weight)
    kernels = load_kernels()
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        assert_matmul_close(kernels.flat_matmul(x, weight.data, weight.format.ggml_type, in_features), x, reference)
        tiled = kernels.tiled_matmul(x, weight.data, weight.format.ggml_type, in_features, 16)
        assert_matmul_close(tiled, x, reference)


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q6_K"])
def test_large_weight_every_row_count(name):
    """A model-sized weight (576 inputs or 768 for K-quants), rows 1 to 300 through whichever dataflow is chosen."""
    in_features = 768 if WEIGHT_FORMATS[name].block_size == 256 else 576
    weight = random_weight(name, 515, in_features, seed=2)
    layer = QuantizedLinear([weight])
    reference = reference_weight(weight)
    for rows in range(1, 301, 13):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        for flat_max_rows in (0, 300):  # every row count both ways
            layer.flat_max_rows = flat_max_rows
            assert_matmul_close(layer(x), x, reference)


@pytest.mark.parametrize("name, in_features", [("Q8_0", 4128), ("F16", 3001)])
def test_many_rows_over_long_inputs(name, in_features):
    """Long rows: the flat GEMM's packed dataflow takes the rows of x in blocks that fit L2 (about 60 rows here),
    and its k blocks end off their 256-step."""
    weight = random_weight(name, 45, in_features, seed=11)
    reference = reference_weight(weight)
    kernels = load_kernels()
    for rows in (12, 61, 200):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        assert_matmul_close(kernels.flat_matmul(x, weight.data, weight.format.ggml_type, in_features), x, reference)


def test_parts_of_several_formats_and_a_bias():
    """A fused projection whose shards are stored in different formats, with a bias, batched input."""
    parts = [random_weight("Q4_K", 40, 256, seed=3), random_weight("Q4_K", 24, 256, seed=4),
             random_weight("Q8_0", 16, 256, seed=5), random_weight("F16", 8, 256, seed=6)]
    bias = torch.randn(88)
    layer = QuantizedLinear(parts, bias)
    assert layer.formats == [WEIGHT_FORMATS[n] for n in ("Q4_K", "Q8_0", "F16")]  # the two Q4_K parts merged
    weight = torch.cat([reference_weight(p) for p in parts])
    x = torch.randn(2, 5, 256)
    for flat_max_rows in (0, 300):
        layer.flat_max_rows = flat_max_rows
        assert_matmul_close(layer(x), x, weight, bias)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "BF16"])
def test_embedding_rows_are_the_checkpoints_values(name):
    weight = random_weight(name, 50, 256, seed=7)
    ids = torch.tensor([[0, 49, 3], [3, 17, 0]])
    out = QuantizedEmbedding(weight)(ids)
    assert torch.equal(out, torch.nn.functional.embedding(ids, reference_weight(weight)))
    with pytest.raises(RuntimeError, match="out of range"):
        QuantizedEmbedding(weight)(torch.tensor([50]))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiples of 32"):
        BlockWeight(torch.zeros(4, 18, dtype=torch.uint8), WEIGHT_FORMATS["Q4_0"], 33)
    with pytest.raises(ValueError, match=r"\[rows, 36\]"):
        BlockWeight(torch.zeros(4, 18, dtype=torch.uint8), WEIGHT_FORMATS["Q4_0"], 64)
    layer = QuantizedLinear([random_weight("Q4_0", 8, 64)])
    with pytest.raises(ValueError, match="64 inputs"):
        layer(torch.randn(3, 32))
    with pytest.raises(RuntimeError, match="float32"):
        layer(torch.randn(3, 64, dtype=torch.float64))


def test_dataflows_are_measured_per_shape():
    """The flat/tiled crossover is taken from timings: a threshold among the measured row counts, per shape, or no
    limit where the flat GEMM wins at the last count."""
    model = torch.nn.Sequential(QuantizedLinear([random_weight("Q4_1", 1536, 576, seed=8)]),
                                QuantizedLinear([random_weight("Q4_1", 1536, 576, seed=9)]),
                                QuantizedLinear([random_weight("Q8_0", 576, 1536, seed=10)]))
    thresholds = choose_dataflows(model)
    assert len(thresholds) == 2
    assert model[0].flat_max_rows == model[1].flat_max_rows == thresholds[model[0].dataflow_key()]
    assert all(0 <= rows <= 256 or rows == sys.maxsize for rows in thresholds.values())
