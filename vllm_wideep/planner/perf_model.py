"""The analytical step-time model: one decode step (or prefill chunk) on one GPU of an EP group.

Setting: attention data-parallel (every GPU holds all attention, dense-MLP, shared-expert and
LM-head weights and decodes its own ``B`` requests), routed experts spread over the ``ep``
GPUs of the group, each MoE layer runs dispatch -> grouped GEMM -> combine. docs/planner.md
explains each term; the planner's symbols (other symbols as in the package glossary,
vllm_wideep/__init__.py, with ep = R, one GPU per rank):

    B     requests decoding on each GPU (batch per GPU);  ctx  mean KV length, tokens
    d     MTP draft tokens per step;  a  acceptance of one draft given the earlier ones
    T     query tokens per GPU per main forward = B * (1 + d)
    L, L_dense, L_moe   decoder layers, of them dense and MoE (the package's L is L_moe)
    S, N  expert slots per GPU = ceil((E + redundant) / ep) + extra, of the group = S * ep
    u     imbalance: rows on the busiest GPU / mean rows per GPU (>= 1)
    BW, F achieved HBM bandwidth and FLOP/s of the GEMM's dtype (hardware.py)

Every GEMM-like term is a roofline, ``max(bytes / BW, FLOP / F)``, summed over layers:

    attention weights   L * P_attn * b_dense          bytes, 2 * L * P_attn * T FLOP
    attention KV        L * B * ctx * kv_elems * b_kv bytes, L * T * ctx * f_attn FLOP
    dense MLP           L_dense * 3 H I_dense          (as attention weights)
    shared experts      L_moe * (3 H I_shared + H E)
    routed experts      L_moe * S_active * 3 H I * b_expert bytes,
                        2 * L_moe * 3 H I * T * k * u FLOP,
                        S_active = S * (1 - (1 - k / N) ** (T * ep))   (slots hit at least once),
                        plus L_moe * expert_call_overhead (0 unless calibrated)
    LM head             V * H * b_lm bytes, 2 * V * H * T FLOP
    all-to-all          per MoE layer: 2 latencies + max(NVLink bytes / NVLink BW,
                        network bytes / NIC BW); bytes = T * r * H * (b_dispatch + b_combine) * u,
                        r = remote destination ranks per token (distinct ranks, own rank left out)
    MTP draft           d passes of one MoE layer + LM head over B tokens (with its all-to-all)
    step overhead       a fixed time per step (hardware profile)

    step = compute + comm - overlap * min(compute, comm)
    accepted tokens per step  A = 1 + a + a^2 + ... + a^d
    tokens/s per user = A / step;  tokens/s per GPU = B * A / step

Imbalance multiplies the routed-expert FLOP, the expert activation bytes and the all-to-all
volume (the busiest GPU sets the pace of every layer); it does not change which weights are
read. Memory: weights + B * ctx * kv bytes must fit in ``memory_utilization`` of HBM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from vllm_wideep.planner.hardware import HardwareProfile
from vllm_wideep.planner.model_shape import ModelShape
from vllm_wideep.planner.precision import Precision

Bound = Literal["memory", "compute", "network", "fixed"]


@dataclass(frozen=True)
class Deployment:
    """How the model runs on one EP group of ``ep_size`` GPUs (attention data-parallel)."""

    ep_size: int
    batch_per_gpu: float  # requests decoding concurrently on each GPU (may be fractional: a mean)
    context_len: float  # mean tokens in each request's KV cache
    imbalance: float = 1.0  # max / mean (token, expert) rows over the EP ranks
    mtp_tokens: int = 0  # draft tokens verified per step (0: no speculative decoding)
    mtp_acceptance: float = 0.0  # P(draft i accepted | drafts before i accepted)
    redundant_experts: int = 0  # extra expert slots in the group (EPLB replicas)
    extra_slots_per_gpu: int = 0  # more replicas: this many slots per GPU on top
    comm_overlap: float = 0.0  # fraction of min(compute, comm) hidden by overlap, [0, 1]
    memory_utilization: float = 0.9  # fraction of HBM for weights and KV cache

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size = {self.ep_size} must be >= 1")
        if self.batch_per_gpu <= 0:
            raise ValueError(f"batch_per_gpu = {self.batch_per_gpu} must be > 0")
        if self.context_len < 0:
            raise ValueError(f"context_len = {self.context_len} must be >= 0")
        if self.imbalance < 1:
            raise ValueError(f"imbalance = {self.imbalance} is max/mean and must be >= 1")
        if self.mtp_tokens < 0 or not 0 <= self.mtp_acceptance <= 1:
            raise ValueError(
                f"mtp_tokens = {self.mtp_tokens} must be >= 0 and mtp_acceptance = "
                f"{self.mtp_acceptance} in [0, 1]"
            )
        if self.redundant_experts < 0 or self.extra_slots_per_gpu < 0:
            raise ValueError(
                f"redundant_experts = {self.redundant_experts} and extra_slots_per_gpu = "
                f"{self.extra_slots_per_gpu} must be >= 0"
            )
        if not 0 <= self.comm_overlap <= 1:
            raise ValueError(f"comm_overlap = {self.comm_overlap} must be in [0, 1]")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization = {self.memory_utilization} not in (0, 1]")

    @property
    def accepted_tokens_per_step(self) -> float:
        """A = 1 + a + ... + a^d: tokens each request gains per step (the last verified
        token always comes from the main model)."""
        return sum(self.mtp_acceptance**i for i in range(self.mtp_tokens + 1))


@dataclass(frozen=True)
class Term:
    """One line of the step-time breakdown. ``seconds`` already includes its roofline."""

    name: str
    seconds: float
    bytes: float  # HBM bytes (network bytes for the all-to-all)
    flops: float
    bound: Bound


@dataclass(frozen=True)
class StepEstimate:
    """One decode step (or prefill chunk) on one GPU."""

    deployment: Deployment
    terms: tuple[Term, ...]
    compute_s: float
    comm_s: float
    step_s: float
    tokens_per_step_per_user: float  # accepted tokens (decode) or prompt tokens (prefill)
    weight_bytes: float  # per GPU
    kv_bytes_per_request: float
    max_batch_per_gpu: float  # requests whose KV cache fits next to the weights
    expert_intensity: float  # routed-expert FLOP per expert weight byte
    phase: Literal["decode", "prefill"] = "decode"
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.tokens_per_step_per_user / self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.deployment.batch_per_gpu * self.tokens_per_step_per_user / self.step_s

    @property
    def fits_in_memory(self) -> bool:
        return self.deployment.batch_per_gpu <= self.max_batch_per_gpu

    @property
    def bottleneck(self) -> str:
        return max(self.terms, key=lambda t: t.seconds).name

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)


# --------------------------------------------------------------------------- helpers


def slots_per_gpu(model: ModelShape, dep: Deployment) -> int:
    """S: expert slots on each GPU = ceil((E + redundant) / ep) + extra_slots_per_gpu.

    TensorRT-LLM's EP32 setting, 288 slots for 256 experts, is ``extra_slots_per_gpu=1``;
    DeepSeek's EP144 decode, 256 + 32 redundant = 2 per GPU, is the ceiling alone."""
    base = math.ceil((model.num_experts + dep.redundant_experts) / dep.ep_size)
    return base + dep.extra_slots_per_gpu


