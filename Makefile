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

.PHONY: venv data test demo bench-quality bench-two-views bench-views3-gamma bench-coarse2 bench-ablation bench-ablation-full bench-postprocess bench-retrieval-features bench-per-class bench-serve clean

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

# Two pytest processes (pytest-xdist), a test file each at a time: most of a test's
# time is tracing graphs, which runs on one core. PYTEST_WORKERS=0 runs in-process.
PYTEST_WORKERS ?= 2
test: venv data
	GRAFIT_FASHION_MNIST=$(FASHION_MNIST) $(PY) -m pytest -q -n $(PYTEST_WORKERS) \
	  --dist loadfile $(PYTEST_ARGS)

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

# The default's tables in BENCHMARKS.md: every method on seed 0 with raw pixels, then
# every method over three seeds (seed 0 reused), then the pictures. Twelve runs, about
# 4.5 hours on 2 cores, two side by side (grafit alone: 20-32 minutes, by the hour).
bench-quality: venv data
	$(PY) bench/quality.py --config=configs/fashion_mnist.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce
	$(PY) bench/quality.py --config=configs/fashion_mnist.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --seeds=3 --name=quality_seeds \
	  --raw_pixels=false
	$(PY) bench/plots.py --workdir=runs/quality --name=quality

# The same tables for the fourth default config (two views, no gamma, weight decay 0.05;
# configs/fashion_mnist_two_views.cfg), which most of BENCHMARKS.md was measured with.
bench-two-views: venv data
	$(PY) bench/quality.py --config=configs/fashion_mnist_two_views.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --workdir=runs/quality_two_views \
	  --name=quality_two_views
	$(PY) bench/quality.py --config=configs/fashion_mnist_two_views.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --seeds=3 --workdir=runs/quality_two_views \
	  --name=quality_two_views_seeds --raw_pixels=false
	$(PY) bench/plots.py --workdir=runs/quality_two_views --name=quality_two_views

# The finished runs of bench-two-views (three seeds of every method; trains none), scored
# with each --embedding_transform: none, center, whiten (about 10 minutes).
bench-postprocess: venv data
	$(PY) bench/postprocess.py --config=configs/fashion_mnist_two_views.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --seeds=3 --workdir=runs/quality_two_views

# Which feature of bench-two-views' seed-0 grafit and coarse_ce runs to retrieve with:
# each stage, hypercolumns, the EMA target trunk, flipping (trains none; about 15 minutes).
bench-retrieval-features: venv data
	$(PY) bench/retrieval_features.py --config=configs/fashion_mnist_two_views.cfg \
	  --methods=grafit,coarse_ce \
	  --features=trunk,target_trunk,trunk_flip,stage_0,stage_1,stages_1_2,stages_0_1_2 \
	  --workdir=runs/quality_two_views

# Fine kNN top-1 of each fine class for bench-two-views' seed-0 grafit and coarse_ce runs
# and raw pixels (trains none; a few minutes).
bench-per-class: venv data
	$(PY) bench/per_class.py --config=configs/fashion_mnist_two_views.cfg \
	  --methods=grafit,coarse_ce --workdir=runs/quality_two_views

# The same bench on the second coarse grouping (2 classes; about 45 minutes).
bench-coarse2: venv data
	$(PY) bench/quality.py --config=configs/fashion_mnist_coarse2.cfg \
	  --methods=grafit,coarse_ce --workdir=runs/quality_coarse2 --name=quality_coarse2

# The same bench with three views and a random gamma (configs/fashion_mnist_views3_gamma.cfg):
# every method on seed 0, then every method over three seeds (seed 0 is reused;
# about 1.5 hours each on a fast 2-core machine, an estimate), then which of grafit's
# layers retrieves best over those three seeds (trains none; about 10 minutes).
bench-views3-gamma: venv data
	$(PY) bench/quality.py --config=configs/fashion_mnist_views3_gamma.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --workdir=runs/quality_v3g --name=quality_v3g
	$(PY) bench/quality.py --config=configs/fashion_mnist_views3_gamma.cfg \
	  --methods=grafit,coarse_ce,instance,fine_ce --seeds=3 --workdir=runs/quality_v3g \
	  --name=quality_v3g_seeds --raw_pixels=false
	$(PY) bench/retrieval_features.py --config=configs/fashion_mnist_views3_gamma.cfg \
	  --workdir=runs/quality_v3g --methods=grafit --seeds=3 \
	  --features=trunk,knn_head,projector,predictor --name=retrieval_heads_v3g

# The 2-epoch ablations (about 5 minutes a row on idle cores), each pinning the default
# it started from: the first default config (the path to the second); the second (crop
# 0.8, InfoNCE, lambda 1: loss weight, temperatures, memory kind and size, instance
# queue, views, retrieval layer); the third (lambda 0.5, queue memory: jitter, learning
# rate, batch size, and the coarse classifier under the same settings); the fourth (two
# views, batch 128, configs/fashion_mnist_two_views.cfg: temperatures, and two options
# beyond the paper: same-coarse InfoNCE negatives and local crops).
bench-ablation: venv data
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=2 \
	  --base=--crop_scale_min=0.35 --base=--instance_loss=byol --base=--lambda_inst=1.0 --base=--batch_size=256 --base=--memory=full \
	  --variants=default,lambda_0,tau_0.1,instance_infonce,crop_1.0,crop_0.8,crop_0.8_tau_0.1,crop_0.8_infonce,grafit_maskcon
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=2 \
	  --base=--lambda_inst=1.0 --base=--batch_size=256 --base=--memory=full --workdir=runs/ablation_current \
	  --name=ablation_current --variants=default,lambda_0.5,lambda_2,tau_0.1,instance_tau_0.2,instance_queue_4096,instance_queue_16384,memory_queue_8192,views_3,embedding_knn_head
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=2 \
	  --base=--batch_size=256 --workdir=runs/ablation_third --name=ablation_third --variants=default,jitter_0,jitter_0.6,jitter_0.8,learning_rate_4e-3,batch_128,coarse_ce,coarse_ce_jitter_0
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=2 \
	  --workdir=runs/ablation_fourth --name=ablation_fourth --variants=default,tau_0.03,instance_tau_0.05,negatives_same_coarse,local_crops_2

# Full-length (10-epoch) runs of the instance-loss weight, the queue memory and batch 128
# (20-27 minutes a row on idle cores; the first two rows are the grafit runs of
# bench-quality for the second and third default configs, the last one bench-two-views'),
# then of the two options beyond the paper around the fourth default (whose row is
# bench-two-views' grafit run).
bench-ablation-full: venv data
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=10 \
	  --base=--lambda_inst=1.0 --base=--batch_size=256 --base=--memory=full --workdir=runs/lambda_full --name=ablation_full \
	  --variants=default,lambda_0.5,lambda_0.25,lambda_0.5_queue_8192,lambda_0.5_queue_8192_batch_128
	$(PY) bench/ablation.py --config=configs/fashion_mnist_two_views.cfg --epochs=10 \
	  --workdir=runs/full_fourth --name=ablation_full_fourth --variants=default,negatives_same_coarse,local_crops_2

clean:
	rm -rf runs
