"""Tiny, deterministic, local checkpoints that stock vLLM 0.32 loads on CPU.

The tests and examples need MoE models without a model hub. This module writes
one into a folder: random weights from a seed, a byte-level BPE tokenizer trained
on a built-in corpus, a chat template and a generation config. The same
``(arch, dtype, seed)`` and the same library versions give the same bytes.

    python -m vllm_wideep.tiny_models OUT_DIR --arch deepseek_v3 [--dtype bfloat16] [--seed 0]

or, from Python, ``build_tiny_model(out_dir, "qwen3_moe")``. FP8 checkpoints (see "FP8"
below) come with ``--quant fp8|compressed-tensors [--quant-scope experts|all]`` or
``build_fp8_model(out_dir, "deepseek_v3_fp8", fmt=..., scope=...)``.

Architectures (``TINY_ARCHES``):

==============  ======================  ======  ==================================================
arch            class                   layers  experts
==============  ======================  ======  ==================================================
deepseek_v3     DeepseekV3ForCausalLM   3 + 1   layer 0 dense, layers 1-2 MoE: 16 routed + 1 shared,
                                        MTP     top-4, n_group 4 / topk_group 2, noaux_tc, sigmoid
deepseek_v3_    DeepseekV3ForCausalLM   3 + 1   as deepseek_v3, with an MTP layer whose drafts are
mtp                                     MTP     often accepted (see below)
deepseek_v3_    DeepseekV3ForCausalLM   3 + 1   as deepseek_v3, with every size of a Linear a
fp8                                     MTP     multiple of the 128 x 128 FP8 block (see "FP8")
qwen3_moe       Qwen3MoeForCausalLM     2       16, top-4
mixtral         MixtralForCausalLM      2       8, top-2
dense           Qwen3ForCausalLM        2       none (for "this model has no experts" checks)
==============  ======================  ======  ==================================================

Coverage models (``COVERAGE_ARCHES``, ``build_coverage_model(out_dir, name)``, default
float32): one tiny checkpoint per MoE architecture of vLLM, for the coverage table of
``docs/coverage.md`` (``benchmarks/coverage.py``). Each is data, not code: vLLM's
architecture name, transformers' config and model classes, and the keys in which it
differs from ``COVERAGE_SIZES`` (the sizes every config class takes under its own names:
2 layers, hidden 128, 8 experts of 64, top-2, MLA 512 + 64), plus the keys only vLLM reads
(remote-code configs: ``score_func``, ``first_k_dense_replace``, ...). Weights are drawn by
shape (``_reinit_coverage_weights``) and saved by transformers.

Architectures that transformers has no class for (Ling, DeepSeek V1, Step-3 / 3.5,
Param2MoE, Sarvam-MoE and SarvamMLA) take their config from the class vLLM ships
(``"vllm.<Class>"``) or from a ``configuration_wideep_tiny.py`` written into the
checkpoint (``"remote.<model type>"``, a bare ``PretrainedConfig`` that vLLM loads with
``trust_remote_code``, nothing downloaded), and their tensors from a layout function that
lists the names and shapes vLLM's model file loads (``_bailing_layout``, ...), drawn by
the same rules (``_coverage_value``) and saved with safetensors.

Every model has hidden size 128 and a vocabulary of ``VOCAB_SIZE`` = 1024 tokens.
The constraints come from vLLM's CPU kernels:

* MoE (``cpu_fused_moe``): hidden size divisible by 32; intermediate sizes are
  kept at multiples of 32 too.
* MLA (``CPU_MLA``): ``kv_lora_rank + qk_rope_head_dim`` must be 576, so
  DeepSeek-V3 uses 512 + 64; every other MLA size stays tiny.

DeepSeek-V3 specifics. HF's ``DeepseekV3Config`` does not write ``topk_method`` or
``scoring_func``; without ``topk_method = "noaux_tc"`` vLLM builds no
``e_score_correction_bias`` and fails with ``KeyError:
'layers.1.mlp.gate.e_score_correction_bias'``, so both are added. HF has no MTP
module, so the model is built with ``L + 1`` layers and layer ``L`` gets the MTP
tensors that ``vllm/model_executor/models/deepseek_mtp.py`` loads::

    model.layers.{L}.{enorm,hnorm}.weight                 [hidden]
    model.layers.{L}.eh_proj.weight                       [hidden, 2 * hidden]
    model.layers.{L}.shared_head.norm.weight              [hidden]
    model.layers.{L}.shared_head.head.weight              [vocab, hidden]  (copy of lm_head)
    model.layers.{L}.embed_tokens.weight                  [vocab, hidden]  (copy of embed_tokens)
    model.layers.{L}.{self_attn,mlp,...}                  a full MoE decoder block

and ``config.json`` says ``num_hidden_layers = L``, ``num_nextn_predict_layers = 1``.
The e_score_correction_bias is random and non-zero so that the bias path of
grouped top-k is exercised.

``deepseek_v3_mtp``: with random weights the MTP layer's drafts are almost never
accepted (about 1 in 100), so an acceptance rate says nothing about whether the draft
layer computed the right thing. This variant makes the model nearly a per-token
function that the MTP layer can copy: every ``self_attn.o_proj`` and the MLP output
projections of layers ``0 .. L-2`` are scaled by ``MTP_FRIENDLY_SCALE`` (0.1), so the
target's next token depends mostly on the current token through layer ``L-1``'s MoE; the
MTP layer gets a copy of layer ``L-1``'s MoE and norms, ``eh_proj = [I | 0]`` (it sees the
embedding of the token it predicts from), ``enorm = 1``, ``shared_head.norm =
model.norm``, and the embedding rows are scaled to unit RMS (so ``enorm`` leaves them
unchanged). Its drafts then match the target's next token about half of the time
(measured with vLLM: 57% accepted at 1 speculative token, 36% at 2), and only while
the draft MoE computes what layer ``L-1`` does.

Weights. Every parameter is redrawn in name order from one ``torch.Generator``
seeded with ``seed``: projections ``N(0, 1 / fan_in)``, embeddings ``N(0, 1)``,
norms ``1 + N(0, 0.1^2)``, routers ``N(0, 4 / hidden)`` (router logits of
standard deviation about 2, so tokens spread over the experts). Activations stay
O(1) and greedy decoding does not collapse to one token.

Checkpoints are saved with ``save_pretrained`` (safetensors). transformers 5.19
keeps experts fused in memory (``experts.gate_up_proj`` ``[E, 2 * I, H]``) and
writes them per expert (``mlp.experts.{e}.gate_proj.weight``, Mixtral
``block_sparse_moe.experts.{e}.w1.weight``), which is what vLLM's loaders read.

FP8. ``build_fp8_model`` writes the weights of ``build_tiny_model(arch, dtype, seed)``
with some Linear weights quantized to float8 e4m3 in 128 x 128 blocks
(``kernels.fp8.quantize_block_fp8``), and beside it, in ``dequantized_dir(out_dir)``
(``<out_dir>-dequant``), the same checkpoint with each of those weights replaced by
``dequantize_block_fp8(q, scale)`` cast to ``dtype`` and no ``quantization_config``:
stock vLLM on CPU runs that copy as the reference. ``scope``:

* ``"experts"``: the routed experts' ``gate_proj``, ``up_proj``, ``down_proj``;
* ``"all"``: every Linear but the routers (``mlp.gate``), ``lm_head``, and the MTP
  layer's ``eh_proj`` (a plain ``nn.Linear`` in vLLM) and ``shared_head.head``, as
  DeepSeek-V3 ships.

``fmt``, for a quantized weight ``W [out, in]`` with scales ``[ceil(out / 128),
ceil(in / 128)]`` float32:

==================  ===========================  ==========================================
fmt                 tensors                      ``quantization_config``
==================  ===========================  ==========================================
fp8                 ``W.weight`` float8_e4m3fn,  ``quant_method "fp8"``, ``weight_block_size
                    ``W.weight_scale_inv``       [128, 128]``, ``modules_to_not_convert``
                                                 (DeepSeek-V3's format)
compressed-tensors  ``W.weight`` float8_e4m3fn,  ``config_groups``: FP8 block weights,
                    ``W.weight_scale``           dynamic per-128-group activations;
                                                 ``ignore`` (llm-compressor's FP8_BLOCK)
==================  ===========================  ==========================================

Both lists of unquantized Linears hold exact module names: the checkpoint's
(``model.layers.0.self_attn.q_a_proj``) and, where vLLM fuses two of them into one
module, vLLM's (``self_attn.fused_qkv_a_proj``, ``mlp.gate_up_proj``, from
``DeepseekV2ForCausalLM.packed_modules_mapping``): vLLM's ``Fp8Config`` and
``CompressedTensorsConfig`` match its own module prefixes exactly, and fall back to the
parts of a fused module.

vLLM's block-FP8 loader needs each quantized weight's input size, and its output size
unless it is the last part of a fused module, to be a multiple of 128; hence
``deepseek_v3_fp8``: ``moe_intermediate_size`` 128, ``q_lora_rank`` 128,
``qk_nope_head_dim`` 64 (``q_b_proj`` and ``kv_b_proj`` ``[512, *]``, ``o_proj``
``[128, 256]``), and ``kv_a_proj_with_mqa`` ``[576, 128]``, the last part of vLLM's
``fused_qkv_a_proj`` ``[128 + 576, 128]``. Under tensor parallelism every shard must be
a multiple of 128 too: the attention and the dense MLP allow TP 2; the 128-wide experts
need expert parallelism beyond TP 1, and ``scope="all"`` (the 128-wide shared expert)
needs TP 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

TinyArch = Literal[
    "deepseek_v3", "deepseek_v3_mtp", "deepseek_v3_fp8", "qwen3_moe", "mixtral", "dense"
]
TINY_ARCHES: tuple[str, ...] = get_args(TinyArch)
TINY_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
Fp8Format = Literal["fp8", "compressed-tensors"]
FP8_FORMATS: tuple[str, ...] = get_args(Fp8Format)
Fp8Scope = Literal["experts", "all"]
FP8_SCOPES: tuple[str, ...] = get_args(Fp8Scope)
FP8_BLOCK = 128  # rows and columns of weight per FP8 scale (kernels.fp8.BLOCK)

VOCAB_SIZE = 1024
HIDDEN_SIZE = 128
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN_ID = 0
PAD_TOKEN_ID = 1
MAX_POSITION_EMBEDDINGS = 4096

# Bump when the written files change for the same (arch, dtype, seed).
FORMAT_VERSION = 1
STAMP_FILE = "wideep_tiny_model.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Router logits get a larger scale than other projections so routing is peaked.
_ROUTER_STD_GAIN = 2.0
_NORM_NOISE_STD = 0.1
_E_SCORE_BIAS_STD = 0.1
# deepseek_v3_mtp: scale of attention outputs and of the MLPs before the last layer.
MTP_FRIENDLY_SCALE = 0.1


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    max_position_embeddings=MAX_POSITION_EMBEDDINGS,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=EOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)


def deepseek_v3_config(
    num_layers: int,
    *,
    vocab_size: int = VOCAB_SIZE,
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
    num_heads: int = 4,
    v_head_dim: int = 64,
    kv_lora_rank: int = 512,
    q_lora_rank: int = 96,
    qk_nope_head_dim: int = 32,
    moe_intermediate_size: int = 64,
) -> PretrainedConfig:
    """DeepSeek-V3 in miniature with ``num_layers`` decoder layers: layer 0 dense, the
    others MoE (16 routed experts in 4 groups, top-4 of the 2 best groups, sigmoid
    scores, ``noaux_tc``, 1 shared expert). The keywords are the sizes in which the tiny
    models (the defaults), ``deepseek_v3_fp8`` and the trained one
    (``tools/accuracy/train.py``) differ."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        **{**_COMMON, "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings},
        num_hidden_layers=num_layers,
        intermediate_size=256,  # the dense layer 0
        moe_intermediate_size=moe_intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,  # 512 + 64 = 576, the only size CPU MLA supports
        qk_rope_head_dim=64,
        qk_nope_head_dim=qk_nope_head_dim,
        v_head_dim=v_head_dim,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    config.topk_method = "noaux_tc"  # vLLM builds e_score_correction_bias only with this
    config.scoring_func = "sigmoid"
    return config