def active_slots(model: ModelShape, dep: Deployment, tokens_per_gpu: float) -> float:
    """Expected slots of one GPU that get >= 1 row when every GPU routes ``tokens_per_gpu``.

    A token hits a given slot with probability k / N (its k experts land on k of the N
    slots), so a slot stays idle with probability (1 - k/N)^(T * ep)."""
    slots = slots_per_gpu(model, dep)
    total_slots = slots * dep.ep_size
    p_hit = min(1.0, model.top_k / total_slots)
    return slots * (1.0 - (1.0 - p_hit) ** (tokens_per_gpu * dep.ep_size))


def destination_ranks(model: ModelShape, dep: Deployment) -> float:
    """Expected distinct EP ranks one token is dispatched to (own rank included).

    A rank holds S of the N slots; the token's k experts avoid it with probability
    binom(N - S, k) / binom(N, k) = prod_{i<k} (N - S - i) / (N - i)."""
    slots = slots_per_gpu(model, dep)
    total = slots * dep.ep_size
    k = min(model.top_k, total)
    p_miss = 1.0
    for i in range(k):
        p_miss *= max(0.0, (total - slots - i) / (total - i))
    return dep.ep_size * (1.0 - p_miss)


def _roofline(name: str, nbytes: float, flops: float, bandwidth: float, rate: float) -> Term:
    memory_s, compute_s = nbytes / bandwidth, flops / rate
    if compute_s > memory_s:
        return Term(name, compute_s, nbytes, flops, "compute")
    return Term(name, memory_s, nbytes, flops, "memory")


