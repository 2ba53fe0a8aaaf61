# make demo: install, then the whole pipeline with the preset sized to the machine: tiny on a CPU
#            (character-level Shakespeare, about 10 minutes on 2 idle cores), small on a GPU
#            (GPT-2 tokens of the offline corpus); PRESET=tiny make demo picks one. The demo's
#            summaries, samples, plots and data meta.json are copied into results/.
# make test: the test suite (CPU, 1-3 minutes)
# make data teacher distill sample bench: the steps one at a time, with the same preset
PY ?= python3
# (deferred: asked when a recipe runs, i.e. after `setup` has installed torch)
PRESET ?= $(shell $(PY) -c "import torch; print('small' if torch.cuda.is_available() else 'tiny')" \
                  2>/dev/null || echo tiny)
DATASET = $(if $(filter tiny,$(PRESET)),shakespeare_char,offline)

.PHONY: setup data teacher distill sample bench demo test clean

setup:
	$(PY) -m pip install -q -r requirements.txt

data:
	$(PY) prepare_data.py --dataset $(DATASET)

teacher:
	$(PY) teacher.py --preset $(PRESET) --overwrite

distill:
	$(PY) distill.py --preset $(PRESET) --k 4 --overwrite

sample:   # (into out/ first: a failing sample.py stops make and leaves results/ as it was)
	$(PY) sample.py --preset $(PRESET) --num_samples 2 > out/sample_$(PRESET).txt
	cp out/sample_$(PRESET).txt results/ && cat results/sample_$(PRESET).txt

bench:
	$(PY) bench.py --preset $(PRESET) --name bench_$(PRESET)

demo: setup data teacher distill sample bench
	cp out/teacher_$(PRESET)/teacher_$(PRESET).json out/distill_$(PRESET)/distill_$(PRESET).json \
	   out/distill_$(PRESET)/distill_$(PRESET)_curve.png results/
	cp data/$(DATASET)/meta.json results/data_$(DATASET).json

test:
	$(PY) -m pytest -q tests

clean:
	rm -rf out
