# make demo: install, then the whole pipeline on the offline corpus with the tiny preset (CPU, ~10 min)
# make test: the test suite (CPU, a few minutes)
PY ?= python3
PRESET ?= tiny

.PHONY: setup data teacher distill sample bench demo test clean

setup:
	$(PY) -m pip install -q -r requirements.txt

data:
	$(PY) prepare_data.py --dataset offline

teacher: data
	$(PY) teacher.py --preset $(PRESET) --resume || $(PY) teacher.py --preset $(PRESET)

distill: teacher
	$(PY) distill.py --preset $(PRESET) --k 4

sample:
	$(PY) sample.py --num_samples 3

bench:
	$(PY) bench.py --preset $(PRESET)

demo: setup data
	$(PY) teacher.py --preset $(PRESET) --overwrite
	$(PY) distill.py --preset $(PRESET) --k 4 --overwrite
	$(PY) sample.py --num_samples 3
	$(PY) bench.py --preset $(PRESET)

test:
	$(PY) -m pytest -q tests

clean:
	rm -rf out
