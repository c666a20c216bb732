"""The shape of a MoE model, read from its Hugging Face ``config.json``.

Only what the performance model needs: layer counts (dense vs MoE, MTP), hidden size, expert
sizes and counts, top-k, shared experts, the attention kind with its KV bytes per token, and
the vocabulary. Every MLP (dense, shared expert, routed expert) is gated, three matrices:
``gate [H, I]``, ``up [H, I]``, ``down [I, H]``, so ``3 * H * I`` parameters.

Worked example, DeepSeek-V3/R1 (``BUILTIN_CONFIGS["deepseek-r1"]``):

    61 layers = 3 dense (first_k_dense_replace) + 58 MoE, 1 MTP layer
    H = 7168, dense I = 18432, expert I = 2048, 256 routed experts, top-8, 1 shared expert
    routed expert       3 * 7168 * 2048                          = 44.04 M parameters
    MLA attention       7168*1536 + 1536*128*192 + 7168*576
                        + 512*128*256 + 128*128*7168             = 187.1 M per layer
    KV cache            kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 elements/token/layer
    total               61*187.1M + 3*3*7168*18432 + 58*(257*44.04M + 7168*256)
                        + 2*129280*7168                          = 671.0 B parameters

Supported ``model_type`` families: ``deepseek_v2``/``deepseek_v3`` (also Kimi K2),
``qwen3_moe``/``qwen2_moe``, ``mixtral``, ``llama4`` (``text_config``), and any config with
the usual MoE keys (``num_experts``/``num_local_experts``/``n_routed_experts``). A model
without routed experts raises ``ValueError``.

``BUILTIN_CONFIGS`` holds the fields of the published ``config.json`` of DeepSeek-R1 (same
shape as V3), Qwen3-235B-A22B and Llama-4-Maverick-17B-128E-Instruct, so nothing is
downloaded. Llama 4's chunked attention (8192-token chunks in 3 of 4 layers) is not modelled:
every layer reads its whole KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

AttentionKind = Literal["mla", "gqa"]


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer. ``mla``: DeepSeek's multi-head latent attention; ``gqa``:
    grouped-query attention (MHA when ``num_kv_heads == num_heads``)."""

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int  # GQA head size; MLA: qk_nope_head_dim + qk_rope_head_dim
    q_lora_rank: int = 0  # MLA only (0: q is projected directly)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def params(self, hidden: int) -> int:
        """Projection parameters of one layer (norms left out)."""
        if self.kind == "gqa":
            return hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = hidden * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
        else:
            q = hidden * self.num_heads * qk_head
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = self.num_heads * self.v_head_dim * hidden
        return q + kv_a + kv_b + o

    @property
    def kv_elements_per_token(self) -> int:
        """Cached elements per token per layer: MLA keeps the latent and the rope key; GQA
        keeps K and V of every KV head."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def decode_flops_per_cached_token(self) -> int:
        """FLOP per query token per cached token per layer in decode (QK^T and PV).

        MLA decodes in the absorbed form (FlashMLA): every head attends over the 576-wide
        latent+rope key and the 512-wide latent value: 2 * heads * (2 * 512 + 64)."""
        if self.kind == "mla":
            return 2 * self.num_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4 * self.num_heads * self.head_dim

    @property
    def prefill_flops_per_cached_token(self) -> int:
        """The same for prefill. MLA prefills with materialised K and V (192-wide keys,
        128-wide values per head)."""
        if self.kind == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            return 2 * self.num_heads * (qk_head + self.v_head_dim)
        return 4 * self.num_heads * self.head_dim


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only MoE model. Counts are per model; sizes in elements."""

    name: str
    num_layers: int  # decoder layers, MTP layers not included
    num_moe_layers: int
    num_mtp_layers: int  # DeepSeek's multi-token-prediction modules (draft layers)
    hidden_size: int
    vocab_size: int
    dense_intermediate_size: int  # MLP of the dense layers (0 if there are none)
    moe_intermediate_size: int  # one routed expert
    num_experts: int  # routed experts per MoE layer
    top_k: int
    shared_intermediate_size: int  # all shared experts of one MoE layer together (0: none)
    attention: AttentionShape
    tie_word_embeddings: bool = False
    weight_dtype: str = "bf16"  # as the checkpoint stores it: bf16, fp8 or fp4

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.num_moe_layers < 1:
            raise ValueError(f"{self.name}: a dense model has no routed experts to plan for")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{self.name}: top_k = {self.top_k} not in [1, {self.num_experts}]")
        if self.num_moe_layers > self.num_layers:
            raise ValueError(f"{self.name}: {self.num_moe_layers} MoE layers > {self.num_layers}")

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def expert_params(self) -> int:
        """One routed expert: 3 * H * I."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_params(self) -> int:
        """The shared experts and the router of one MoE layer."""
        return 3 * self.hidden_size * self.shared_intermediate_size + (
            self.hidden_size * self.num_experts
        )

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def attention_params(self) -> int:
        return self.attention.params(self.hidden_size)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def total_params(self) -> int:
        """Parameters of the main model (MTP layers not included)."""
        return (
            self.num_layers * self.attention_params
            + self.num_dense_layers * self.dense_mlp_params
            + self.num_moe_layers * (self.num_experts * self.expert_params + self.shared_params)
            + self.embedding_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token uses (top-k routed experts; LM head included)."""
        return (
            self.num_layers * self.attention_params
            + self.num_dense_layers * self.dense_mlp_params
            + self.num_moe_layers * (self.top_k * self.expert_params + self.shared_params)
            + self.vocab_size * self.hidden_size
        )