def _deepseek_v3_fp8_config(num_layers: int) -> PretrainedConfig:
    """``deepseek_v3`` with every size of a quantized Linear a multiple of ``FP8_BLOCK``
    (module docstring, "FP8")."""
    return deepseek_v3_config(
        num_layers, q_lora_rank=128, qk_nope_head_dim=64, moe_intermediate_size=128
    )


def _qwen3_moe_config(num_layers: int) -> PretrainedConfig:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON,
        num_hidden_layers=num_layers,
        intermediate_size=256,  # unused: every layer is MoE
        moe_intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _mixtral_config(num_layers: int) -> PretrainedConfig:
    from transformers import MixtralConfig

    return MixtralConfig(
        **_COMMON,
        num_hidden_layers=num_layers,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
    )


def _dense_config(num_layers: int) -> PretrainedConfig:
    from transformers import Qwen3Config

    return Qwen3Config(
        **_COMMON,
        num_hidden_layers=num_layers,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )


@dataclass(frozen=True)
class _ArchSpec:
    """How to build one arch: ``num_layers`` decoder layers, plus ``num_mtp_layers``;
    ``edit_weights(tensors, num_layers)`` changes the drawn weights in place."""

    model_class: str
    make_config: Callable[[int], PretrainedConfig]
    num_layers: int
    num_mtp_layers: int = 0
    edit_weights: Callable[[dict[str, torch.Tensor], int], None] | None = None


_ARCH_SPECS: dict[str, _ArchSpec] = {
    "deepseek_v3": _ArchSpec("DeepseekV3ForCausalLM", deepseek_v3_config, 3, num_mtp_layers=1),
    "deepseek_v3_mtp": _ArchSpec(
        "DeepseekV3ForCausalLM",
        deepseek_v3_config,
        3,
        num_mtp_layers=1,
        edit_weights=lambda tensors, num_layers: _make_mtp_friendly(tensors, num_layers),
    ),
    "deepseek_v3_fp8": _ArchSpec(
        "DeepseekV3ForCausalLM", _deepseek_v3_fp8_config, 3, num_mtp_layers=1
    ),
    "qwen3_moe": _ArchSpec("Qwen3MoeForCausalLM", _qwen3_moe_config, 2),
    "mixtral": _ArchSpec("MixtralForCausalLM", _mixtral_config, 2),
    "dense": _ArchSpec("Qwen3ForCausalLM", _dense_config, 2),
}
assert set(_ARCH_SPECS) == set(TINY_ARCHES), (set(_ARCH_SPECS), TINY_ARCHES)


def tiny_config(arch: str) -> PretrainedConfig:
    """The ``config.json`` contents for ``arch``.

    MTP layers are not counted in ``num_hidden_layers``."""
    spec = _arch_spec(arch)
    config = spec.make_config(spec.num_layers)
    if spec.num_mtp_layers:
        config.num_nextn_predict_layers = spec.num_mtp_layers
    return config


def _arch_spec(arch: str) -> _ArchSpec:
    if arch not in _ARCH_SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHES}")
    return _ARCH_SPECS[arch]


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #

_CORPUS_TEXT = """\
The old lighthouse stood at the end of a narrow stone pier, and every evening the
keeper climbed its one hundred and twelve steps to light the lamp. Ships passing in
the dark counted the flashes: two short, one long, then a pause of ten seconds.
Sailors said that the light had never failed, not even in the winter storm that
flooded the harbour and carried away half of the fishing boats.

A model that predicts the next word must first learn which words follow which. It
reads a sentence one token at a time and keeps a summary of what it has seen. When
the summary is good, the prediction is good; when it is poor, the model guesses.
Large models split this work among many experts, and a small router decides which
experts should look at each token. If the router sends too many tokens to the same
expert, that expert becomes a bottleneck and the others sit idle.

In the spring the river rose and the village moved its market to the hill. Traders
brought apples, bread, cheese, honey, salt, wool and copper pots. Children ran
between the stalls while their parents argued about prices. By noon the square was
full, and by sunset it was empty again, except for a dog asleep under a cart.

Numbers are words too: zero, one, two, three, four, five, six, seven, eight, nine,
ten, eleven, twelve, twenty, thirty, forty, fifty, hundred, thousand, million.
Dates look like 2024-05-17 and times like 09:45. Prices look like $12.50 or 3.99.
Lists look like this: first, second, third; red, green, blue; north, south, east,
west. Questions end with a question mark? Answers often do not.

She opened the letter carefully. "Dear friend," it began, "I am writing to tell you
that the garden is finally growing. The tomatoes are red, the beans are climbing the
fence, and the roses have opened. Please come and visit before the summer is over."
She smiled, folded the letter, and put it in her pocket.

To bake simple bread, mix flour, water, salt and yeast. Knead the dough for ten
minutes, let it rise for an hour, shape it, let it rise again, and bake it in a hot
oven until the crust is brown and the loaf sounds hollow when you tap it.

The committee met on Tuesday to review the budget. After a long discussion they
agreed to repair the bridge, paint the school, plant trees along the main road and
buy a new bus. The mayor thanked everyone and said the work would begin in April.
"""