def _all_to_all(
    model: ModelShape,
    hw: HardwareProfile,
    prec: Precision,
    dep: Deployment,
    tokens: float,
    layers: int,
) -> Term:
    """Dispatch + combine of ``layers`` MoE layers for ``tokens`` tokens per GPU."""
    if dep.ep_size == 1 or layers == 0 or tokens == 0:
        return Term("all-to-all", 0.0, 0.0, 0.0, "network")
    ep = dep.ep_size
    remote_ranks = destination_ranks(model, dep) * (ep - 1) / ep
    bytes_per_copy = model.hidden_size * (prec.dispatch_bytes + prec.combine_bytes)
    volume = tokens * remote_ranks * bytes_per_copy * dep.imbalance  # per layer, busiest GPU
    domain = min(ep, hw.scale_up_domain)
    up_share = (domain - 1) / (ep - 1)
    up_s = volume * up_share / (hw.scale_up_bandwidth * hw.network_efficiency)
    out_s = 0.0
    if up_share < 1:
        if hw.scale_out_bandwidth <= 0:
            raise ValueError(f"{hw.name}: EP {ep} leaves the NVLink domain but has no NIC")
        out_s = volume * (1 - up_share) / (hw.scale_out_bandwidth * hw.network_efficiency)
    latency = hw.scale_out_latency if ep > hw.scale_up_domain else hw.scale_up_latency
    seconds = layers * (2 * latency + max(up_s, out_s))
    return Term("all-to-all", seconds, layers * volume, 0.0, "network")


@dataclass(frozen=True)
class _Pass:
    """One forward pass: which layers run, over how many tokens."""

    tokens: float  # query tokens per GPU
    users: float  # requests whose KV cache is read
    attention_layers: int
    dense_layers: int
    moe_layers: int
    lm_head_tokens: float
    glue_params: int = 0  # MTP's eh_proj (2H x H)


def _pass_terms(
    model: ModelShape,
    hw: HardwareProfile,
    prec: Precision,
    dep: Deployment,
    p: _Pass,
    context_len: float,
    attention_flops_per_cached: int,
    kv_read: bool,
) -> list[Term]:
    bw = hw.achieved_memory_bandwidth
    dense_rate = hw.achieved_flops(prec.dense_compute)
    act = prec.activation_bytes
    t = p.tokens
    terms = []

    # Activations: each GEMM stage reads its input and writes its output, H wide.
    def act_bytes(layers: int) -> float:
        return layers * 2 * t * model.hidden_size * act

    attn_params = p.attention_layers * model.attention_params + p.glue_params
    terms.append(
        _roofline(
            "attention weights",
            attn_params * prec.dense_weight_bytes + act_bytes(p.attention_layers),
            2 * attn_params * t,
            bw,
            dense_rate,
        )
    )

    kv_elems = model.attention.kv_elements_per_token
    kv_bytes = p.attention_layers * p.users * context_len * kv_elems * prec.kv_bytes
    if not kv_read:  # prefill: the chunk writes its KV once; keys are read from on-chip tiles
        kv_bytes = p.attention_layers * t * kv_elems * prec.kv_bytes
    terms.append(
        _roofline(
            "attention KV",
            kv_bytes,
            p.attention_layers * t * context_len * attention_flops_per_cached,
            bw,
            hw.achieved_flops(prec.attention_compute),
        )
    )

    dense_params = p.dense_layers * model.dense_mlp_params
    terms.append(
        _roofline(
            "dense MLP",
            dense_params * prec.dense_weight_bytes + act_bytes(p.dense_layers),
            2 * dense_params * t,
            bw,
            dense_rate,
        )
    )

    shared = p.moe_layers * model.shared_params
    terms.append(
        _roofline(
            "shared experts",
            shared * prec.dense_weight_bytes + act_bytes(p.moe_layers),
            2 * shared * t,
            bw,
            dense_rate,
        )
    )

    rows = t * model.top_k * dep.imbalance  # (token, expert) rows on the busiest GPU
    slots = active_slots(model, dep, t)
    expert_weight_bytes = p.moe_layers * slots * model.expert_params * prec.expert_weight_bytes
    experts = _roofline(
        "routed experts",
        expert_weight_bytes + p.moe_layers * 2 * rows * model.hidden_size * act,
        2 * p.moe_layers * model.expert_params * rows,
        bw,
        hw.achieved_flops(prec.expert_compute),
    )
    terms.append(replace(experts, seconds=experts.seconds + p.moe_layers * hw.expert_call_overhead))

    lm_params = model.vocab_size * model.hidden_size
    lm_rate = hw.achieved_flops("bf16" if prec.lm_head_bytes >= 2 else prec.dense_compute)
    terms.append(
        _roofline(
            "LM head",
            lm_params * prec.lm_head_bytes,
            2 * lm_params * p.lm_head_tokens,
            bw,
            lm_rate,
        )
    )
    terms.append(_all_to_all(model, hw, prec, dep, t, p.moe_layers))
    return terms


