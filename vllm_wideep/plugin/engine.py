"""Engine-config hook: check and adjust vLLM's settings when wide EP is on.

Wraps `EngineArgs.create_engine_config`, which every entry point (LLM, serve, headless)
calls in the front-end process before any worker starts, so a bad setting fails here,
before a weight is loaded.
"""

from __future__ import annotations

from vllm_wideep.plugin.config import ADDITIONAL_CONFIG_KEY, WideEPConfig

_PATCHED_MARK = "_vllm_wideep_engine_patched"
_DEFAULT_ALL2ALL = "allgather_reducescatter"


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm_wideep")


def adjust_engine_args(engine_args, config: WideEPConfig) -> None:
    """Refuse conflicting options and set the ones wide EP needs (in place, logged)."""
    logger = _logger()
    if engine_args.enable_eplb:
        raise ValueError(
            "vllm_wideep: --enable-eplb (vLLM's own load balancer) cannot run with "
            "--enable-wideep: the two would move the same expert weights. Drop "
            "--enable-eplb; wide EP brings its own balancer."
        )
    if engine_args.enable_dbo:
        raise ValueError(
            "vllm_wideep: --enable-dbo (dual-batch overlap) is not supported with "
            "--enable-wideep yet: it needs vLLM's DeepEP all2all backends, which "
            "wide EP replaces. Drop --enable-dbo."
        )
    if engine_args.pipeline_parallel_size > 1:
        raise ValueError(
            "vllm_wideep: --pipeline-parallel-size > 1 is not supported with --enable-wideep."
        )
    if engine_args.prefill_context_parallel_size > 1:
        raise ValueError(
            "vllm_wideep: --prefill-context-parallel-size > 1 is not supported with "
            "--enable-wideep."
        )
    if engine_args.all2all_backend != _DEFAULT_ALL2ALL:
        logger.warning(
            "vllm_wideep: --all2all-backend %s is replaced by wide EP's own token "
            "exchange (%s); using vLLM's default %s for everything else.",
            engine_args.all2all_backend,
            config.a2a_backend,
            _DEFAULT_ALL2ALL,
        )
        engine_args.all2all_backend = _DEFAULT_ALL2ALL
    _disable_cuda_graphs(engine_args)
    if not engine_args.enable_expert_parallel:
        logger.info(
            "vllm_wideep: enabling expert parallelism (EP size = DP x TP = %d).",
            engine_args.data_parallel_size * engine_args.tensor_parallel_size,
        )
        engine_args.enable_expert_parallel = True


def _disable_cuda_graphs(engine_args) -> None:
    """The `a2a` exchange learns its split sizes on the host (a sync per layer), which a
    CUDA graph cannot capture: run the engine without graphs on GPUs."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike() or engine_args.enforce_eager:
        return
    compilation = engine_args.compilation_config
    if isinstance(compilation, dict):
        compilation = CompilationConfig(**compilation)
    if compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        _logger().warning(
            "vllm_wideep: cudagraph_mode %s replaced by NONE: the a2a exchange syncs "
            "with the host.",
            compilation.cudagraph_mode,
        )
    else:
        _logger().info("vllm_wideep: CUDA graphs off (the a2a exchange syncs with the host).")
    compilation.cudagraph_mode = CUDAGraphMode.NONE
    engine_args.compilation_config = compilation


def check_model(model_config, data_parallel_size: int, tensor_parallel_size: int) -> None:
    """Refuse models wide EP cannot serve, naming the model and the numbers.

    Runs before vLLM builds its config: with expert parallelism forced on, vLLM's own
    check would refuse a dense model first, with a message that does not say why."""
    num_experts = model_config.get_num_experts()
    if num_experts <= 0:
        raise ValueError(
            f"vllm_wideep: --enable-wideep needs a mixture-of-experts model, but "
            f"{model_config.model!r} ({', '.join(model_config.architectures or [])}) "
            f"has no routed experts. Drop --enable-wideep for dense models."
        )
    ep_size = data_parallel_size * tensor_parallel_size
    if num_experts % ep_size != 0:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"vllm_wideep: the EP size (data parallel {data_parallel_size} x tensor "
            f"parallel {tensor_parallel_size} = {ep_size}) must divide the number of "
            f"routed experts ({num_experts}) of {model_config.model!r}; EP sizes that "
            f"do: {divisors}"
        )


def patch_engine_config() -> None:
    """Wrap `EngineArgs.create_engine_config` (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _PATCHED_MARK, False):
        return
    setattr(EngineArgs, _PATCHED_MARK, True)
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = WideEPConfig.from_additional_config(self.additional_config)
        if not config.enabled:
            return original(self, *args, **kwargs)
        # Store the validated, complete option set: workers read it back from here.
        self.additional_config = {
            **(self.additional_config or {}),
            ADDITIONAL_CONFIG_KEY: config.to_dict(),
        }
        adjust_engine_args(self, config)
        check_model(self.create_model_config(), self.data_parallel_size, self.tensor_parallel_size)
        vllm_config = original(self, *args, **kwargs)
        _logger().info("vllm_wideep: wide EP enabled with %s", config)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
