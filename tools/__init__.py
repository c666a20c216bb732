"""Development tools of the vllm-wideep repository (not part of the installed package):
server launchers for tests and `make eval`, the gloo rank spawner for tests and benchmarks,
the accuracy kit (tasks, training of the tiny DeepSeek-V3, the eval runner)."""
