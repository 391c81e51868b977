# Everything a fresh machine needs: `make demo` and `make test` create and reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cfgpar-installed
# torch 2.13.0 is a local CPU build on this kind of machine; a looser pin pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install demo test bench docs gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

# The embedded shapes model edits a held-out picture, the two CFG branches on two ranks.
demo: install
	$(VENV)/bin/cfgpar edit --image examples/assets/shapes-input.png --prompt "make the circle blue" \
		--negative-prompt "low quality, blurry" --cfg-scale 4 --cfg-parallel-size 2 --output outputs/demo-edit.png

# Then, with the CPU kernels capped at AVX2 (tests/conftest.py) as on the weakest machine CI may
# run on, the exactness claims that compare computations of different shapes (sequence shards,
# VAE bands, outputs split over ranks): an ISA can change how a kernel rounds a row at another row
# count. Claims between equal shapes (CFG branches on 1, 2, 3 ranks) hold on any ISA.
AVX2_FILES := tests/test_engine.py tests/test_sequence_parallel.py tests/test_vae_patch.py tests/test_flux.py
test: install
	$(PY) -m pytest -q --durations=15
	CFGPAR_TEST_CPU=avx2 $(PY) -m pytest -q -m "exactness and not surface" --durations=8 $(AVX2_FILES)

bench: install
	$(VENV)/bin/cfgpar bench

# docs/parameters.md, generated from the docstrings of the parameter dataclasses (tests/test_docs.py checks it).
docs: install
	$(PY) docs/gen_parameters.py

# What benchmarks/gpu_check.sh needs on a GPU machine that has torch and transformers but no
# diffusers (pure-Python wheel; carried there in .whl/).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl diffusers==0.42.1

clean:
	rm -rf $(VENV) .cache