def _by_name(terms: list[Term]) -> dict[str, Term]:
    return {t.name: t for t in terms}


def weight_bytes_per_gpu(model: ModelShape, prec: Precision, dep: Deployment) -> float:
    """Weights each GPU holds: all non-expert weights (data-parallel), S expert slots per MoE
    layer, and the MTP layers (each one MoE decoder layer plus its 2H x H projection)."""
    slots = slots_per_gpu(model, dep)
    dense = (
        model.num_layers * model.attention_params
        + model.num_dense_layers * model.dense_mlp_params
        + model.num_moe_layers * model.shared_params
    )
    experts = model.num_moe_layers * slots * model.expert_params
    mtp_dense = model.num_mtp_layers * (
        model.attention_params + model.shared_params + 2 * model.hidden_size**2
    )
    mtp_experts = model.num_mtp_layers * slots * model.expert_params
    return (
        (dense + mtp_dense) * prec.dense_weight_bytes
        + (experts + mtp_experts) * prec.expert_weight_bytes
        + model.embedding_params * prec.lm_head_bytes
    )


def kv_bytes_per_token(model: ModelShape, prec: Precision) -> float:
    """KV cache bytes of one token over all layers, MTP layers included."""
    layers = model.num_layers + model.num_mtp_layers
    return layers * model.attention.kv_elements_per_token * prec.kv_bytes


def _memory(
    model: ModelShape, hw: HardwareProfile, prec: Precision, dep: Deployment
) -> tuple[float, float, float]:
    weights = weight_bytes_per_gpu(model, prec, dep)
    per_request = kv_bytes_per_token(model, prec) * max(dep.context_len, 1.0)
    free = hw.memory_bytes * dep.memory_utilization - weights
    return weights, per_request, max(0.0, free) / per_request


def _finish(
    model: ModelShape,
    hw: HardwareProfile,
    prec: Precision,
    dep: Deployment,
    merged: dict[str, Term],
    tokens_per_step: float,
    phase: Literal["decode", "prefill"],
) -> StepEstimate:
    overhead = Term("step overhead", hw.step_overhead, 0.0, 0.0, "fixed")
    terms = (*merged.values(), overhead)
    comm = sum(t.seconds for t in terms if t.bound == "network")
    compute = sum(t.seconds for t in terms if t.bound != "network")
    step = compute + comm - dep.comm_overlap * min(compute, comm)
    weights, per_request, max_batch = _memory(model, hw, prec, dep)
    if phase == "prefill":  # batch_per_gpu counts prompt tokens there
        max_batch *= max(dep.context_len, 1.0)
    return StepEstimate(
        deployment=dep,
        terms=terms,
        compute_s=compute,
        comm_s=comm,
        step_s=step,
        tokens_per_step_per_user=tokens_per_step,
        weight_bytes=weights,
        kv_bytes_per_request=per_request,
        max_batch_per_gpu=max_batch,
        expert_intensity=expert_intensity(model, prec, dep),
        phase=phase,
    )