_GEN_SUBJECTS = (
    "the cat",
    "a teacher",
    "my brother",
    "the engine",
    "our team",
    "the river",
    "a small bird",
    "the computer",
    "every student",
    "the old man",
    "the server",
    "this expert",
    "the router",
    "a farmer",
    "the train",
    "the moon",
)
_GEN_VERBS = (
    "sees",
    "builds",
    "carries",
    "finds",
    "moves",
    "reads",
    "writes",
    "sends",
    "opens",
    "closes",
    "follows",
    "measures",
    "counts",
    "paints",
    "loads",
    "keeps",
)
_GEN_OBJECTS = (
    "a red box",
    "the long road",
    "three letters",
    "the blue door",
    "some bread",
    "a quiet song",
    "the heavy stone",
    "many tokens",
    "the last page",
    "a bright lamp",
    "the green field",
    "two experts",
    "the cold water",
    "a paper boat",
    "the map",
)
_GEN_TAILS = (
    "today.",
    "at night.",
    "in the morning.",
    "before lunch.",
    "after the rain.",
    "near the station.",
    "with great care.",
    "again and again.",
    "for the first time.",
    "without a word.",
    "every week.",
    "on the hill.",
)


def tokenizer_corpus() -> list[str]:
    """The fixed training text: the paragraphs above plus 600 generated sentences."""
    rng = random.Random(1234)
    lines = _CORPUS_TEXT.splitlines()
    for i in range(600):
        sentence = " ".join(
            (
                rng.choice(_GEN_SUBJECTS),
                rng.choice(_GEN_VERBS),
                rng.choice(_GEN_OBJECTS),
                rng.choice(_GEN_TAILS),
            )
        )
        lines.append(f"{sentence[0].upper()}{sentence[1:]} Item {i}: {rng.randint(0, 99999)}.")
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly ``vocab_size`` tokens.

    ``<|endoftext|>`` = 0, ``<|pad|>`` = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in corpus gives {tok.get_vocab_size()} BPE tokens, "
            f"not the requested {vocab_size}"
        )
    return wrap_tokenizer(
        tok, MAX_POSITION_EMBEDDINGS, bos_token=EOS_TOKEN, chat_template=CHAT_TEMPLATE
    )


def wrap_tokenizer(tok: Tokenizer, model_max_length: int, **kwargs: Any) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer with the project's special tokens: end of text
    ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1), which ``tok`` must have. ``kwargs``
    go to ``PreTrainedTokenizerFast`` (``bos_token``, ``chat_template``, ...)."""
    from transformers import PreTrainedTokenizerFast

    assert tok.token_to_id(EOS_TOKEN) == EOS_TOKEN_ID and tok.token_to_id(PAD_TOKEN) == PAD_TOKEN_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        **kwargs,
    )


# --------------------------------------------------------------------------- #
# Weights
# --------------------------------------------------------------------------- #


def _init_std(name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation of the normal draw for parameter ``name`` (see module docstring)."""
    if "embed_tokens" in name:
        return 1.0
    if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
        return _ROUTER_STD_GAIN / shape[-1] ** 0.5
    return 1.0 / shape[-1] ** 0.5


