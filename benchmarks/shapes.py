"""Parameter shapes of reference models, written out so benchmarks need no torchvision."""

from __future__ import annotations

__all__ = [
    "GPT2_SMALL_NUM_PARAMS",
    "GPT2_SMALL_NUM_TENSORS",
    "RESNET50_NUM_PARAMS",
    "RESNET50_NUM_TENSORS",
    "SMALL_NUM_PARAMS",
    "SMALL_NUM_TENSORS",
    "gpt2_small_shapes",
    "resnet50_shapes",
    "small_tensor_shapes",
]

# torchvision's resnet50(): 161 parameter tensors, 25,557,032 parameters.
RESNET50_NUM_TENSORS = 161
RESNET50_NUM_PARAMS = 25_557_032

# (bottleneck width, blocks) of the four stages; a block's output is 4x its width.
_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
_EXPANSION = 4


def _conv_bn(out_channels: int, in_channels: int, kernel: int) -> list[tuple[int, ...]]:
    """A bias-free convolution followed by batch norm (weight and bias)."""
    return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The shapes of ``torchvision.models.resnet50().parameters()``, in that order."""
    shapes = _conv_bn(64, 3, 7)
    in_channels = 64
    for width, blocks in _STAGES:
        out_channels = width * _EXPANSION
        for block in range(blocks):
            shapes += _conv_bn(width, in_channels, 1)
            shapes += _conv_bn(width, width, 3)
            shapes += _conv_bn(out_channels, width, 1)
            if block == 0:  # the projection shortcut
                shapes += _conv_bn(out_channels, in_channels, 1)
            in_channels = out_channels
    shapes += [(num_classes, in_channels), (num_classes,)]
    return shapes


# Hugging Face GPT2Model with GPT2Config() (GPT-2 small): 148 parameter
# tensors, 124,439,808 parameters (the LM head shares wte and adds none).
GPT2_SMALL_NUM_TENSORS = 148
GPT2_SMALL_NUM_PARAMS = 124_439_808

_GPT2_VOCAB = 50257
_GPT2_CONTEXT = 1024
_GPT2_WIDTH = 768
_GPT2_LAYERS = 12


def _gpt2_block(width: int) -> list[tuple[int, ...]]:
    """One transformer block, in registration order. GPT-2's Conv1D stores its
    weight as (in, out), the transpose of nn.Linear's."""
    return [
        (width,),  # ln_1.weight
        (width,),  # ln_1.bias
        (width, 3 * width),  # attn.c_attn.weight: q, k and v
        (3 * width,),  # attn.c_attn.bias
        (width, width),  # attn.c_proj.weight
        (width,),  # attn.c_proj.bias
        (width,),  # ln_2.weight
        (width,),  # ln_2.bias
        (width, 4 * width),  # mlp.c_fc.weight
        (4 * width,),  # mlp.c_fc.bias
        (4 * width, width),  # mlp.c_proj.weight
        (width,),  # mlp.c_proj.bias
    ]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The shapes of ``transformers.GPT2Model(GPT2Config()).parameters()``, in that order:
    wte, wpe, 12 blocks, ln_f."""
    shapes = [(_GPT2_VOCAB, _GPT2_WIDTH), (_GPT2_CONTEXT, _GPT2_WIDTH)]
    for _ in range(_GPT2_LAYERS):
        shapes += _gpt2_block(_GPT2_WIDTH)
    shapes += [(_GPT2_WIDTH,), (_GPT2_WIDTH,)]  # ln_f.weight, ln_f.bias
    return shapes


# Many small tensors, where per-tensor costs (launches, table entries, host
# work) dominate: tensor i has (997 * i) mod 4093 + 1 elements. 4093 is prime
# and 997 is invertible mod 4093, so the 1000 sizes are distinct, irregular
# values in 1..4093 (1 included; three in four are not a multiple of 4, so
# vectorized kernels meet tails), 2,065,969 elements in all, 8.3 MB in fp32.
SMALL_NUM_TENSORS = 1000
SMALL_NUM_PARAMS = 2_065_969
_SMALL_MODULUS = 4093
_SMALL_STRIDE = 997


def small_tensor_shapes() -> list[tuple[int, ...]]:
    """1000 one-dimensional shapes of distinct, irregular sizes (see SMALL_NUM_TENSORS)."""
    return [((_SMALL_STRIDE * i) % _SMALL_MODULUS + 1,) for i in range(SMALL_NUM_TENSORS)]
