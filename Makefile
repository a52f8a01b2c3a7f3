# grafit-tf: `make demo` trains, exports, serves and prints the fine-level results;
# `make test` runs the test suite. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# Extra train.py flags for the demo, e.g. TRAIN_ARGS="--epochs=1 --max_train_examples=2000".
TRAIN_ARGS ?=

.PHONY: venv data test demo bench-quality bench-coarse2 bench-coarse-ce-wd bench-equal-budget bench-speed bench-serve clean

venv: $(VENV)/.installed

# The pinned stack, then grafit_tf itself, editable (its dependencies are the pinned ones).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Fashion-MNIST ships in Debian's package dataset-fashion-mnist.
data:
	@if [ -f "$(FASHION_MNIST)/t10k-images-idx3-ubyte.gz" ]; then \
	  echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian's dataset-fashion-mnist ..."; \
	  (apt-get install -y -q dataset-fashion-mnist || \
	   (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'" \
	       "(or set FASHION_MNIST=DIR to a folder with the four IDX .gz files)."; exit 1; \
	fi

# The optional engine of serve.py --engine=ray, so that its tests run too.
$(VENV)/.scale: $(VENV)/.installed requirements-scale.txt
	$(PY) -m pip install -q -r requirements-scale.txt
	touch $@

# Two pytest processes (pytest-xdist), a test file each at a time: most of a test's
# time is tracing graphs, which runs on one core. PYTEST_WORKERS=0 runs in-process.
PYTEST_WORKERS ?= 2
test: venv $(VENV)/.scale data
	GRAFIT_FASHION_MNIST=$(FASHION_MNIST) $(PY) -m pytest -q -n $(PYTEST_WORKERS) \
	  --dist loadfile $(PYTEST_ARGS)

# Train (resumes if interrupted), export to ONNX with a parity check, write a
# gallery (500 training images per class) and the test split as PNG folders,
# then classify every test PNG at the fine level with serve.py (into a fresh folder: a
# folder holding another model's results is refused).
demo: venv data
	$(PY) train.py --flagfile=configs/fashion_mnist.cfg --data_dir=$(FASHION_MNIST) \
	  --workdir=$(WORKDIR) $(TRAIN_ARGS)
	$(PY) export/export_onnx.py --workdir=$(WORKDIR) --data_dir=$(FASHION_MNIST)
	$(PY) export/fashion_mnist_png.py --data_dir=$(FASHION_MNIST) --split=train \
	  --max_per_class=500 --output=$(WORKDIR)/png/gallery --overwrite
	$(PY) export/fashion_mnist_png.py --data_dir=$(FASHION_MNIST) --split=test \
	  --output=$(WORKDIR)/png/test --overwrite
	rm -rf $(WORKDIR)/serve
	$(PY) serve.py --model=$(WORKDIR)/export/embedder.onnx --images=$(WORKDIR)/png/test \
	  --output=$(WORKDIR)/serve --gallery=$(WORKDIR)/png/gallery \
	  --save_gallery=$(WORKDIR)/gallery.npz --labels_from_dirs --progress=false

# The benches run from the repository root as modules (python -m bench.<name>), so that
# `bench` and `grafit_tf` import without any sys.path edit.

# The default's tables in BENCHMARKS.md (quality, quality_seeds; bench/results/quality*.json
# and the two quality_*.png pictures): every method on seed 0 with raw pixels, then every
# method over three seeds (seed 0 reused), then maskcon (w = 0.5) over three seeds. Fifteen
# runs of 15-75 minutes on 2 CPU cores.
bench-quality: venv data
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --seeds=3 --name=quality_seeds \
	  --raw_pixels=false
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg --methods=maskcon \
	  --override=--lambda_inst=1 --seeds=3 --workdir=runs/quality_maskcon \
	  --name=quality_maskcon_seeds --raw_pixels=false
	$(PY) -m bench.plots --workdir=runs/quality --name=quality

# The default config on the second coarse grouping (2 classes): grafit and coarse_ce on
# seed 0 and raw pixels, table quality_coarse2 (about 45 minutes on 2 CPU cores).
bench-coarse2: venv data
	$(PY) -m bench.quality --config=configs/fashion_mnist_coarse2.cfg \
	  --methods=grafit,coarse_ce --workdir=runs/quality_coarse2 --name=quality_coarse2

# The coarse classifier at weight decay 0.01 instead of the default's 0.2, over three
# seeds: table quality_coarse_ce_wd001_seeds (three runs of 30-45 minutes on 2 CPU cores).
bench-coarse-ce-wd: venv data
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg --methods=coarse_ce \
	  --override=--weight_decay=0.01 --seeds=3 --workdir=runs/quality_coarse_ce_wd001 \
	  --name=quality_coarse_ce_wd001_seeds --raw_pixels=false

# Equal tuning budgets: every method's learning rate x weight decay (3 x 3) chosen on a
# validation split held out of the training images (4 epochs each), then trained at full
# length over three seeds and scored once on the test split; the 2-class and the cross
# grouping reuse the settings chosen on the 4-class one; maskcon at its w = 0.5. About
# 135 runs: days on 2 CPU cores, hours on a GPU.
EQUAL = --methods=grafit,coarse_ce,instance,maskcon,fine_ce --seeds=3 --raw_pixels=false \
  --override=maskcon:--lambda_inst=1
bench-equal-budget: venv data
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg $(EQUAL) --select_on=validation \
	  --workdir=runs/equal --name=quality_equal
	$(PY) -m bench.quality --config=configs/fashion_mnist_coarse2.cfg $(EQUAL) \
	  --chosen=bench/results/quality_equal.json --workdir=runs/equal_coarse2 \
	  --name=quality_equal_coarse2
	$(PY) -m bench.quality --config=configs/fashion_mnist.cfg $(EQUAL) \
	  --override=--coarse_map=grafit_tf/data/maps/fashion_mnist_cross4.json \
	  --chosen=bench/results/quality_equal.json --workdir=runs/equal_cross4 \
	  --name=quality_equal_cross4

# Speed as ratios measured in turns against a reference (bench/speed.py): the input
# pipeline, grafit vs coarse_ce steps, oneDNN and bfloat16, kNN vs faiss, serving.
# About 25 minutes on 2 CPU cores; writes bench/results/speed.json.
bench-speed: venv
	$(PY) -m bench.speed

# Serving throughput of the finished run in $(WORKDIR) (make demo first): serve.py over
# the 10,000 test PNGs, embedding-only onnxruntime vs Keras, --engine=ray vs local, and a
# rerun after a kill at half the shards; writes bench/results/serve.json (minutes).
bench-serve: venv $(VENV)/.scale data
	$(PY) -m bench.serve_throughput --workdir=$(WORKDIR) --data_dir=$(FASHION_MNIST)

clean:
	rm -rf runs