def expert_intensity(model: ModelShape, prec: Precision, dep: Deployment) -> float:
    """Arithmetic intensity of one decode step's grouped GEMM on the busiest GPU:
    FLOP per byte of expert weights read = 2 * rows / (S_active * b_expert)
    (rows = T * k * u; each active slot's 3HI weights serve rows/S_active rows)."""
    tokens = dep.batch_per_gpu * (1 + dep.mtp_tokens)
    rows = tokens * model.top_k * dep.imbalance
    return 2 * rows / (active_slots(model, dep, tokens) * prec.expert_weight_bytes)


# --------------------------------------------------------------------------- public


def decode_step(
    model: ModelShape, hw: HardwareProfile, prec: Precision, dep: Deployment
) -> StepEstimate:
    """Time of one decode step on the busiest GPU, with its term-by-term breakdown."""
    b, d = dep.batch_per_gpu, dep.mtp_tokens
    main = _Pass(
        tokens=b * (1 + d),
        users=b,
        attention_layers=model.num_layers,
        dense_layers=model.num_dense_layers,
        moe_layers=model.num_moe_layers,
        lm_head_tokens=b * (1 + d),
    )
    flops_per_cached = model.attention.decode_flops_per_cached_token
    merged = _by_name(
        _pass_terms(model, hw, prec, dep, main, dep.context_len, flops_per_cached, True)
    )
    if d:
        # DeepSeek's MTP module is one MoE decoder layer plus a 2H x H projection, run once
        # per draft token over the B requests; other drafters are assumed to cost the same.
        draft = _Pass(
            tokens=b,
            users=b,
            attention_layers=1,
            dense_layers=0,
            moe_layers=1,
            lm_head_tokens=b,
            glue_params=2 * model.hidden_size**2,
        )
        draft_terms = _pass_terms(
            model, hw, prec, dep, draft, dep.context_len, flops_per_cached, True
        )
        compute = [t for t in draft_terms if t.bound != "network"]
        comm = [t for t in draft_terms if t.bound == "network"]
        drafting = Term(
            "MTP draft",
            d * sum(t.seconds for t in compute),
            d * sum(t.bytes for t in compute),
            d * sum(t.flops for t in compute),
            "compute" if any(t.bound == "compute" for t in compute) else "memory",
        )
        merged["MTP draft"] = drafting
        a2a = merged["all-to-all"]
        extra = d * sum(t.seconds for t in comm)
        merged["all-to-all"] = replace(
            a2a, seconds=a2a.seconds + extra, bytes=a2a.bytes + d * sum(t.bytes for t in comm)
        )
    return _finish(model, hw, prec, dep, merged, dep.accepted_tokens_per_step, "decode")


def prefill_step(
    model: ModelShape, hw: HardwareProfile, prec: Precision, dep: Deployment
) -> StepEstimate:
    """One prefill chunk: ``batch_per_gpu`` prompt tokens per GPU, prompts of
    ``context_len`` tokens (causal attention: each token attends to (ctx + 1) / 2 keys on
    average); the LM head runs on the last token of each prompt only.

    ``tokens_per_s_per_gpu`` is prompt tokens per second; ``tokens_per_s_per_user`` has
    no meaning here."""
    n = dep.batch_per_gpu
    prompts = n / max(dep.context_len, 1.0)
    chunk = _Pass(
        tokens=n,
        users=prompts,
        attention_layers=model.num_layers,
        dense_layers=model.num_dense_layers,
        moe_layers=model.num_moe_layers,
        lm_head_tokens=prompts,
    )
    merged = _by_name(
        _pass_terms(
            model,
            hw,
            prec,
            dep,
            chunk,
            (dep.context_len + 1) / 2,
            model.attention.prefill_flops_per_cached_token,
            False,
        )
    )
    return _finish(model, hw, prec, dep, merged, 1.0, "prefill")
