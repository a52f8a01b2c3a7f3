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

.PHONY: venv data test demo bench-quality bench-serve clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
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

test: venv data
	GRAFIT_FASHION_MNIST=$(FASHION_MNIST) $(PY) -m pytest -q $(PYTEST_ARGS)

# Train (resumes if interrupted), export to ONNX with a parity check, write a
# gallery (500 training images per class) and the test split as PNG folders,
# then classify every test PNG at the fine level with serve.py.
demo: venv data
	$(PY) train.py --flagfile=configs/fashion_mnist.cfg --data_dir=$(FASHION_MNIST) \
	  --workdir=$(WORKDIR) $(TRAIN_ARGS)
	$(PY) export/export_onnx.py --workdir=$(WORKDIR) --data_dir=$(FASHION_MNIST)
	$(PY) export/fashion_mnist_png.py --data_dir=$(FASHION_MNIST) --split=train \
	  --max_per_class=500 --output=$(WORKDIR)/png/gallery --overwrite
	$(PY) export/fashion_mnist_png.py --data_dir=$(FASHION_MNIST) --split=test \
	  --output=$(WORKDIR)/png/test --overwrite
	$(PY) serve.py --model=$(WORKDIR)/export/embedder.onnx --images=$(WORKDIR)/png/test \
	  --output=$(WORKDIR)/serve --gallery=$(WORKDIR)/png/gallery \
	  --save_gallery=$(WORKDIR)/gallery.npz --labels_from_dirs --progress=false

bench-serve: venv data
	$(PY) bench/serve_throughput.py --workdir=$(WORKDIR)

bench-quality: venv data
	$(PY) bench/quality.py --config=configs/fashion_mnist.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce

clean:
	rm -rf runs
