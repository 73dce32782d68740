"""Memory of a training run: the architecture (memory.arch), the estimate (memory.estimate), a real measuring run
(memory.measure) and the `velora memory-estimate` command that puts them together (memory.command)."""
