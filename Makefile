# make demo: install, then the whole pipeline on the offline corpus with the tiny preset (CPU, ~5 min)
# make test: the test suite (CPU, a few minutes)
# PRESET=small make teacher distill sample bench: the same steps on one GPU
PY ?= python3
PRESET ?= tiny

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

bench:
	$(PY) bench.py --preset $(PRESET)

# --overwrite: the demo replaces its own earlier tiny run (out/*_tiny) instead of refusing to start
demo: setup data
	$(PY) teacher.py --preset $(PRESET) --overwrite
	$(PY) distill.py --preset $(PRESET) --k 4 --overwrite
	$(PY) sample.py --preset $(PRESET) --num_samples 3
	$(PY) bench.py --preset $(PRESET)

test:
	$(PY) -m pytest -q tests

clean:
	rm -rf out
