# make demo: install, then the whole pipeline on the offline corpus with the preset sized to the machine: tiny on a
#            CPU (~2 min on 2 idle cores), small on a GPU (PRESET=tiny make demo picks one)
# make test: the test suite (CPU, a few minutes)
# make teacher distill sample bench: the steps one at a time, with the same preset
PY ?= python3
# (deferred: asked when a recipe runs, i.e. after `setup` has installed torch)
PRESET ?= $(shell $(PY) -c "import torch; print('small' if torch.cuda.is_available() else 'tiny')" 2>/dev/null \
                  || echo tiny)

.PHONY: setup data teacher distill sample bench demo test clean

setup:
	$(PY) -m pip install -q -r requirements.txt

data:
	$(PY) prepare_data.py --dataset offline

teacher:
	$(PY) teacher.py --preset $(PRESET)

distill:
	$(PY) distill.py --preset $(PRESET) --k 4

sample:
	$(PY) sample.py --preset $(PRESET) --num_samples 3

# (--no-paper_shape: the paper shape's speed has commands of its own in the README; no effect on a CPU)
bench:
	$(PY) bench.py --preset $(PRESET) --no-paper_shape

# --overwrite: the demo replaces its own earlier tiny run (out/*_tiny) instead of refusing to start
demo: setup data
	$(PY) teacher.py --preset $(PRESET) --overwrite
	$(PY) distill.py --preset $(PRESET) --k 4 --overwrite
	$(PY) sample.py --preset $(PRESET) --num_samples 3
	$(PY) bench.py --preset $(PRESET) --no-paper_shape

test:
	$(PY) -m pytest -q tests

clean:
	rm -rf out