# --------------------------------------------------------------------------- built-ins

# The fields of the published config.json files that shape_from_config reads.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-r1": {
        "_name_or_path": "deepseek-ai/DeepSeek-R1",
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "tie_word_embeddings": False,
        "topk_group": 4,
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 129280,
    },
    "qwen3-235b-a22b": {
        "_name_or_path": "Qwen/Qwen3-235B-A22B",
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "mlp_only_layers": [],
        "moe_intermediate_size": 1536,
        "num_attention_heads": 64,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 94,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    },
    "llama-4-maverick": {
        "_name_or_path": "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {
            "model_type": "llama4_text",
            "attention_chunk_size": 8192,
            "head_dim": 128,
            "hidden_size": 5120,
            "interleave_moe_layer_step": 2,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "num_attention_heads": 40,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 48,
            "num_key_value_heads": 8,
            "num_local_experts": 128,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "vocab_size": 202048,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}
BUILTIN_CONFIGS["deepseek-v3"] = {**BUILTIN_CONFIGS["deepseek-r1"]}
BUILTIN_CONFIGS["deepseek-v3"]["_name_or_path"] = "deepseek-ai/DeepSeek-V3"


def load_model_shape(name_or_path: str | Path) -> ModelShape:
    """A built-in model by name, a ``config.json`` file, or a folder holding one."""
    key = str(name_or_path)
    if key.lower() in BUILTIN_CONFIGS:
        return shape_from_config(BUILTIN_CONFIGS[key.lower()], name=key.lower())
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model {key!r}: neither a built-in ({', '.join(BUILTIN_CONFIGS)}) "
            "nor a config.json or a folder with one"
        )
    return shape_from_config(json.loads(path.read_text()), name=str(name_or_path))


def shape_from_config(config: dict[str, Any], name: str | None = None) -> ModelShape:
    """Read a Hugging Face ``config.json`` mapping (see the module docstring)."""
    name = name or str(config.get("_name_or_path") or config.get("model_type") or "model")
    weight_dtype = _weight_dtype(config)
    if isinstance(config.get("text_config"), dict):
        config = {
            **config["text_config"],
            "tie_word_embeddings": config.get(
                "tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False)
            ),
        }
    model_type = str(config.get("model_type", ""))
    num_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])

    num_experts = int(
        _first(config, "n_routed_experts", "num_experts", "num_local_experts", default=0) or 0
    )
    if num_experts < 1:
        raise ValueError(
            f"{name}: model_type {model_type!r} has no routed experts "
            "(n_routed_experts / num_experts / num_local_experts); the planner is for MoE models"
        )
    top_k = int(_first(config, "num_experts_per_tok", "moe_topk", "top_k"))
    moe_layers = _moe_layer_indices(config, model_type, num_layers)

    if model_type.startswith("llama4"):
        expert_size = int(config["intermediate_size"])
        dense_size = int(config.get("intermediate_size_mlp", 0))
        shared_size = expert_size  # one shared expert of the routed experts' size
    else:
        dense_size = int(config.get("intermediate_size", 0))
        expert_size = int(_first(config, "moe_intermediate_size", default=dense_size))
        if "n_shared_experts" in config:
            shared_size = int(config.get("n_shared_experts") or 0) * expert_size
        else:
            shared_size = int(config.get("shared_expert_intermediate_size") or 0)

    if "kv_lora_rank" in config and config.get("kv_lora_rank"):
        attention = AttentionShape(
            kind="mla",
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"]),
            q_lora_rank=int(config.get("q_lora_rank") or 0),
            kv_lora_rank=int(config["kv_lora_rank"]),
            qk_nope_head_dim=int(config["qk_nope_head_dim"]),
            qk_rope_head_dim=int(config["qk_rope_head_dim"]),
            v_head_dim=int(config["v_head_dim"]),
        )
    else:
        attention = AttentionShape(
            kind="gqa",
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden // num_heads),
        )

    return ModelShape(
        name=name,
        num_layers=num_layers,
        num_moe_layers=len(moe_layers),
        num_mtp_layers=int(config.get("num_nextn_predict_layers") or 0),
        hidden_size=hidden,
        vocab_size=int(config["vocab_size"]),
        dense_intermediate_size=dense_size if len(moe_layers) < num_layers else 0,
        moe_intermediate_size=expert_size,
        num_experts=num_experts,
        top_k=top_k,
        shared_intermediate_size=shared_size,
        attention=attention,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        weight_dtype=weight_dtype,
    )


def _moe_layer_indices(config: dict[str, Any], model_type: str, num_layers: int) -> list[int]:
    """Which decoder layers have routed experts, by each family's rule (as in HF)."""
    if model_type.startswith("deepseek") or "first_k_dense_replace" in config:
        first_dense = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        return [i for i in range(num_layers) if i >= first_dense and i % freq == 0]
    if model_type.startswith("llama4"):
        if config.get("moe_layers") is not None:
            return list(config["moe_layers"])
        step = int(config.get("interleave_moe_layer_step") or 1)
        return list(range(step - 1, num_layers, step))
    if "decoder_sparse_step" in config or "mlp_only_layers" in config:
        step = int(config.get("decoder_sparse_step") or 1)
        mlp_only = set(config.get("mlp_only_layers") or [])
        return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    return list(range(num_layers))


def _weight_dtype(config: dict[str, Any]) -> str:
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    algo = str(quant.get("quant_algo", "")).lower()
    if "fp4" in algo or "fp4" in method:
        return "fp4"
    if method == "fp8" or "fp8" in algo:
        return "fp8"
    return "bf16"


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ValueError(f"config.json has none of {keys}")
    return default