def _is_norm(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 and "norm" in name


def _reinit_weights(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Redraw every parameter and the e_score_correction_bias buffers, in name order."""
    import torch

    tensors = dict(model.named_parameters())
    tensors.update(
        (name, buf)
        for name, buf in model.named_buffers()
        if name.endswith("e_score_correction_bias")
    )
    with torch.no_grad():
        for name in sorted(tensors):
            tensor = tensors[name]
            shape = tuple(tensor.shape)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            if _is_norm(name, shape):
                value = 1.0 + _NORM_NOISE_STD * noise
            elif name.endswith("e_score_correction_bias"):
                value = _E_SCORE_BIAS_STD * noise
            elif len(shape) == 1:
                raise ValueError(f"no init rule for 1-D parameter {name} {shape}")
            else:
                value = _init_std(name, shape) * noise
            tensor.copy_(value)


def _mtp_extra_tensors(
    model: PreTrainedModel, layer: int, generator: torch.Generator, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors vLLM's DeepSeekMTP loads for MTP layer ``layer`` beyond its decoder block."""
    import torch

    hidden = model.config.hidden_size
    prefix = f"model.layers.{layer}."

    def norm() -> torch.Tensor:
        return 1.0 + _NORM_NOISE_STD * torch.randn(hidden, generator=generator)

    extra = {
        "enorm.weight": norm(),
        "hnorm.weight": norm(),
        "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator)
        / (2 * hidden) ** 0.5,
        "shared_head.norm.weight": norm(),
        "shared_head.head.weight": model.lm_head.weight.detach().clone(),
        "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
    }
    return {prefix + k: v.to(dtype).contiguous() for k, v in extra.items()}


def _make_mtp_friendly(tensors: dict[str, torch.Tensor], num_layers: int) -> None:
    """``deepseek_v3_mtp`` (module docstring): MTP layer ``num_layers`` copies the MoE of
    the last layer, which the rest of the model barely perturbs. In place, any dtype."""
    import torch

    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    edited = {name: t.float() for name, t in tensors.items()}
    embed = edited["model.embed_tokens.weight"]
    embed = embed / embed.pow(2).mean(-1, keepdim=True).sqrt()
    edited["model.embed_tokens.weight"] = edited[mtp + "embed_tokens.weight"] = embed
    for name in edited:
        early_mlp = name.endswith("down_proj.weight") and not name.startswith((last, mtp))
        if name.endswith("self_attn.o_proj.weight") or early_mlp:
            edited[name] = edited[name] * MTP_FRIENDLY_SCALE
    for name in [n for n in edited if n.startswith(last)]:
        if name.startswith((last + "mlp.", last + "input_layernorm", last + "post_attention")):
            edited[mtp + name.removeprefix(last)] = edited[name].clone()
    hidden = embed.shape[-1]
    edited[mtp + "enorm.weight"] = torch.ones(hidden)
    edited[mtp + "eh_proj.weight"] = torch.cat(
        [torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1
    )
    edited[mtp + "shared_head.norm.weight"] = edited["model.norm.weight"].clone()
    for name, tensor in edited.items():
        tensors[name] = tensor.to(tensors[name].dtype).contiguous()


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #


def _stamp(arch: str, dtype: str, seed: int) -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "dtype": dtype,
        "seed": seed,
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def _read_stamp(out_dir: Path, stamp_file: str = STAMP_FILE) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / stamp_file).read_text())
    except (OSError, ValueError):
        return None


def _write_model(tmp: Path, arch: str, dtype: str, seed: int) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    spec = _arch_spec(arch)
    torch_dtype = getattr(torch, dtype)
    total_layers = spec.num_layers + spec.num_mtp_layers
    config = spec.make_config(total_layers)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    _reinit_weights(model, generator)
    mtp_extra = {}
    for layer in range(spec.num_layers, total_layers):
        mtp_extra.update(_mtp_extra_tensors(model, layer, generator, torch_dtype))

    model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(tmp)

    if spec.num_mtp_layers:
        # The decoder blocks of the MTP layers are in the file already; add the rest and
        # write config.json with the MTP layers outside num_hidden_layers.
        weights_path = tmp / "model.safetensors"
        tensors = load_file(weights_path)
        tensors.update(mtp_extra)
        if spec.edit_weights is not None:
            spec.edit_weights(tensors, spec.num_layers)
        save_file(tensors, weights_path, metadata={"format": "pt"})
        model.config.num_hidden_layers = spec.num_layers
        model.config.num_nextn_predict_layers = spec.num_mtp_layers
        model.config.save_pretrained(tmp)

    build_tokenizer(config.vocab_size).save_pretrained(tmp)


def build_tiny_model(
    out_dir: str | os.PathLike[str], arch: str, dtype: str = "bfloat16", seed: int = 0
) -> Path:
    """Write the tiny ``arch`` checkpoint into ``out_dir`` and return its path.

    Idempotent: if ``out_dir`` holds a stamp for the same arch, dtype, seed, format
    version and library versions, nothing is written. A folder with another tiny
    model's stamp is replaced; a non-empty folder without a stamp is refused.
    The folder appears atomically (built next to it, then renamed).
    """
    _check_arch_and_dtype(arch, dtype)
    out = Path(out_dir).absolute()
    stamp = _stamp(arch, dtype, seed)
    if _is_current(out, stamp):
        return out
    return publish_folder(out, stamp, lambda tmp: _write_model(tmp, arch, dtype, seed))


def _check_arch_and_dtype(arch: str, dtype: str) -> None:
    _arch_spec(arch)
    if dtype not in TINY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {TINY_DTYPES}")


def _is_current(out: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``out`` holds the checkpoint ``stamp`` describes; raises if ``out`` is a
    non-empty folder that is no tiny model (no stamp), which is never overwritten."""
    found = _read_stamp(out)
    if found == stamp:
        return True
    if found is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and holds no {STAMP_FILE}; refusing to overwrite it"
        )
    return False


def publish_folder(
    out: Path,
    stamp: dict[str, Any],
    write: Callable[[Path], None],
    stamp_file: str = STAMP_FILE,
) -> Path:
    """Make ``out`` the folder that ``write(tmp)`` fills, plus ``stamp`` in ``stamp_file``,
    atomically: it is built next to ``out`` and renamed; an ``out`` with another stamp is
    replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        (tmp / stamp_file).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        for path in tmp.iterdir():  # mkdtemp and save_file create owner-only modes
            path.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            if _read_stamp(out, stamp_file) == stamp:  # another process finished first
                return out
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if _read_stamp(out, stamp_file) != stamp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- #
# Coverage models: one tiny checkpoint per MoE architecture of vLLM
# --------------------------------------------------------------------------- #

# Sizes every coverage model takes, where its transformers config class has the key
# (checked against the class's defaults): the same tiny model under each config's names.
COVERAGE_SIZES: dict[str, Any] = {
    **_COMMON,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 128,  # dense MLPs
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "shared_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "num_nextn_predict_layers": 0,
    "max_window_layers": 2,
    # MLA: vLLM's CPU MLA takes kv_lora_rank + qk_rope_head_dim = 576 only
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 96,
    "qk_nope_head_dim": 32,
    "v_head_dim": 64,
}


# A checkpoint's tensors by name: shape, for the models without a transformers class.
TensorLayout = dict[str, tuple[int, ...]]
# Config prefixes: a config class that vLLM ships (``vllm.transformers_utils.configs``),
# or one that exists only as the model's remote code (``remote.<model_type>``).
_VLLM_CONFIG, _REMOTE_CONFIG = "vllm.", "remote."
# The remote-code configuration written beside a remote config's config.json.
REMOTE_CONFIG_MODULE, REMOTE_CONFIG_CLASS = "configuration_wideep_tiny", "WideepTinyConfig"
_REMOTE_CONFIG_SOURCE = """\
from transformers import PretrainedConfig


class {cls}(PretrainedConfig):
    model_type = "{model_type}"
"""


@dataclass(frozen=True)
class CoverageArch:
    """One MoE architecture of vLLM as a tiny checkpoint: ``architecture`` (vLLM's
    registry name, written to ``config.json``) from transformers' ``config_class`` with
    ``COVERAGE_SIZES`` and ``overrides`` (which win), weights drawn for transformers'
    ``model_class``. ``extra_config``: keys only vLLM reads, set after the config is built;
    ``drop_tensors``: names (a regex) that transformers writes but the released checkpoints
    do not have.

    Models that transformers has no class for: ``config_class`` ``"vllm.<Class>"`` is the
    config class vLLM ships; ``"remote.<model_type>"`` a config that exists only as remote
    code, written as ``configuration_wideep_tiny.py`` (a ``PretrainedConfig`` of that
    ``model_type``, ``auto_map``-ed, loaded with ``trust_remote_code``) with ``_COMMON``,
    ``REMOTE_SIZES`` and ``overrides``. ``layout(config)`` then lists the checkpoint's
    tensors (the names vLLM's model file loads), drawn by the same rules. ``dtype``: the
    one the coverage table runs it in."""

    architecture: str
    config_class: str
    model_class: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    drop_tensors: str = ""  # regex: tensors transformers writes that vLLM does not load
    layout: Callable[[PretrainedConfig], TensorLayout] | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if bool(self.model_class) == (self.layout is not None):
            raise ValueError(
                f"{self.architecture}: give transformers' model_class or a layout, one of "
                f"them (model_class={self.model_class!r}, layout={self.layout!r})"
            )
        if self.dtype not in TINY_DTYPES:
            raise ValueError(f"{self.architecture}: dtype {self.dtype!r} not in {TINY_DTYPES}")

    @property
    def trust_remote_code(self) -> bool:
        """Whether vLLM must load the config with ``trust_remote_code``."""
        return self.config_class.startswith(_REMOTE_CONFIG)


_MLA_NO_GROUPS = {"n_group": 1, "topk_group": 1}
# The MLA sizes of COVERAGE_SIZES (kv_lora_rank + qk_rope_head_dim = 576 for CPU MLA).
_MLA_SIZES = ("kv_lora_rank", "qk_rope_head_dim", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")
# Configs that list each layer's MLP kind (transformers 5) for models that vLLM reads
# first_k_dense_replace from: every layer MoE in both.
_ALL_SPARSE = {"mlp_layer_types": ["sparse", "sparse"]}

# Sizes every remote config takes (it has no class defaults to filter COVERAGE_SIZES by).
REMOTE_SIZES: dict[str, Any] = {
    "num_hidden_layers": 3,  # layer 0 dense, as the released models: two MoE layers
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
}


def _mlp_layout(prefix: str, hidden: int, intermediate: int) -> TensorLayout:
    """A SwiGLU MLP's ``gate_proj``, ``up_proj``, ``down_proj`` under ``prefix``."""
    return {
        f"{prefix}.gate_proj.weight": (intermediate, hidden),
        f"{prefix}.up_proj.weight": (intermediate, hidden),
        f"{prefix}.down_proj.weight": (hidden, intermediate),
    }


def _experts_layout(prefix: str, num_experts: int, hidden: int, intermediate: int) -> TensorLayout:
    """Experts one MLP each: ``{prefix}.{e}.{gate,up,down}_proj.weight``."""
    layout: TensorLayout = {}
    for expert in range(num_experts):
        layout.update(_mlp_layout(f"{prefix}.{expert}", hidden, intermediate))
    return layout


def _moe_mlp_layout(
    mlp: str,
    dense: bool,
    hidden: int,
    dense_size: int,
    num_experts: int,
    expert_size: int,
    shared_size: int,
    gate_bias: str | None = None,
) -> TensorLayout:
    """A decoder layer's ``mlp``: a dense MLP of ``dense_size`` when ``dense`` (the first
    ``first_k_dense_replace`` layers), else ``gate.weight`` (plus ``gate.{gate_bias}``),
    routed ``experts`` and ``shared_experts`` of ``shared_size``."""
    if dense:
        return _mlp_layout(mlp, hidden, dense_size)
    layout = {f"{mlp}.gate.weight": (num_experts, hidden)}
    if gate_bias is not None:
        layout[f"{mlp}.gate.{gate_bias}"] = (num_experts,)
    layout.update(_experts_layout(f"{mlp}.experts", num_experts, hidden, expert_size))
    return {**layout, **_mlp_layout(f"{mlp}.shared_experts", hidden, shared_size)}


def _decoder_layout(
    config: PretrainedConfig, embed: str, layer: Callable[[str, int], TensorLayout]
) -> TensorLayout:
    """Embedding ``model.{embed}``, final norm, LM head, and ``layer(prefix, index)`` for
    each decoder layer with its two norms."""
    hidden, vocab = config.hidden_size, config.vocab_size
    layout: TensorLayout = {
        f"model.{embed}.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        layout[f"{prefix}.input_layernorm.weight"] = (hidden,)
        layout[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        layout.update(layer(prefix, index))
    return layout


def _bailing_layout(config: PretrainedConfig) -> TensorLayout:
    """BailingMoe / V2 (``bailing_moe.py``): fused ``attention.query_key_value``,
    ``attention.dense``, per-head q/k norms (V2), ``mlp.gate`` with an ``expert_bias``
    (V2), routed and shared experts."""
    c, hidden, head = config, config.hidden_size, config.head_dim

    def layer(prefix: str, index: int) -> TensorLayout:
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head
        layout = {
            f"{prefix}.attention.query_key_value.weight": (qkv, hidden),
            f"{prefix}.attention.dense.weight": (hidden, c.num_attention_heads * head),
        }
        if getattr(c, "use_qk_norm", False):
            layout[f"{prefix}.attention.query_layernorm.weight"] = (head,)
            layout[f"{prefix}.attention.key_layernorm.weight"] = (head,)
        return {
            **layout,
            **_moe_mlp_layout(
                f"{prefix}.mlp",
                index < c.first_k_dense_replace,
                hidden,
                c.intermediate_size,
                c.num_experts,
                c.moe_intermediate_size,
                c.moe_shared_expert_intermediate_size * c.num_shared_experts,
                "expert_bias" if getattr(c, "moe_router_enable_expert_bias", False) else None,
            ),
        }

    return _decoder_layout(config, "word_embeddings", layer)


def _deepseek_layout(config: PretrainedConfig) -> TensorLayout:
    """DeepSeek V1 (``DeepseekForCausalLM`` of ``deepseek_v2.py``, model type
    ``deepseek``): multi-head attention ``self_attn.{q,k,v,o}_proj``, ``mlp.gate``,
    routed experts and ``mlp.shared_experts``."""
    c, hidden, head = config, config.hidden_size, config.head_dim

    def layer(prefix: str, index: int) -> TensorLayout:
        layout = _attention_layout(
            f"{prefix}.self_attn", hidden, c.num_attention_heads, c.num_key_value_heads, head
        )
        return {
            **layout,
            **_moe_mlp_layout(
                f"{prefix}.mlp",
                index < c.first_k_dense_replace,
                hidden,
                c.intermediate_size,
                c.n_routed_experts,
                c.moe_intermediate_size,
                c.moe_intermediate_size * c.n_shared_experts,
            ),
        }

    return _decoder_layout(config, "embed_tokens", layer)


def _sarvam_mla_layout(config: PretrainedConfig) -> TensorLayout:
    """SarvamMLA (``sarvam.py``): DeepSeek's multi-head latent attention
    (``self_attn.q_proj``, or ``q_a_proj``, ``q_a_layernorm`` and ``q_b_proj`` with a
    ``q_lora_rank``; ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
    ``o_proj``) and BailingMoe's MoE under DeepSeek's names (``mlp.gate`` with
    ``e_score_correction_bias``, routed and shared experts)."""
    c, hidden, heads = config, config.hidden_size, config.num_attention_heads
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim

    def layer(prefix: str, index: int) -> TensorLayout:
        attention = f"{prefix}.self_attn"
        if c.q_lora_rank is None:
            layout = {f"{attention}.q_proj.weight": (heads * qk_head, hidden)}
        else:
            layout = {
                f"{attention}.q_a_proj.weight": (c.q_lora_rank, hidden),
                f"{attention}.q_a_layernorm.weight": (c.q_lora_rank,),
                f"{attention}.q_b_proj.weight": (heads * qk_head, c.q_lora_rank),
            }
        layout |= {
            f"{attention}.kv_a_proj_with_mqa.weight": (
                c.kv_lora_rank + c.qk_rope_head_dim,
                hidden,
            ),
            f"{attention}.kv_a_layernorm.weight": (c.kv_lora_rank,),
            f"{attention}.kv_b_proj.weight": (
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            ),
            f"{attention}.o_proj.weight": (hidden, heads * c.v_head_dim),
        }
        return {
            **layout,
            **_moe_mlp_layout(
                f"{prefix}.mlp",
                index < c.first_k_dense_replace,
                hidden,
                c.intermediate_size,
                c.num_experts,
                c.moe_intermediate_size,
                c.moe_shared_expert_intermediate_size * c.num_shared_experts,
                "e_score_correction_bias",
            ),
        }

    return _decoder_layout(config, "embed_tokens", layer)


def _attention_layout(
    prefix: str, hidden: int, heads: int, kv_heads: int, head: int
) -> TensorLayout:
    """``{q,k,v,o}_proj`` of grouped-query attention under ``prefix``."""
    return {
        f"{prefix}.q_proj.weight": (heads * head, hidden),
        f"{prefix}.k_proj.weight": (kv_heads * head, hidden),
        f"{prefix}.v_proj.weight": (kv_heads * head, hidden),
        f"{prefix}.o_proj.weight": (hidden, heads * head),
    }


def _step3_layout(config: PretrainedConfig) -> TensorLayout:
    """Step-3 (``step3_text.py``): attention with one KV head and a low-rank query
    (``q_proj`` to ``share_q_dim``, ``inter_norm``, ``wq`` to the heads); the layers of
    ``moe_layers_enum`` have ``moe.gate``, the routed experts packed as
    ``moe.{gate,up,down}_proj.weight`` ``[E, out, in]`` and a ``share_expert`` beside
    the MoE, the others a dense ``mlp``."""
    c, hidden, head = config, config.hidden_size, config.head_dim
    moe_layers = {int(i) for i in c.moe_layers_enum.split(",")}

    def layer(prefix: str, index: int) -> TensorLayout:
        attention = f"{prefix}.self_attn"
        layout = {
            f"{attention}.q_proj.weight": (c.share_q_dim, hidden),
            f"{attention}.k_proj.weight": (head, hidden),
            f"{attention}.v_proj.weight": (head, hidden),
            f"{attention}.inter_norm.weight": (c.share_q_dim,),
            f"{attention}.wq.weight": (c.num_attention_heads * head, c.share_q_dim),
            f"{attention}.o_proj.weight": (hidden, c.num_attention_heads * head),
        }
        if index not in moe_layers:
            return {**layout, **_mlp_layout(f"{prefix}.mlp", hidden, c.intermediate_size)}
        layout.update(_packed_experts_layout(f"{prefix}.moe", c))
        return {**layout, **_mlp_layout(f"{prefix}.share_expert", hidden, c.share_expert_dim)}

    return _decoder_layout(config, "embed_tokens", layer)


def _packed_experts_layout(prefix: str, config: PretrainedConfig) -> TensorLayout:
    """Step's MoE: ``gate`` and the routed experts packed as ``{gate,up,down}_proj.weight``
    ``[E, out, in]``."""
    experts, hidden, inter = (
        config.moe_num_experts,
        config.hidden_size,
        config.moe_intermediate_size,
    )
    return {
        f"{prefix}.gate.weight": (experts, hidden),
        f"{prefix}.gate_proj.weight": (experts, inter, hidden),
        f"{prefix}.up_proj.weight": (experts, inter, hidden),
        f"{prefix}.down_proj.weight": (experts, hidden, inter),
    }


def _step3p5_layout(config: PretrainedConfig) -> TensorLayout:
    """Step-3.5 (``step3p5.py``): q/k norms and a head-wise gate ``g_proj`` in attention;
    layer 0 dense, the others ``moe.gate``, ``moe.router_bias``, the routed experts packed
    as ``moe.{gate,up,down}_proj.weight`` ``[E, out, in]`` and ``moe.share_expert``."""
    c, hidden, head = config, config.hidden_size, config.head_dim

    def layer(prefix: str, index: int) -> TensorLayout:
        attention = f"{prefix}.self_attn"
        heads, kv_heads = c.num_attention_heads, c.num_attention_groups
        layout = _attention_layout(attention, hidden, heads, kv_heads, head)
        layout[f"{attention}.q_norm.weight"] = (head,)
        layout[f"{attention}.k_norm.weight"] = (head,)
        if c.use_head_wise_attn_gate:
            layout[f"{attention}.g_proj.weight"] = (c.num_attention_heads, hidden)
        if index == 0:
            return {**layout, **_mlp_layout(f"{prefix}.mlp", hidden, c.intermediate_size)}
        moe = f"{prefix}.moe"
        layout.update(_packed_experts_layout(moe, c))
        layout[f"{moe}.router_bias"] = (c.moe_num_experts,)
        return {**layout, **_mlp_layout(f"{moe}.share_expert", hidden, c.share_expert_dim)}

    return _decoder_layout(config, "embed_tokens", layer)


# Ling 2.0 (BailingMoeV2): sigmoid scores with an expert bias, grouped top-k, q/k norms,
# partial RoPE; Param2MoE and Sarvam-MoE take the same config keys.
_BAILING_V2 = {
    "num_experts": 8,
    "num_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 64,
    "n_group": 4,
    "topk_group": 2,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "router_dtype": "fp32",
    "use_qk_norm": True,
    "use_rmsnorm": True,
    "partial_rotary_factor": 0.5,
    "use_bias": False,
    "use_qkv_bias": False,
    "embedding_dropout": 0.0,
}
# Gated DeltaNet heads: vLLM's CPU GDN kernel takes head size 128 only ("Unexpected head
# dim size, 32"), as the released Qwen3-Next and Qwen3.5 have; Qwen4-Exp takes the same keys.
_GDN_HEADS = {
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
COVERAGE_ARCHES: dict[str, CoverageArch] = {
    "afmoe": CoverageArch(
        "AfmoeForCausalLM",
        "AfmoeConfig",
        "AfmoeForCausalLM",
        extra_config={"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1},
    ),
    "axk1": CoverageArch("AXK1ForCausalLM", "AXK1Config", "AXK1ForCausalLM", _MLA_NO_GROUPS),
    "bailing_moe": CoverageArch(
        "BailingMoeForCausalLM",
        "remote.bailing_moe",
        overrides={  # Ling-lite: softmax routing, 2 shared experts, every layer MoE
            "first_k_dense_replace": 0,
            "num_hidden_layers": 2,
            "num_experts": 8,
            "num_shared_experts": 2,
            "moe_shared_expert_intermediate_size": 64,
            "norm_topk_prob": True,
            "use_bias": False,
            "use_qkv_bias": False,
            "embedding_dropout": 0.0,
        },
        layout=_bailing_layout,
    ),
    "bailing_moe_v2": CoverageArch(
        "BailingMoeV2ForCausalLM",
        "remote.bailing_moe_v2",
        overrides=_BAILING_V2,
        layout=_bailing_layout,
    ),
    "cohere2_moe": CoverageArch(
        "Cohere2MoeForCausalLM", "Cohere2MoeConfig", "Cohere2MoeForCausalLM"
    ),
    "dbrx": CoverageArch(
        "DbrxForCausalLM",
        "DbrxConfig",
        "DbrxForCausalLM",
        {
            "d_model": HIDDEN_SIZE,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": MAX_POSITION_EMBEDDINGS,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
            "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2},
        },
    ),
    "deepseek": CoverageArch(
        "DeepseekForCausalLM",
        "remote.deepseek",
        overrides={  # DeepSeekMoE 16B: multi-head attention, softmax, 2 shared experts
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "moe_layer_freq": 1,
            "norm_topk_prob": False,
            "scoring_func": "softmax",
            "topk_method": "greedy",
            "attention_bias": False,
        },
        layout=_deepseek_layout,
    ),
    "deepseek_v32": CoverageArch(
        "DeepseekV32ForCausalLM", "DeepseekV32Config", "DeepseekV32ForCausalLM", _MLA_NO_GROUPS
    ),
    "deepseek_v2": CoverageArch(
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {"topk_method": "greedy"},  # with one group, as DeepSeek-V2-Lite
    ),
    "ernie45_moe": CoverageArch(
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        {"moe_layer_start_index": 0, "moe_layer_end_index": 1},
    ),
    "exaone_moe": CoverageArch(
        "ExaoneMoeForCausalLM",
        "ExaoneMoeConfig",
        "ExaoneMoeForCausalLM",
        extra_config={"swiglu_limits": [7.0, 7.0]},
    ),
    "gemma4": CoverageArch(
        "Gemma4ForCausalLM",
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        {"enable_moe_block": True, "moe_intermediate_size": 64, "hidden_size_per_layer_input": 0},
    ),
    "glm4_moe": CoverageArch(
        "Glm4MoeForCausalLM", "Glm4MoeConfig", "Glm4MoeForCausalLM", extra_config={"head_dim": 32}
    ),
    "glm4_moe_lite": CoverageArch(
        "Glm4MoeLiteForCausalLM",
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        _ALL_SPARSE,
        {"first_k_dense_replace": 0},
    ),
    "glm_moe_dsa": CoverageArch(
        "GlmMoeDsaForCausalLM",
        "GlmMoeDsaConfig",
        "GlmMoeDsaForCausalLM",
        {"index_n_heads": 2, "index_head_dim": 64, "index_topk": 64},
    ),
    "gpt_oss": CoverageArch(
        "GptOssForCausalLM", "GptOssConfig", "GptOssForCausalLM", {"intermediate_size": 64}
    ),
    "granitemoe": CoverageArch(
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        {"intermediate_size": 64},
    ),
    "granitemoeshared": CoverageArch(
        "GraniteMoeSharedForCausalLM",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        {"intermediate_size": 64},
    ),
    "granitemoehybrid": CoverageArch(
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        {
            "intermediate_size": 64,
            "layer_types": ["mamba", "attention"],
            "mamba_n_heads": 8,
            "mamba_d_head": 32,
            "mamba_d_state": 16,
        },
    ),
    "hy_v3": CoverageArch(
        "HYV3ForCausalLM",
        "HYV3Config",
        "HYV3ForCausalLM",
        _ALL_SPARSE,
        {"first_k_dense_replace": 0, "expert_hidden_dim": 64, "route_norm": True, "qk_norm": True},
    ),
    "hy_v4": CoverageArch("HYV4ForCausalLM", "HYV4Config", "HYV4ForCausalLM"),
    "jamba": CoverageArch(
        "JambaForCausalLM",
        "JambaConfig",
        "JambaForCausalLM",
        {
            "intermediate_size": 64,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
            "mamba_d_state": 16,
            "mamba_dt_rank": 8,
            "use_mamba_kernels": False,
        },
    ),
    "laguna": CoverageArch("LagunaForCausalLM", "LagunaConfig", "LagunaForCausalLM"),
    "lfm2_moe": CoverageArch(
        "Lfm2MoeForCausalLM",
        "Lfm2MoeConfig",
        "Lfm2MoeForCausalLM",
        {"layer_types": ["conv", "full_attention"]},
    ),
    "llama4": CoverageArch(
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {"intermediate_size": 64, "intermediate_size_mlp": 128, "num_experts_per_tok": 1},
    ),
    "longcat_flash": CoverageArch(
        "LongcatFlashForCausalLM",
        "LongcatFlashConfig",
        "LongcatFlashForCausalLM",
        {
            "num_layers": 2,
            "ffn_hidden_size": 128,
            "expert_ffn_hidden_size": 64,
            "zero_expert_num": 2,
            "num_key_value_heads": 4,
        },
        {"mla_scale_q_lora": True, "mla_scale_kv_lora": True, "zero_expert_type": "identity"},
        # transformers gives the 2 zero (identity) experts weights too; LongCat ships none
        drop_tensors=r"\.mlp\.experts\.(8|9)\.",
    ),
    "mimo_v2_flash": CoverageArch(
        "MiMoV2FlashForCausalLM",
        "MiMoV2FlashConfig",
        "MiMoV2FlashForCausalLM",
        {
            **_ALL_SPARSE,
            "v_head_dim": 32,
            "layer_types": ["full_attention", "sliding_attention"],
            "sliding_window": 128,
        },
        {
            "hybrid_layer_pattern": [0, 1],
            "moe_layer_freq": [1, 1],
            "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 2,
            "swa_head_dim": 32,
            "swa_v_head_dim": 32,
            "sliding_window_size": 128,
            "layernorm_epsilon": 1e-6,
        },
    ),
    "minimax_m2": CoverageArch(
        "MiniMaxM2ForCausalLM",
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        {"intermediate_size": 64},
        {"rotary_dim": 32, "scoring_func": "sigmoid", "use_routing_bias": True},
    ),
    "minimax_m3": CoverageArch(
        "MiniMaxM3SparseForCausalLM", "MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM"
    ),
    "nemotron_h": CoverageArch(
        "NemotronHForCausalLM",
        "NemotronHConfig",
        "NemotronHForCausalLM",
        {
            "layers_block_type": ["mamba", "moe", "attention", "moe"],
            "mamba_num_heads": 8,
            "mamba_head_dim": 32,
            "n_groups": 1,
            "ssm_state_size": 16,
        },
    ),
    "olmoe": CoverageArch(
        "OlmoeForCausalLM", "OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 64}
    ),
    "param2moe": CoverageArch(
        "Param2MoEForCausalLM",
        "remote.param2moe",
        overrides=_BAILING_V2,
        layout=_bailing_layout,  # the same checkpoint names as BailingMoe
    ),
    "phimoe": CoverageArch(
        "PhiMoEForCausalLM", "PhimoeConfig", "PhimoeForCausalLM", {"intermediate_size": 64}
    ),
    "qwen2_moe": CoverageArch("Qwen2MoeForCausalLM", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "step3p5": CoverageArch(
        "Step3p5ForCausalLM",
        "vllm.Step3p5Config",
        overrides={  # Step-3.5-Flash: sigmoid scores with a router bias, head-wise gate
            "num_hidden_layers": 3,
            "num_attention_groups": 2,
            "moe_top_k": 2,
            "share_expert_dim": 64,
            "moe_router_activation": "sigmoid",
            "use_moe_router_bias": True,
            "use_head_wise_attn_gate": True,
            "rope_theta": 10000.0,
            "bos_token_id": EOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
        },
        layout=_step3p5_layout,
    ),
    "sarvam_moe": CoverageArch(
        "SarvamMoEForCausalLM",
        "remote.sarvam_moe",
        overrides=_BAILING_V2,
        layout=_bailing_layout,  # vLLM's SarvamMoEForCausalLM is its BailingMoeForCausalLM
    ),
    "sarvam_mla": CoverageArch(
        "SarvamMLAForCausalLM",
        "remote.sarvam_mla",
        overrides={  # Sarvam's MLA model: Ling 2.0's MoE with DeepSeek's latent attention
            **_BAILING_V2,
            "num_key_value_heads": 4,
            **{k: COVERAGE_SIZES[k] for k in _MLA_SIZES},
            # vLLM sizes the MLA cache by head_dim for this model type (it is not in its
            # DeepSeek-MLA list): kv_lora_rank + qk_rope_head_dim, the one CPU MLA takes
            "head_dim": COVERAGE_SIZES["kv_lora_rank"] + COVERAGE_SIZES["qk_rope_head_dim"],
            # vLLM 0.32's SarvamMLA attention with a q_lora_rank fails ("fused_qkv_a_proj
            # is required when q_lora_rank is not None"): the query without one, q_proj
            "q_lora_rank": None,
        },
        layout=_sarvam_mla_layout,
    ),
    "step3_text": CoverageArch(
        "Step3TextForCausalLM",
        "vllm.Step3TextConfig",
        overrides={  # Step-3: one KV head, low-rank query, softmax routing
            "num_hidden_layers": 3,
            "num_attention_groups": 1,
            "share_q_dim": 64,
            "moe_num_experts": 8,
            "moe_top_k": 2,
            "moe_layers_enum": "1,2",
            "share_expert_dim": 64,
            "max_position_embedding": MAX_POSITION_EMBEDDINGS,
            "max_seq_len": MAX_POSITION_EMBEDDINGS,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": EOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
        },
        layout=_step3_layout,
    ),
    "qwen4_exp": CoverageArch(
        "Qwen4ExpForCausalLM", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", _GDN_HEADS
    ),
    "qwen3_next": CoverageArch(
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        _GDN_HEADS,
        dtype="bfloat16",  # the CPU GDN kernel takes BF16 only
    ),
    "qwen3_5_moe": CoverageArch(
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        _GDN_HEADS,
        dtype="bfloat16",  # the CPU GDN kernel takes BF16 only
    ),
}


def coverage_config(name: str) -> PretrainedConfig:
    """The ``config.json`` contents of coverage model ``name`` (``COVERAGE_ARCHES``)."""
    import transformers

    arch = _coverage_arch(name)
    if arch.trust_remote_code:
        config_class = _remote_config_class(arch.config_class.removeprefix(_REMOTE_CONFIG))
        config = config_class(**{**_COMMON, **REMOTE_SIZES, **arch.overrides})
        config.auto_map = {"AutoConfig": f"{REMOTE_CONFIG_MODULE}.{REMOTE_CONFIG_CLASS}"}
    else:
        if arch.config_class.startswith(_VLLM_CONFIG):
            from vllm.transformers_utils import configs

            config_class = getattr(configs, arch.config_class.removeprefix(_VLLM_CONFIG))
        else:
            config_class = getattr(transformers, arch.config_class)
        defaults = config_class().to_dict()
        kwargs = {k: v for k, v in COVERAGE_SIZES.items() if k in defaults}
        config = config_class(**{**kwargs, **arch.overrides})
    for key, value in arch.extra_config.items():
        setattr(config, key, value)
    config.architectures = [arch.architecture]
    return config


def _remote_config_class(model_type: str) -> type[PretrainedConfig]:
    """The class of ``_REMOTE_CONFIG_SOURCE`` for ``model_type``, here."""
    from transformers import PretrainedConfig

    return type(REMOTE_CONFIG_CLASS, (PretrainedConfig,), {"model_type": model_type})


def _coverage_arch(name: str) -> CoverageArch:
    if name not in COVERAGE_ARCHES:
        raise ValueError(
            f"unknown coverage arch {name!r}; expected one of {sorted(COVERAGE_ARCHES)}"
        )
    return COVERAGE_ARCHES[name]


def _reinit_coverage_weights(
    model: PreTrainedModel, num_experts: int, generator: torch.Generator
) -> None:
    """Redraw every parameter and bias buffer in name order: norms ``1 + N(0, 0.1^2)``,
    other 1-D tensors (biases, attention sinks, SSM parameters) ``N(0, 0.1^2)``, routers
    (``[E, H]`` tensors named gate or router) ``N(0, 4 / H)``, everything else
    ``N(0, 1 / last dim)``: the rules of the tiny models, by shape instead of by name."""
    import torch

    tensors = dict(model.named_parameters())
    tensors.update(
        (name, buf)
        for name, buf in model.named_buffers()
        if name.endswith("bias") and buf.is_floating_point()
    )
    with torch.no_grad():
        for name in sorted(tensors):
            tensor = tensors[name]
            shape = tuple(tensor.shape)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            tensor.copy_(_coverage_value(name, shape, noise, num_experts))


def _coverage_value(
    name: str, shape: tuple[int, ...], noise: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Tensor ``name`` of a coverage model from its standard normal ``noise`` (rules of
    ``_reinit_coverage_weights``)."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    if _is_norm(name, shape):
        return 1.0 + _NORM_NOISE_STD * noise
    if len(shape) <= 1:
        return _NORM_NOISE_STD * noise
    if len(shape) == 2 and shape[0] == num_experts and ("gate" in leaf or "router" in leaf):
        return _ROUTER_STD_GAIN / shape[-1] ** 0.5 * noise
    return noise / shape[-1] ** 0.5


def _write_coverage_model(tmp: Path, name: str, dtype: str, seed: int) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    arch = _coverage_arch(name)
    config = coverage_config(name)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if arch.layout is not None:
        _write_layout_model(tmp, arch, config, dtype, generator)
        return
    model = getattr(transformers, arch.model_class)(config)
    _reinit_coverage_weights(model, _num_experts(config), generator)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(tmp)
    if arch.drop_tensors:
        weights = tmp / "model.safetensors"
        kept = {k: v for k, v in load_file(weights).items() if not re.search(arch.drop_tensors, k)}
        save_file(kept, weights, metadata={"format": "pt"})
    # save_pretrained names transformers' class; vLLM's registry name may differ in case.
    config.architectures = [arch.architecture]
    config.save_pretrained(tmp)
    build_tokenizer(VOCAB_SIZE).save_pretrained(tmp)


def _write_layout_model(
    tmp: Path, arch: CoverageArch, config: PretrainedConfig, dtype: str, generator: torch.Generator
) -> None:
    """A coverage model without a transformers class: the tensors of ``arch.layout``
    drawn in name order by ``_coverage_value``, the config (and its remote code), the
    generation config and the tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    num_experts = _num_experts(config)
    tensors = {}
    for name, shape in sorted(arch.layout(config).items()):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        value = _coverage_value(name, shape, noise, num_experts)
        tensors[name] = value.to(getattr(torch, dtype)).contiguous()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    if arch.trust_remote_code:
        source = _REMOTE_CONFIG_SOURCE.format(cls=REMOTE_CONFIG_CLASS, model_type=config.model_type)
        (tmp / f"{REMOTE_CONFIG_MODULE}.py").write_text(source)
    GenerationConfig(
        bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    ).save_pretrained(tmp)
    build_tokenizer(VOCAB_SIZE).save_pretrained(tmp)


def _num_experts(config: PretrainedConfig) -> int:
    """Routed experts of a coverage model's config, whatever its key."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if getattr(config, key, None):
            return getattr(config, key)
    ffn_config = getattr(config, "ffn_config", None)
    if ffn_config is not None:
        return ffn_config.moe_num_experts
    raise ValueError(f"{type(config).__name__} names its experts by no known key")


def build_coverage_model(
    out_dir: str | os.PathLike[str], name: str, dtype: str = "float32", seed: int = 0
) -> Path:
    """Write the tiny checkpoint of coverage architecture ``name`` (``COVERAGE_ARCHES``)
    into ``out_dir`` and return its path; stamped, idempotent and atomic like
    ``build_tiny_model``."""
    _coverage_arch(name)
    if dtype not in TINY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {TINY_DTYPES}")
    out = Path(out_dir).absolute()
    # The digest of the config and the dropped tensors: a changed entry rebuilds the folder.
    config = json.dumps(
        [coverage_config(name).to_dict(), COVERAGE_ARCHES[name].drop_tensors],
        sort_keys=True,
        default=str,
    )
    stamp = {
        **_stamp(name, dtype, seed),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
    }
    if _is_current(out, stamp):
        return out
    return publish_folder(out, stamp, lambda tmp: _write_coverage_model(tmp, name, dtype, seed))


# --------------------------------------------------------------------------- #
# FP8
# --------------------------------------------------------------------------- #

# Linear weights that stay unquantized in every scope: the router, the output heads and
# the MTP layer's eh_proj (vLLM builds it as a plain nn.Linear, which takes no scales).
_NEVER_QUANTIZED = re.compile(r"(^lm_head|\.shared_head\.head|\.eh_proj|\.mlp\.gate)\.weight$")
_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# vLLM module -> the checkpoint modules it fuses (DeepseekV2ForCausalLM.packed_modules_mapping
# with a q_lora_rank); the routed experts, fused into one FusedMoE, are always quantized.
_VLLM_FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# The scale that goes with FP8 weight ``X.weight`` in each format: ``X.<suffix>``.
_SCALE_SUFFIX = {"fp8": "weight_scale_inv", "compressed-tensors": "weight_scale"}
assert set(_SCALE_SUFFIX) == set(FP8_FORMATS), (_SCALE_SUFFIX, FP8_FORMATS)
# The one quantized weight whose output size may be off the block: the last part of
# vLLM's fused_qkv_a_proj, kv_lora_rank + qk_rope_head_dim = 576 rows.
_LAST_FUSED_PART = ".self_attn.kv_a_proj_with_mqa.weight"


def dequantized_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where ``build_fp8_model(out_dir, ...)`` writes the dequantized copy: the sibling
    folder ``<out_dir>-dequant``."""
    out = Path(out_dir).absolute()
    return out.with_name(out.name + "-dequant")


def fp8_quantized_weights(tensors: Mapping[str, torch.Tensor], scope: str) -> list[str]:
    """The names of the weights in a DeepSeek-V3 checkpoint ``tensors`` that ``scope``
    quantizes (module docstring, "FP8"), sorted."""
    if scope not in FP8_SCOPES:
        raise ValueError(f"unknown FP8 scope {scope!r}; expected one of {FP8_SCOPES}")
    if scope == "experts":
        return sorted(name for name in tensors if _ROUTED_EXPERT.search(name))
    return sorted(name for name in _linear_weights(tensors) if not _NEVER_QUANTIZED.search(name))


def fp8_unquantized_modules(tensors: Mapping[str, torch.Tensor], quantized: list[str]) -> list[str]:
    """The module names of the Linears of ``tensors`` not in ``quantized``, for a
    ``modules_to_not_convert`` or ``ignore`` list: each checkpoint name and, where vLLM
    fuses modules all of which stay unquantized, vLLM's fused name; sorted."""
    skipped = {name.removesuffix(".weight") for name in _linear_weights(tensors)}
    skipped -= {name.removesuffix(".weight") for name in quantized}
    fused = set()
    for module in skipped:
        parent, _, leaf = module.rpartition(".")
        for fused_leaf, parts in _VLLM_FUSED_MODULES.items():
            if leaf == parts[0] and all(f"{parent}.{part}" in skipped for part in parts):
                fused.add(f"{parent}.{fused_leaf}")
    return sorted(skipped | fused)


def fp8_quantization_config(fmt: str, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` for ``fmt`` with the unquantized
    Linears ``ignore`` (exact module names)."""
    if fmt == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "modules_to_not_convert": ignore,
        }
    if fmt == "compressed-tensors":
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "symmetric": True,
                        "strategy": "block",
                        "block_structure": [FP8_BLOCK, FP8_BLOCK],
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": FP8_BLOCK,
                        "dynamic": True,
                    },
                }
            },
            "ignore": ignore,
        }
    raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {FP8_FORMATS}")


def fp8_scale_name(weight_name: str, fmt: str) -> str:
    """The scale tensor that goes with FP8 weight ``weight_name`` (``X.weight``):
    ``X.weight_scale_inv`` (``fp8``) or ``X.weight_scale`` (``compressed-tensors``)."""
    if fmt not in _SCALE_SUFFIX:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {FP8_FORMATS}")
    return weight_name.removesuffix("weight") + _SCALE_SUFFIX[fmt]


def build_fp8_model(
    out_dir: str | os.PathLike[str],
    arch: str,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    fmt: str = "fp8",
    scope: str = "experts",
) -> Path:
    """Write the FP8 checkpoint of ``build_tiny_model(arch, dtype, seed)`` into
    ``out_dir``, and its dequantized copy into ``dequantized_dir(out_dir)``; return
    ``out_dir``'s path (module docstring, "FP8").

    ``fmt``: ``"fp8"`` (DeepSeek's) or ``"compressed-tensors"`` (llm-compressor's).
    ``scope``: ``"experts"`` (routed experts only) or ``"all"`` (every Linear but the
    routers and heads). The weights stay in ``dtype`` except the quantized ones: float8
    e4m3 plus float32 scales in ``out_dir``, ``dequantize_block_fp8(q, scale)`` cast to
    ``dtype`` in the copy. Each folder is stamped and written as ``build_tiny_model``
    writes its one (idempotent, atomic, never over a foreign folder).
    """
    _check_arch_and_dtype(arch, dtype)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {FP8_FORMATS}")
    if scope not in FP8_SCOPES:
        raise ValueError(f"unknown FP8 scope {scope!r}; expected one of {FP8_SCOPES}")
    if _arch_spec(arch).model_class != "DeepseekV3ForCausalLM":
        raise ValueError(f"FP8 checkpoints are DeepSeek-V3 only; {arch!r} is not")
    out, copy = Path(out_dir).absolute(), dequantized_dir(out_dir)
    quantization = {"format": fmt, "scope": scope}
    stamps = {
        out: {**_stamp(arch, dtype, seed), "fp8": {**quantization, "role": "fp8"}},
        copy: {**_stamp(arch, dtype, seed), "fp8": {**quantization, "role": "dequantized"}},
    }
    if all([_is_current(path, stamp) for path, stamp in stamps.items()]):  # both checked
        return out

    from safetensors.torch import load_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.plain.", dir=out.parent) as work:
        plain = Path(work)
        _write_model(plain, arch, dtype, seed)
        tensors = load_file(plain / "model.safetensors")
        quantized = fp8_quantized_weights(tensors, scope)
        _check_fp8_shapes(tensors, quantized, arch)
        fp8_tensors, dequantized = _quantize(tensors, quantized, fmt)
        config = json.loads((plain / "config.json").read_text())
        config["quantization_config"] = fp8_quantization_config(
            fmt, fp8_unquantized_modules(tensors, quantized)
        )
        publish_folder(copy, stamps[copy], lambda tmp: _write_variant(tmp, plain, dequantized))
        publish_folder(
            out, stamps[out], lambda tmp: _write_variant(tmp, plain, fp8_tensors, config)
        )
    return out


def _linear_weights(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Every Linear's weight: the 2-D ``*.weight`` tensors but the embeddings."""
    return [
        name
        for name, tensor in tensors.items()
        if name.endswith(".weight") and tensor.dim() == 2 and "embed_tokens" not in name
    ]


def _check_fp8_shapes(tensors: Mapping[str, torch.Tensor], quantized: list[str], arch: str) -> None:
    """vLLM's block-FP8 loader needs the sizes of every quantized weight ``[out, in]`` to
    be multiples of the block, but the output size of a fused module's last part."""
    off_block = [
        f"{name} {list(tensors[name].shape)}"
        for name in quantized
        if tensors[name].shape[1] % FP8_BLOCK
        or (tensors[name].shape[0] % FP8_BLOCK and not name.endswith(_LAST_FUSED_PART))
    ]
    if off_block:
        raise ValueError(
            f"{arch!r} has weights off the {FP8_BLOCK} x {FP8_BLOCK} FP8 block, which vLLM "
            f"cannot load (use 'deepseek_v3_fp8'): {', '.join(off_block[:4])}"
            + (f" and {len(off_block) - 4} more" if len(off_block) > 4 else "")
        )


def _quantize(
    tensors: dict[str, torch.Tensor], quantized: list[str], fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the FP8 checkpoint's tensors, the dequantized copy's) from ``tensors``."""
    from vllm_wideep.kernels.fp8 import dequantize_block_fp8, quantize_block_fp8

    block = (FP8_BLOCK, FP8_BLOCK)
    fp8_tensors, dequantized = dict(tensors), dict(tensors)
    for name in quantized:
        q, scale = quantize_block_fp8(tensors[name], block)
        fp8_tensors[name] = q.contiguous()
        fp8_tensors[fp8_scale_name(name, fmt)] = scale.contiguous()
        dequantized[name] = dequantize_block_fp8(q, scale, block).to(tensors[name].dtype)
    return fp8_tensors, dequantized


def _write_variant(
    tmp: Path,
    plain: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
) -> None:
    """The checkpoint in ``plain`` with weights ``tensors`` and, if given, ``config``."""
    from safetensors.torch import save_file

    for path in plain.iterdir():
        if path.name not in ("model.safetensors", "config.json", STAMP_FILE):
            shutil.copyfile(path, tmp / path.name)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    if config is None:
        shutil.copyfile(plain / "config.json", tmp / "config.json")
    else:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_wideep.tiny_models",
        description="Write a tiny deterministic checkpoint (weights, tokenizer, configs) for vLLM.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--arch",
        required=True,
        choices=(*TINY_ARCHES, *COVERAGE_ARCHES),
        help="a tiny model, or one of the coverage models of docs/coverage.md",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=TINY_DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quant",
        choices=FP8_FORMATS,
        help="write an FP8 checkpoint in this format, and its dequantized copy in OUT_DIR-dequant",
    )
    parser.add_argument(
        "--quant-scope",
        choices=FP8_SCOPES,
        help="which Linears --quant quantizes: the routed experts (default) or all",
    )
    args = parser.parse_args(argv)
    if args.quant is None:
        if args.quant_scope is not None:
            parser.error("--quant-scope needs --quant")
        build = build_coverage_model if args.arch in COVERAGE_ARCHES else build_tiny_model
        print(build(args.out_dir, args.arch, dtype=args.dtype, seed=args.seed))
        return 0
    out = build_fp8_model(
        args.out_dir,
        args.arch,
        dtype=args.dtype,
        seed=args.seed,
        fmt=args.quant,
        scope=args.quant_scope or "experts",
    )
    print(out)
    print(dequantized_dir(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
