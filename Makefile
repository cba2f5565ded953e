# make demo      -- install into .venv, then run the offline end-to-end pipeline on CPU (~5-10 min)
# make test      -- install into .venv, then run the test suite
# make headline  -- the demo pipeline over seeds 0, 1, 2: the README's table as mean ± std (~30 min on 2 CPU cores)
# make ablation  -- the paper's PPO ablation as a sweep over 3 seeds (~15 min on 2 CPU cores)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU-only machine takes the CPU build of torch that pip finds on local disk; an
# unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo headline ablation test test-fast clean

install: $(STAMP)

# constraints.txt pins every library but torch (see its header); torch follows TORCH_SPEC.
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,deepspeed]"
	touch $(STAMP)

demo: install
	$(PY) -m rlhf pipeline configs/pipeline_demo.yaml --fresh

headline: install
	$(PY) -m rlhf pipeline configs/pipeline_demo.yaml --seeds 0,1,2 --output-dir runs/headline --fresh

ablation: install
	$(PY) -m rlhf pipeline configs/pipeline_ablation.yaml --fresh

# no -x: one run reports every failure
test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
