"""Bad inputs and faults against the three entry points, as a new user would meet them.

    python tests/bad_inputs.py [--only=train,export,serve] [--filter=SUBSTRING]
                               [--out=FILE.json] [--keep]

Not collected by pytest (its name does not start with `test_`): a script to rerun by
hand, about 10-20 minutes on 2 CPU cores. Every case runs `train.py`,
`export/export_onnx.py` or `serve.py` in a subprocess (its own session, with a
timeout) inside a temporary folder that is removed at the end (`--keep` keeps it).
The fixtures are built once, lazily: a tiny Fashion-MNIST training run and its
export (`--parity_images=64`), PNG folders of the test split (5 per class) and of a
gallery (10 per class), a gallery `.npz` saved by a good `serve.py` run.

A case is HANDLED when all of these hold, else NOT HANDLED with the reasons:

- the exit status is not 0, or 0 where skipping is the documented behaviour (a bad
  image among good ones in serve.py goes to errors.csv; --skip_bad_images);
- stderr holds no Python traceback ("Traceback (most recent call last)");
- for a non-zero exit, the error is told in at most 2 lines of stderr starting with
  "error:" and no other line, apart from "warning:" lines, documented messages
  (serve.py's "terminated (SIGTERM)" / "interrupted") and framework start-up noise
  that no entry point prints itself (TensorFlow / absl C++ log lines, Python library
  warnings, progress bars): that noise is counted in the JSON, not held against it;
- no half-written outputs: a train.py run refused with exit 2 leaves no files in its
  new work directory (and a refused resume leaves the old one as it was); a failed
  export leaves WORKDIR/export/ as it was (the previous good model intact); serve.py's
  output folder holds either a finished run (summary.json, shards with a row of
  embeddings.npy per index.csv row, no staging leftovers) or nothing new;
- no process is left behind (every process of the case's session is gone within a
  few seconds of its end; for the kill cases the workers seen during the run too).

The exit status documented for a case (train.py: 2 for bad flags, settings or data;
serve.py: 2 bad input, 1 nothing embedded, 130 / 143 for SIGINT / SIGTERM) is
checked too: a different one is reported in the case's notes (and its own column in
the JSON), not counted as NOT HANDLED on its own.

The table shows, as "first line of stderr", the first line that is not start-up
noise. Exit status: 0 when the script ran (whatever the outcomes), 1 when a fixture
could not be built, 2 for bad arguments.
"""

import argparse
import csv
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Run as a script, tests/ is first on the path (as for replicas_worker.py).
from image_files import png_header_only

try:
    import psutil
except ImportError:  # /proc is read instead.
    psutil = None

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable
FASHION_DIR = os.environ.get("GRAFIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
TOOLS = {"train": ROOT / "train.py", "export": ROOT / "export" / "export_onnx.py",
         "serve": ROOT / "serve.py"}
TRACEBACK = "Traceback (most recent call last)"
FLAGFILE = str(ROOT / "configs" / "fashion_mnist.cfg")
# The tiny training run of the fixtures (the brief's command).
FIXTURE_TRAIN = ["--flagfile=" + FLAGFILE, "--epochs=1", "--max_train_examples=512",
                 "--max_eval_examples=256", "--batch_size=64", "--width=8", "--num_views=2",
                 "--verbose=0"]
# Train cases: the same, smaller, so a bad value that is accepted trains in seconds.
TRAIN_BASE = ["--flagfile=" + FLAGFILE, "--epochs=1", "--max_train_examples=256",
              "--max_eval_examples=128", "--batch_size=64", "--width=4", "--verbose=0"]
SLOW_IMAGES = 120  # Hard links of one 2500x2500 PNG: a serve.py run of ~10-20 s to kill.

# Start-up noise of the frameworks (never printed by the entry points themselves).
NOISE = [re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IWE]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]",  # absl / TF C++ log lines
    r"^To enable the following instructions:",
    r"^/job:\w+/replica:\d+/task:\d+$",  # continuation of a TF coordination-service log line
    r"^\s*\d+%\|",  # tqdm
    r"\d+(\.\d+)?\s*(img|it)/s\]?\s*$",  # tqdm's rate at the end of the line
    r"^\S+:\s*\d+%\|",  # tqdm with a description
)]
PY_WARNING = re.compile(r"^\S.*\.py:\d+: \w*Warning\b")
DOCUMENTED = [re.compile(p, re.I) for p in (r"^warning:", r"^terminated \(SIGTERM\):",
                                            r"^interrupted:")]
NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


class FixtureError(Exception):
    pass


# ---------------------------------------------------------------- processes

def _session_pids(sid):
    """Live (non-zombie) processes of session `sid`."""
    pids = []
    if psutil is not None:
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.info["pid"]) == sid:
                    pids.append(p.info["pid"])
            except (OSError, psutil.Error):
                pass
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[4]) == sid:
            pids.append(int(entry))
    return pids


def _descendants(pid):
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid):
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _leftovers(pids, wait=5.0):
    """The processes of `pids` still alive after up to `wait` seconds; they are then killed."""
    deadline = time.time() + wait
    alive = [p for p in pids if _alive(p)]
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    for p in alive:  # Ours: started by this script's case.
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return alive


@dataclasses.dataclass
class Proc:
    argv: list
    rc: int = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    seconds: float = 0.0
    ended: float = 0.0
    leftover: list = dataclasses.field(default_factory=list)


def start(tool, args, cwd, env=None, tag="p"):
    """Starts a tool in its own session; stdout / stderr go to files in `cwd`."""
    argv = [PYTHON, str(TOOLS[tool])] + [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.pop("TF_CONFIG", None)
    full_env.pop("TFDS_DATA_DIR", None)
    full_env.update(env or {})
    for k in [k for k, v in full_env.items() if v is None]:
        del full_env[k]
    out = open(os.path.join(cwd, f".{tag}.stdout"), "wb")
    err = open(os.path.join(cwd, f".{tag}.stderr"), "wb")
    # SIGINT's default action: a background job (`cmd &`) inherits it ignored.
    popen = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    popen._files = (out, err, cwd, tag, argv, time.time())
    return popen


def finish(popen, timeout):
    """Waits for a started tool; kills its session on timeout; checks for leftovers."""
    out, err, cwd, tag, argv, t0 = popen._files
    proc = Proc(argv)
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.timed_out = True
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except OSError:
            pass
        popen.wait()
    proc.ended = time.time()
    proc.seconds = proc.ended - t0
    proc.rc = popen.returncode
    out.close()
    err.close()
    proc.leftover = _leftovers(_session_pids(popen.pid))
    for name, attr in (("stdout", "stdout"), ("stderr", "stderr")):
        with open(os.path.join(cwd, f".{tag}.{name}"), "rb") as f:
            setattr(proc, attr, f.read().decode("utf-8", "replace"))
        os.remove(os.path.join(cwd, f".{tag}.{name}"))
    return proc


def run_tool(tool, args, cwd, timeout, env=None):
    return finish(start(tool, args, cwd, env), timeout)


# ---------------------------------------------------------------- stderr

def stderr_lines(text):
    """(product lines, noise lines) of a stderr text."""
    product, noise = [], []
    lines = [l for l in re.split(r"[\r\n]+", text) if l.strip()]
    i = 0
    while i < len(lines):
        line = lines[i]
        if PY_WARNING.match(line):
            noise.append(line)
            while i + 1 < len(lines) and lines[i + 1][:1].isspace():
                i += 1
                noise.append(lines[i])
        elif any(p.search(line) for p in NOISE):
            noise.append(line)
        else:
            product.append(line)
        i += 1
    return product, noise


def first_line(proc):
    product, _ = stderr_lines(proc.stderr)
    return product[0] if product else ""


def error_problems(proc, allow_documented=False):
    """Problems with how a non-zero exit was told on stderr."""
    product, _ = stderr_lines(proc.stderr)
    errors = [l for l in product if l.startswith("error:")]
    documented = [l for l in product if any(p.search(l) for p in DOCUMENTED)]
    other = [l for l in product if l not in errors and l not in documented]
    problems = []
    if not errors and not (allow_documented and documented):
        problems.append("no 'error:' line on stderr")
    if len(errors) > 2:
        problems.append(f"{len(errors)} 'error:' lines (at most 2)")
    if other:
        problems.append(f"{len(other)} more stderr line(s), e.g. {other[0][:120]!r}")
    return problems


# ---------------------------------------------------------------- files

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(path):
    """{relpath: sha256 or '<dir>' / '<link>'} of a tree (None if `path` does not exist)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": sha(path)}
    snap = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                snap[rel] = "<link>"
            elif os.path.isdir(full):
                snap[rel] = "<dir>"
            elif os.path.isfile(full):
                snap[rel] = sha(full)
            else:
                snap[rel] = "<special>"
    return snap


def diff(before, after):
    if before == after:
        return ""
    if before is None:
        return "created: " + ", ".join(sorted(after)[:5])
    if after is None:
        return "removed"
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return "changed: " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")


def files_under(path):
    snap = snapshot(path)
    if snap is None:
        return []
    return sorted(k for k, v in snap.items() if v != "<dir>")


def display(relpath):
    """serve.py's text form of a path (see grafit_tf.serving.walk), re-implemented."""
    raw = os.fsencode(relpath).replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def unescape(cell):
    return cell[1:] if cell.startswith("'") else cell


def csv_formula_problems(out):
    """Cells of the CSVs in `out` and its shards that start like a formula (= + - @, tab,
    CR), numbers aside."""
    bad = []
    for folder, _, names in sorted(os.walk(out)) if os.path.isdir(out) else []:
        for name in sorted(n for n in names if n.endswith(".csv")):
            try:
                rows = read_csv(os.path.join(folder, name))
            except (UnicodeDecodeError, csv.Error) as e:
                bad.append(f"{name} is not readable UTF-8 CSV ({e})")
                continue
            for row in rows:
                for cell in row:
                    if cell[:1] in ("=", "+", "-", "@", "\t", "\r") and not NUMBER.match(cell):
                        bad.append(f"{name} cell {cell[:40]!r} starts like a formula")
    return bad[:3]


def serve_outputs(out):
    """(problems, index paths, error paths) of a serve.py output folder."""
    from grafit_tf.serving import shards

    if not os.path.isdir(out):
        return ["no output folder"], [], []
    problems = [f"staging leftovers {n}" for n in os.listdir(out)
                if n.startswith((".serve.tmp.", ".serve.old."))]
    try:
        results = shards.read(out)
        index = [unescape(p) for p in results.index["path"]]
        errors = [unescape(p) for p in results.errors.get("path", [])]
        if len(results.embeddings) != len(index):
            problems.append(f"{len(results.embeddings)} embeddings, {len(index)} index rows")
    except Exception as e:  # noqa: BLE001 - any unreadable output is a finding
        return problems + [f"unreadable outputs ({type(e).__name__}: {e})"], [], []
    problems += csv_formula_problems(out)
    return problems, index, errors


def unfinished(snap):
    """A snapshot without a serve.py run's finished shards and manifest.json: what a run
    that stopped after work started may leave (it has no summary.json)."""
    if snap is None or "summary.json" in snap:
        return snap
    return {k: v for k, v in snap.items()
            if k != "manifest.json" and not k.split(os.sep)[0].startswith("shard-")}


def nothing_new(path, before, started=False):
    """'' when `path` holds nothing new since `before` (an empty folder counts as nothing);
    `started`: finished shards of a run that stopped after work started are allowed."""
    after = unfinished(snapshot(path)) if started else snapshot(path)
    if before is None and after is not None and not [k for k, v in after.items() if v != "<dir>"]:
        return ""
    return diff(before, after)


# ---------------------------------------------------------------- images

def png_bytes(pixels, **save):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", **save)
    return buffer.getvalue()



def picture(rng, h, w, channels=3):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [127.5 + 127.5 * np.sin(rng.uniform(.05, .3) * y + rng.uniform(.05, .3) * x
                                      + rng.uniform(0, 6)) for _ in range(channels)]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bad_image(kind, rng):
    """(file name, bytes, must it be refused?) of a bad or unusual image."""
    if kind == "corrupt":
        return "corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300,
                                                                         dtype=np.uint8)), True
    if kind == "truncated":
        big = png_bytes(picture(rng, 200, 200))
        return "truncated.png", big[:len(big) // 2], True
    if kind == "zero_byte":
        return "empty.png", b"", True
    if kind == "not_an_image":
        return "notes.png", b"just some text, not a PNG\n", True
    if kind == "cmyk":
        buffer = io.BytesIO()
        Image.fromarray(picture(rng, 40, 40)).convert("CMYK").save(buffer, "JPEG")
        return "cmyk.jpg", buffer.getvalue(), False
    if kind == "rgba":
        rgba = np.concatenate([picture(rng, 28, 28), picture(rng, 28, 28, 1)], -1)
        return "rgba.png", png_bytes(rgba), False
    if kind == "16bit":
        pixels = (picture(rng, 28, 28, 1)[..., 0].astype(np.uint16) * 257)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
        return "gray16.png", buffer.getvalue(), False
    if kind == "exif_rotated":
        image = Image.fromarray(picture(rng, 30, 50))
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display.
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", exif=exif.tobytes())
        return "rotated.jpg", buffer.getvalue(), False
    if kind == "bomb":
        return "bomb.png", png_header_only(30000, 30000), True
    raise ValueError(kind)


# ---------------------------------------------------------------- fixtures

class Fixtures:
    """Built once, on first use, under `tmp/fixtures`."""

    def __init__(self, tmp):
        self.dir = Path(tmp) / "fixtures"
        self.dir.mkdir(parents=True)
        self._cache = {}
        self.log = []

    def _once(self, name, build):
        if name not in self._cache:
            t0 = time.time()
            print(f"  [fixture] {name} ...", flush=True)
            self._cache[name] = build()
            self.log.append((name, round(time.time() - t0, 1)))
        return self._cache[name]

    def _check(self, what, proc):
        if proc.rc != 0:
            raise FixtureError(f"{what} failed (exit {proc.rc}): "
                               f"{proc.stderr.strip().splitlines()[-3:] if proc.stderr else ''}")

    @property
    def run(self):
        """A finished tiny training run with a good export: run/export/embedder.onnx."""
        def build():
            if not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
                raise FixtureError(f"Fashion-MNIST missing at {FASHION_DIR} "
                                   "(apt-get install dataset-fashion-mnist)")
            run = self.dir / "run"
            self._check("fixture training", run_tool("train", FIXTURE_TRAIN + [
                f"--data_dir={FASHION_DIR}", f"--workdir={run}"], str(self.dir), 900))
            self._check("fixture export", run_tool("export", [
                f"--workdir={run}", "--parity_images=64"], str(self.dir), 600))
            return run
        return self._once("run", build)

    @property
    def onnx(self):
        return self.run / "export" / "embedder.onnx"

    def png_split(self, split, per_class):
        def build():
            out = self.dir / f"png_{split}"
            proc = subprocess.run([PYTHON, str(ROOT / "export" / "fashion_mnist_png.py"),
                                   f"--split={split}", f"--max_per_class={per_class}",
                                   f"--data_dir={FASHION_DIR}", f"--output={out}"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise FixtureError(f"fashion_mnist_png.py --split={split}: {proc.stderr[-300:]}")
            return out
        return self._once(f"png_{split}", build)

    @property
    def test_png(self):
        return self.png_split("test", 5)

    @property
    def gallery_dir(self):
        return self.png_split("train", 10)

    @property
    def good_pngs(self):
        return sorted(self.test_png.rglob("*.png"))[::5][:8]

    @property
    def gallery_npz(self):
        def build():
            npz = self.dir / "gallery.npz"
            out = self.dir / "serve_control"
            proc = run_tool("serve", [f"--model={self.onnx}", f"--images={self.test_png}",
                                      f"--gallery={self.gallery_dir}", f"--save_gallery={npz}",
                                      f"--output={out}", "--labels_from_dirs"],
                            str(self.dir), 300)
            self._check("control serve.py run (good inputs)", proc)
            problems, index, _ = serve_outputs(out)
            if problems or len(index) != 50:
                raise FixtureError(f"control serve.py run: {problems}, {len(index)} embedded")
            return npz
        return self._once("gallery_npz", build)

    def gallery_arrays(self):
        with np.load(self.gallery_npz, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    @property
    def slow_dir(self):
        """SLOW_IMAGES hard links of one 2500x2500 PNG (~0.2 s each to decode)."""
        def build():
            d = self.dir / "slow"
            d.mkdir()
            first = write(d / "big_000.png", png_bytes(picture(np.random.default_rng(1),
                                                               2500, 2500)))
            for i in range(1, SLOW_IMAGES):
                os.link(first, d / f"big_{i:03d}.png")
            return d
        return self._once("slow_dir", build)


def image_folder(root, rng, corrupt=False, empty_class=False, test=True, flat=False):
    """root/{train,test}/<coarse>/<fine>/<i>.png, 16x16 RGB (flat: root/{split}/<fine>/)."""
    classes = {"tops": ("shirt", "coat"), "shoes": ("boot", "sandal")}
    for split, n in (("train", 6), ("test", 3)) if test else (("train", 6),):
        for coarse, fines in classes.items():
            for fine in fines:
                d = root / split / (fine if flat else os.path.join(coarse, fine))
                for i in range(n):
                    write(d / f"{i}.png", png_bytes(picture(rng, 16, 16)))
    if corrupt:
        write(root / "train" / "tops" / "shirt" / "broken.png", b"\x89PNG\r\n\x1a\nnot really")
    if empty_class:
        (root / "train" / "tops" / "vest").mkdir(parents=True)
    return root


# ---------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
    name: str
    tool: str
    args: object = None  # callable(c) -> list of flags
    expect: str = "error"  # error | skip (exit 0 documented) | either (0 + good outputs, or error)
    exits: tuple = ()  # documented exit statuses
    prepare: object = None  # callable(c)
    check: object = None  # callable(c, proc) -> list of problems
    runner: object = None  # callable(c) -> (proc, problems): a custom run (signals)
    timeout: float = 180
    env: dict = None


class Ctx:
    """One case's run: its folder `d`, the fixtures `fx`, and a scratch dict."""

    def __init__(self, case, d, fx):
        self.case, self.d, self.fx, self.state = case, d, fx, {}
        self.rng = np.random.default_rng(zlib.crc32(case.name.encode()))


CASES = []


def case(*args, **kwargs):
    CASES.append(Case(*args, **kwargs))


# ---- train.py

def workdir_untouched(c, proc):
    """A refused run (exit 2) leaves nothing in a new work directory."""
    wd = c.d / "run"
    if proc.rc == 0 or proc.rc is None:
        return []
    if proc.rc == 2:
        left = files_under(wd)
        if left:
            return [f"exit 2 but the work directory got files: {', '.join(left[:4])}"]
    return []


def train_case(name, *flags, base=True, exits=(2,), expect="error", prepare=None, check=None,
               env=None, timeout=240):
    def args(c):
        extra = [f(c) if callable(f) else f for f in flags]
        return (TRAIN_BASE + [f"--data_dir={FASHION_DIR}", f"--workdir={c.d / 'run'}"]
                if base else []) + extra

    def checks(c, proc):
        return workdir_untouched(c, proc) + (check(c, proc) if check else [])

    case(name, "train", args, expect, exits, prepare, checks, env=env, timeout=timeout)


for flag in ("--learning_rate=nan", "--learning_rate=-1", "--learning_rate=inf",
             "--weight_decay=-1", "--lambda_inst=nan", "--instance_tau=0", "--tau=0",
             "--width=0", "--crop_scale_min=1.5", "--warmup_epochs=50", "--checkpoint_every=-1",
             "--eval_temperature=0", "--batch_size=1", "--batch_size=0", "--epochs=0",
             "--epochs=-1", "--num_views=1", "--ema_decay=1.5", "--memory_momentum=nan",
             "--max_train_examples=-1", "--label_smoothing=1.5", "--jitter_strength=-1",
             "--knn_dim=0", "--cpu_replicas=-1", "--image_size=-1"):
    train_case(f"train {flag}", flag)
train_case("train queue_size < batch", "--memory=queue", "--queue_size=32")
for flag in ("--method=simclr", "--dataset=imagenet", "--backbone=vgg16", "--optimizer=rmsprop",
             "--instance_loss=mse", "--memory=ring", "--mixed_precision=float8",
             "--distribute=tpu", "--eval_protocol=other", "--key_view=strong",
             "--eval_split=holdout", "--sop_split=maskcon3", "--validation_split=0"):
    train_case(f"train {flag}", flag)
train_case("train --sop_split=maskcon1 on Fashion-MNIST", "--sop_split=maskcon1")
train_case("train validation split as large as the training split", "--eval_split=validation",
           "--validation_split=60000")
train_case("train --batch_size=abc (not an integer)", "--batch_size=abc")
train_case("train --learning_rate=fast (not a number)", "--learning_rate=fast")
train_case("train unknown flag --epoch=3", "--epoch=3")
train_case("train positional argument", "runs/x")
train_case("train missing --workdir", "--flagfile=" + FLAGFILE, "--epochs=1", base=False)
train_case("train --flagfile missing", "--flagfile=configs/nope.cfg",
           lambda c: f"--workdir={c.d / 'run'}", base=False)


def _afile(c):
    write(c.d / "afile", b"a regular file\n")


train_case("train --workdir under a regular file",
           lambda c: f"--workdir={c.d / 'afile' / 'run'}", prepare=_afile,
           check=lambda c, p: [] if (c.d / "afile").read_bytes() == b"a regular file\n"
           else ["the regular file changed"])
train_case("train --data_dir missing", lambda c: f"--data_dir={c.d / 'nope'}")
train_case("train --data_dir is a file", lambda c: f"--data_dir={c.d / 'afile'}", prepare=_afile)


def _fm_copy(mutate):
    def prepare(c):
        d = c.d / "fm"
        d.mkdir()
        for name in os.listdir(FASHION_DIR):
            shutil.copy(os.path.join(FASHION_DIR, name), d / name)
        mutate(d)
    return prepare


def _truncate(d):
    p = d / "train-images-idx3-ubyte.gz"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _not_gzip(d):
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"these are not labels\n")


def _count_mismatch(d):
    shutil.copy(d / "t10k-labels-idx1-ubyte.gz", d / "train-labels-idx1-ubyte.gz")


def _bad_magic(d):
    with gzip.open(d / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x07" + b"\x00" * 100)


def _names(*names):
    """The 'error:' line must name the file at fault (one of `names`)."""
    def check(c, proc):
        errors = [l for l in stderr_lines(proc.stderr)[0] if l.startswith("error:")]
        if proc.rc != 0 and errors and not any(n in l for n in names for l in errors):
            return [f"the error does not name {' or '.join(names)}"]
        return []
    return check


IMAGES_GZ, LABELS_GZ = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
train_case("train truncated .gz IDX (Fashion-MNIST)", lambda c: f"--data_dir={c.d / 'fm'}",
           prepare=_fm_copy(_truncate), check=_names(IMAGES_GZ))
train_case("train IDX file that is not gzip", lambda c: f"--data_dir={c.d / 'fm'}",
           prepare=_fm_copy(_not_gzip), check=_names(LABELS_GZ))
train_case("train IDX labels of another count", lambda c: f"--data_dir={c.d / 'fm'}",
           prepare=_fm_copy(_count_mismatch), check=_names(IMAGES_GZ, LABELS_GZ))
train_case("train IDX with a wrong magic number", lambda c: f"--data_dir={c.d / 'fm'}",
           prepare=_fm_copy(_bad_magic), check=_names(LABELS_GZ))

IMAGE_FOLDER = ["--dataset=image_folder", "--image_size=16", "--epochs=1", "--batch_size=8",
                "--width=4", "--proj_hidden=32", "--knn_dim=16", "--proj_dim=16", "--verbose=0"]


def folder_case(name, extra=(), expect="error", exits=(2,), check=None, timeout=240, **layout):
    def prepare(c):
        image_folder(c.d / "data", c.rng, **layout)

    def args(c):
        return IMAGE_FOLDER + [f"--data_dir={c.d / 'data'}", f"--workdir={c.d / 'run'}"] + [
            e(c) if callable(e) else e for e in extra]

    def checks(c, proc):
        return workdir_untouched(c, proc) + (check(c, proc) if check else [])

    case(name, "train", args, expect, exits, prepare, checks, timeout=timeout)


def _names_broken(c, proc):
    return [] if "broken.png" in proc.stderr else ["the error does not name broken.png"]


def _skipped_listed(c, proc):
    listing = c.d / "run" / "skipped_images.csv"
    if proc.rc != 0:
        return []
    if not listing.is_file() or "broken.png" not in listing.read_text(errors="replace"):
        return ["skipped_images.csv missing or without broken.png"]
    if not (c.d / "run" / "embedder.keras").is_file():
        return ["exit 0 without embedder.keras"]
    return []


folder_case("train image_folder with one corrupt PNG", corrupt=True, check=_names_broken)
folder_case("train image_folder corrupt PNG + --skip_bad_images", ["--skip_bad_images"],
            corrupt=True, expect="skip", exits=(0,), check=_skipped_listed, timeout=300)
folder_case("train image_folder with an empty class folder", empty_class=True)
folder_case("train image_folder without a test split", test=False)
folder_case("train image_folder flat, no --coarse_map", flat=True)


def _write_map(content):
    def prepare(c):
        write(c.d / "map.json", content.encode())
    return prepare


FM_MAP = json.loads((ROOT / "grafit_tf" / "data" / "maps" / "fashion_mnist_coarse4.json")
                    .read_text())
train_case("train --coarse_map not JSON", lambda c: f"--coarse_map={c.d / 'map.json'}",
           prepare=_write_map("{tshirt_top: tops,"))
train_case("train --coarse_map misses a class", lambda c: f"--coarse_map={c.d / 'map.json'}",
           prepare=_write_map(json.dumps({k: v for k, v in FM_MAP.items() if k != "bag"})))
train_case("train --coarse_map a JSON list", lambda c: f"--coarse_map={c.d / 'map.json'}",
           prepare=_write_map("[1, 2, 3]"))
train_case("train --coarse_map missing file", lambda c: f"--coarse_map={c.d / 'nope.json'}")
train_case("train --init_from missing dir", lambda c: f"--init_from={c.d / 'nope'}")
train_case("train --init_from an empty dir", lambda c: f"--init_from={c.d / 'empty'}",
           prepare=lambda c: (c.d / "empty").mkdir())
train_case("train --init_from other --width", lambda c: f"--init_from={c.fx.run}")
train_case("train --method=finetune without --init_from", "--method=finetune")
train_case("train --rand_augment on Fashion-MNIST", "--rand_augment")


def _weights_file(c):
    write(c.d / "w.weights.h5", b"")


train_case("train --weights with small_resnet", lambda c: f"--weights={c.d / 'w.weights.h5'}",
           prepare=_weights_file)
train_case("train --weights missing (resnet50)", "--backbone=resnet50",
           lambda c: f"--weights={c.d / 'nope.weights.h5'}")
train_case("train TFDS dataset not prepared (cifar100)", "--dataset=cifar100",
           lambda c: f"--tfds_data_dir={c.d / 'tfds'}",
           prepare=lambda c: (c.d / "tfds").mkdir(), timeout=240)
train_case("train multi_worker without TF_CONFIG", "--distribute=multi_worker")
train_case("train multi_worker TF_CONFIG not JSON", "--distribute=multi_worker",
           env={"TF_CONFIG": "{cluster: nope"})
train_case("train multi_worker peer unreachable", "--distribute=multi_worker",
           "--worker_timeout=5", env={"TF_CONFIG": json.dumps({
               "cluster": {"worker": ["127.0.0.1:29517", "127.0.0.1:9"]},
               "task": {"type": "worker", "index": 0}})}, exits=(1, 2))


def _resume_prepare(c):
    shutil.copytree(c.fx.run, c.d / "run", ignore=shutil.ignore_patterns("export"))
    c.state["before"] = snapshot(c.d / "run")


def _resume_check(c, proc):
    change = diff(c.state["before"], snapshot(c.d / "run"))
    problems = [f"the work directory {change}"] if change else []
    if proc.rc != 0 and "learning_rate" not in proc.stderr:
        problems.append("the error does not name learning_rate")
    return problems


case("train resume with changed settings", "train",
     lambda c: FIXTURE_TRAIN + [f"--data_dir={FASHION_DIR}", f"--workdir={c.d / 'run'}",
                                "--learning_rate=1e-3"],
     "error", (2,), _resume_prepare, _resume_check, timeout=240)

# ---- export/export_onnx.py


def _copy_run(with_export=True):
    def prepare(c):
        shutil.copytree(c.fx.run, c.d / "run",
                        ignore=None if with_export else shutil.ignore_patterns("export"))
        c.state["export"] = snapshot(c.d / "run" / "export")
    return prepare


TEMPORARY = re.compile(r"(^|/)\.|\.tmp\b|staging")


def _export_kept(c, proc):
    """A failed export keeps the previous one: no file changed or removed, no temporaries.

    New files that are not temporaries (a report of the failed check) are noted only.
    """
    if proc.rc == 0:
        return []
    before, after = c.state.get("export"), snapshot(c.d / "run" / "export")
    if before == after:
        return []
    if before is None:
        return [f"failed export left WORKDIR/export/ ({diff(before, after)})"]
    if after is None:
        return ["failed export removed WORKDIR/export/"]
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before)
    problems = []
    if changed:
        extra = ""
        parity = c.d / "run" / "export" / "parity.json"
        if "parity.json" in changed and parity.is_file():
            try:
                extra = f"; parity.json passed={json.loads(parity.read_text()).get('passed')}"
            except ValueError:
                extra = "; parity.json unreadable"
        problems.append(f"previous export not kept (changed or removed: "
                        f"{', '.join(changed[:4])}{extra})")
    temporaries = [k for k in added if TEMPORARY.search(k)]
    if temporaries:
        problems.append(f"failed export left temporaries: {', '.join(temporaries[:3])}")
    new = [k for k in added if k not in temporaries and "/" not in k]
    if new:
        c.state.setdefault("notes", []).append(f"new in WORKDIR/export/: {', '.join(new)}")
    return problems


def export_case(name, *flags, prepare=None, with_export=True, exits=(2,), expect="error",
                check=None, timeout=240):
    prep = prepare or _copy_run(with_export)

    def args(c):
        return [f(c) if callable(f) else f for f in flags]

    def checks(c, proc):
        return (_export_kept(c, proc) if "export" in c.state else []) + (
            check(c, proc) if check else [])

    case(name, "export", args, expect, exits, prep, checks, timeout=timeout)


WD = lambda c: f"--workdir={c.d / 'run'}"  # noqa: E731
export_case("export missing --workdir", prepare=lambda c: None)
export_case("export --workdir does not exist", lambda c: f"--workdir={c.d / 'nope'}",
            prepare=lambda c: None)
export_case("export --workdir is a file", lambda c: f"--workdir={c.d / 'afile'}",
            prepare=_afile)
export_case("export positional argument", WD, "extra")


def _without(name, data=None):
    def prepare(c):
        _copy_run(with_export=False)(c)
        path = c.d / "run" / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        c.state["export"] = snapshot(c.d / "run" / "export")
    return prepare


export_case("export workdir without embedder.keras", WD, prepare=_without("embedder.keras"))
export_case("export workdir without config.json", WD, prepare=_without("config.json"))
export_case("export corrupt config.json", WD, prepare=_without("config.json", b'{"data": [1,'))
export_case("export config.json of another shape", WD, prepare=_without("config.json", b"[]"))
export_case("export corrupt embedder.keras", WD,
            prepare=_without("embedder.keras", b"PK\x03\x04 this is not a keras archive"))
export_case("export zero-byte embedder.keras", WD, prepare=_without("embedder.keras", b""))
export_case("export --parity_images=10", WD, "--parity_images=10")
export_case("export --parity_images=abc", WD, "--parity_images=abc")
export_case("export --tolerance=0 (parity fails)", WD, "--tolerance=0", "--parity_images=64",
            exits=(1,))
export_case("export --tolerance=-1", WD, "--tolerance=-1", "--parity_images=64")
export_case("export --tolerance=nan", WD, "--tolerance=nan", "--parity_images=64")
export_case("export --embedding_transform=pca", WD, "--embedding_transform=pca")
export_case("export --whiten_shrinkage=-1", WD, "--embedding_transform=whiten",
            "--whiten_shrinkage=-1")
export_case("export --data_dir missing", WD, lambda c: f"--data_dir={c.d / 'nope'}")
export_case("export --opset=1", WD, "--opset=1", "--parity_images=64")
export_case("export --quantize=int4", WD, "--quantize=int4")
export_case("export --calibration_images=10", WD, "--quantize=int8", "--calibration_images=10")
export_case("export --quantize_tolerance=-1", WD, "--quantize=int8", "--quantize_tolerance=-1")


def _export_is_file(c):
    _copy_run(with_export=False)(c)
    write(c.d / "run" / "export", b"a file where the export folder goes\n")
    c.state["export"] = snapshot(c.d / "run" / "export")


export_case("export WORKDIR/export is a file", WD, "--parity_images=64", prepare=_export_is_file)

# ---- serve.py


def out_of(c):
    return c.d / "out"


def serve_case(name, args, expect="error", exits=(2,), prepare=None, check=None, images=None,
               out=None, timeout=180, env=None, gallery=None):
    """`args(c)` gives the flags; the output folder must hold nothing new on an error."""
    def prep(c):
        if prepare:
            prepare(c)
        c.state["out"] = (out or out_of)(c)
        c.state["out_before"] = snapshot(c.state["out"])

    def checks(c, proc):
        o = c.state["out"]
        problems = []
        if proc.rc == 0 or (proc.rc == 1 and (o / "summary.json").exists()):
            problems += serve_outputs(o)[0]  # A published run must be whole.
        elif not proc.timed_out:
            change = nothing_new(o, c.state["out_before"], started=proc.rc in (1, 130, 143))
            if change:
                problems.append(f"exit {proc.rc} but the output folder {change}")
        return problems + (check(c, proc) if check else [])

    case(name, "serve", args, expect, exits, prep, checks, timeout=timeout, env=env)


def S(c, *extra, images=None, out=None, model=None, gallery=None):
    """serve.py flags: the fixture model and test PNGs unless overridden."""
    flags = [f"--model={model or c.fx.onnx}", f"--images={images or c.fx.test_png}",
             f"--output={out or out_of(c)}"]
    if gallery:
        flags.append(f"--gallery={gallery}")
    return flags + list(extra)


serve_case("serve missing --model", lambda c: S(c)[1:])
serve_case("serve --model does not exist", lambda c: S(c, model=c.d / "nope.onnx"))
serve_case("serve --model not ONNX (text)", lambda c: S(c, model=c.d / "m.onnx"),
           prepare=lambda c: write(c.d / "m.onnx", b"this is not a model\n"))
serve_case("serve zero-byte model", lambda c: S(c, model=c.d / "m.onnx"),
           prepare=lambda c: write(c.d / "m.onnx", b""))
serve_case("serve truncated ONNX model", lambda c: S(c, model=c.d / "m.onnx"),
           prepare=lambda c: write(c.d / "m.onnx", c.fx.onnx.read_bytes()[:50000]))
serve_case("serve --model is a directory", lambda c: S(c, model=c.d))


def _identity_model(c):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(c.d / "m.onnx"))


serve_case("serve valid ONNX that is not an embedder", lambda c: S(c, model=c.d / "m.onnx"),
           prepare=_identity_model)


def _failed_parity(c):
    d = c.d / "export"
    d.mkdir()
    shutil.copy(c.fx.onnx, d / "embedder.onnx")
    report = json.loads((c.fx.onnx.parent / "parity.json").read_text())
    report["passed"] = False
    (d / "parity.json").write_text(json.dumps(report))


serve_case("serve model whose parity.json says passed false",
           lambda c: S(c, model=c.d / "export" / "embedder.onnx"), prepare=_failed_parity)


def _corrupt_parity(c):
    _failed_parity(c)
    (c.d / "export" / "parity.json").write_text("{not json")


serve_case("serve model with a corrupt parity.json",
           lambda c: S(c, model=c.d / "export" / "embedder.onnx"), prepare=_corrupt_parity)
serve_case("serve missing --images", lambda c: [S(c)[0], S(c)[2]])
serve_case("serve --images does not exist", lambda c: S(c, images=c.d / "nope"))
serve_case("serve --images empty folder", lambda c: S(c, images=c.d / "empty"),
           prepare=lambda c: (c.d / "empty").mkdir())
serve_case("serve --images is a file", lambda c: S(c, images=c.fx.good_pngs[0]))
serve_case("serve missing --output", lambda c: S(c)[:2])


def _images_copy(c):
    shutil.copytree(c.fx.test_png, c.d / "images")
    c.state["images_before"] = snapshot(c.d / "images")


def _images_kept(c, proc):
    after = snapshot(c.d / "images")
    before = c.state["images_before"]
    lost = [k for k, v in before.items() if after is None or after.get(k) != v]
    return [f"query images changed or lost: {lost[:3]}"] if lost else []


serve_case("serve --output equal to --images",
           lambda c: S(c, images=c.d / "images", out=c.d / "images"), expect="either", exits=(),
           prepare=_images_copy, out=lambda c: c.d / "images", check=_images_kept)
serve_case("serve --output under a regular file",
           lambda c: S(c, out=c.d / "afile" / "out"), prepare=_afile,
           out=lambda c: c.d / "afile" / "out")
serve_case("serve --output is a regular file", lambda c: S(c, out=c.d / "afile"),
           prepare=_afile, out=lambda c: c.d / "afile",
           check=lambda c, p: [] if (c.d / "afile").read_bytes() == b"a regular file\n"
           else ["the regular file was overwritten"])
for flag in ("--k=abc", "--k=0", "--k=-1", "--batch_size=0", "--batch_size=-3",
             "--temperature=nan", "--temperature=-1", "--temperature=inf", "--workers=-1",
             "--max_image_pixels=0", "--intra_op_threads=-1", "--providers=bogus",
             "--unknown_flag=1", "--shard_size=0", "--engine=spark",
             "--engine_workers=0", "--index=annoy", "--index_memory=lots",
             "--unknown_precision=1.5", "--unknown_precision=nan"):
    serve_case(f"serve {flag}", lambda c, flag=flag: S(c, flag, gallery=c.fx.gallery_npz),
               )
serve_case("serve positional argument", lambda c: S(c, "extra"))


def npz_case(name, mutate, pickled=False, check=None):
    def prepare(c):
        arrays = c.fx.gallery_arrays()
        mutate(arrays, c)
        with open(c.d / "g.npz", "wb") as f:
            np.savez(f, **arrays)

    serve_case(f"serve gallery .npz {name}",
               lambda c: S(c, gallery=c.d / "g.npz"), prepare=prepare, check=check)


def _nan(a, c):
    a["embeddings"] = a["embeddings"].copy()
    a["embeddings"][3, 0] = np.nan


def _version(a, c):
    a["format_version"] = np.asarray([1, 2], np.int32)


def _other_dim(a, c):
    e = np.concatenate([a["embeddings"], a["embeddings"][:, :5]], 1)
    a["embeddings"] = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


class _Marker:
    """Unpickled, it would create the marker file: proves a loader ran pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _pickled(a, c):
    labels = np.empty(len(a["labels"]), dtype=object)
    labels[:] = [_Marker(c.d / "UNPICKLED")] * len(labels)
    a["labels"] = labels


def _not_unit(a, c):
    a["embeddings"] = a["embeddings"] * 3.0


def _label_range(a, c):
    a["labels"] = a["labels"].copy()
    a["labels"][0] = 999


def _missing_key(a, c):
    del a["label_names"]


npz_case("with NaN", _nan)
npz_case("with format_version=[1,2]", _version)
npz_case("of another dimension", _other_dim)
npz_case("pickled (object array)", _pickled,
         check=lambda c, p: ["the pickle was loaded (marker file created)"]
         if (c.d / "UNPICKLED").exists() else [])
npz_case("not unit norm", _not_unit)
npz_case("label out of range", _label_range)
npz_case("missing label_names", _missing_key)
serve_case("serve gallery .npz not a zip", lambda c: S(c, gallery=c.d / "g.npz"),
           prepare=lambda c: write(c.d / "g.npz", b"PK not a zip file"))
serve_case("serve gallery does not exist", lambda c: S(c, gallery=c.d / "nope.npz"))
serve_case("serve gallery folder empty", lambda c: S(c, gallery=c.d / "g"),
           prepare=lambda c: (c.d / "g").mkdir())


def _bad_gallery_dir(c):
    for label in ("a", "b"):
        write(c.d / "g" / label / "x.png", b"\x89PNG\r\n\x1a\ngarbage")


serve_case("serve gallery folder, every image corrupt", lambda c: S(c, gallery=c.d / "g"),
           prepare=_bad_gallery_dir)


def _flat_copies(name):
    def prepare(c):
        (c.d / name).mkdir()
        for p in c.fx.good_pngs:
            shutil.copy(p, c.d / name / f"{p.parent.name}_{p.name}")
    return prepare


serve_case("serve gallery folder without label folders", lambda c: S(c, gallery=c.d / "g"),
           prepare=_flat_copies("g"), expect="either", exits=())
serve_case("serve --save_gallery under a regular file",
           lambda c: S(c, f"--save_gallery={c.d / 'afile' / 'g.npz'}", gallery=c.fx.gallery_dir),
           prepare=_afile)


# Bad images among good ones: exit 0 documented, the bad file in errors.csv.

def _among_good(kinds):
    def prepare(c):
        d = c.d / "images"
        d.mkdir()
        for p in c.fx.good_pngs:
            shutil.copy(p, d / f"{p.parent.name}_{p.name}")
        c.state["good"] = sorted(os.listdir(d))
        c.state["bad"] = []
        for kind in kinds:
            name, data, refused = bad_image(kind, c.rng)
            write(d / name, data)
            c.state["bad"].append((name, refused))
    return prepare


def _accounted(c, proc):
    if proc.rc != 0:
        return []
    _, index, errors = serve_outputs(c.d / "out")
    problems = []
    missing = [g for g in c.state["good"] if display(g) not in index]
    if missing:
        problems.append(f"good images not embedded: {missing[:3]}")
    for name, refused in c.state["bad"]:
        shown = display(name)
        if refused and shown not in errors:
            where = "index.csv" if shown in index else "neither CSV"
            problems.append(f"{shown} not in errors.csv (in {where})")
        elif not refused and shown not in index + errors:
            problems.append(f"{shown} in neither index.csv nor errors.csv")
        elif not refused:
            c.state.setdefault("notes", []).append(
                f"{shown}: {'embedded' if shown in index else 'in errors.csv'}")
    return problems


def among_case(name, kinds, prepare_more=None, timeout=180):
    def prepare(c):
        _among_good(kinds)(c)
        if prepare_more:
            prepare_more(c)

    serve_case(f"serve {name} among good images",
               lambda c: S(c, images=c.d / "images", gallery=c.fx.gallery_npz),
               expect="skip", exits=(0,), prepare=prepare, check=_accounted, timeout=timeout)


for kind in ("corrupt", "truncated", "zero_byte", "not_an_image", "cmyk", "rgba", "16bit",
             "exif_rotated", "bomb"):
    among_case({"bomb": "huge-dimension PNG (bomb)", "zero_byte": "zero-byte image",
                "not_an_image": "text file named .png", "exif_rotated": "EXIF-rotated JPEG",
                "16bit": "16-bit PNG", "cmyk": "CMYK JPEG", "rgba": "RGBA PNG"}.get(kind, kind),
               [kind])


def _symlink_loop(c):
    d = c.d / "images"
    os.symlink("loop.png", d / "loop.png")
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")
    os.symlink("nowhere.png", d / "dangling.png")
    c.state["bad"] += [("loop.png", True), ("dangling.png", True)]


def _fifo(c):
    os.mkfifo(c.d / "images" / "pipe.png")
    c.state["bad"].append(("pipe.png", True))


def _non_utf8(c):
    d = os.fsencode(c.d / "images")
    with open(os.path.join(d, b"caf\xe9_\xff.png"), "wb") as f:
        f.write(c.fx.good_pngs[0].read_bytes())
    c.state["good"].append(os.fsdecode(b"caf\xe9_\xff.png"))


among_case("symlink loop + dangling link", [], _symlink_loop, timeout=120)
among_case("FIFO named .png", [], _fifo, timeout=120)
among_case("non-UTF-8 file name", [], _non_utf8)


def _formula(c):
    """Queries and gallery with a label folder '=cmd' and files named like formulas."""
    images = c.d / "images"
    shutil.copytree(c.fx.test_png, images)
    gallery = c.d / "gallery"
    shutil.copytree(c.fx.gallery_dir, gallery)
    src = c.fx.good_pngs
    for root in (images, gallery):
        for i, name in enumerate(("=1+1.png", "+SUM(A1).png", "-2+3.png", "@cmd.png")):
            write(root / "=cmd" / name, src[i].read_bytes())
    write(images / "=cmd" / "=HYPERLINK(x).png", b"not an image")  # errors.csv too


def _formula_check(c, proc):
    problems = csv_formula_problems(c.d / "out")
    _, index, errors = serve_outputs(c.d / "out")
    if proc.rc == 0 and display(os.path.join("=cmd", "=1+1.png")) not in index:
        problems.append("=cmd/=1+1.png not in index.csv (after removing the escape)")
    if proc.rc == 0 and display(os.path.join("=cmd", "=HYPERLINK(x).png")) not in errors:
        problems.append("=cmd/=HYPERLINK(x).png not in errors.csv")
    return problems


serve_case("serve formula-like names (=cmd/=1+1.png)",
           lambda c: S(c, "--labels_from_dirs", images=c.d / "images", gallery=c.d / "gallery"),
           expect="skip", exits=(0,), prepare=_formula, check=_formula_check)


def _all_corrupt(c):
    for i in range(3):
        write(c.d / "images" / f"bad{i}.png", b"\x89PNG\r\n\x1a\n" + bytes(range(50)))
    write(c.d / "images" / "readme.txt", b"hello\n")


serve_case("serve every image corrupt", lambda c: S(c, images=c.d / "images"), exits=(1,),
           prepare=_all_corrupt)
serve_case("serve --labels_from_dirs with unlabelled files",
           lambda c: S(c, "--labels_from_dirs", images=c.d / "images",
                       gallery=c.fx.gallery_npz),
           expect="either", exits=(), prepare=_flat_copies("images"))


# ---- signals and a second run (custom runners)

def _wait_staging(out, popen, limit=90):
    deadline = time.time() + limit
    while time.time() < deadline and popen.poll() is None:
        if out.is_dir() and any(n.startswith(".serve.tmp.") for n in os.listdir(out)):
            return True
        time.sleep(0.1)
    return False


def signal_runner(sig, to_group):
    def runner(c):
        out = c.d / "out"
        popen = start("serve", S(c, images=c.fx.slow_dir, out=out), str(c.d))
        problems = []
        staged = _wait_staging(out, popen)
        time.sleep(2.0)  # Mid-run: the decoding workers are busy.
        workers = _descendants(popen.pid)
        if popen.poll() is not None or not staged:
            problems.append("the run ended (or never staged) before the signal: inconclusive")
        elif to_group:
            os.killpg(popen.pid, sig)  # Ctrl-C reaches the whole foreground group.
        else:
            os.kill(popen.pid, sig)
        signalled = time.time()
        proc = finish(popen, 120)
        c.state.setdefault("notes", []).append(
            f"exited {proc.ended - signalled:.1f} s after the signal")
        left = _leftovers(workers)
        if left:
            problems.append(f"{len(left)} process(es) left behind (pids {left})")
        if proc.leftover:
            problems.append(f"{len(proc.leftover)} process(es) of its session left behind")
        if not workers:
            c.state.setdefault("notes", []).append("no child process seen during the run")
        else:
            c.state.setdefault("notes", []).append(f"{len(workers)} child process(es) seen")
        if sig == signal.SIGKILL:
            visible = [n for n in (os.listdir(out) if out.is_dir() else [])
                       if not n.startswith((".serve.", "shard-")) and n != "manifest.json"]
            if visible or (out / "summary.json").exists():
                problems.append(f"published files after SIGKILL: {visible[:4]}")
            # The same command again: it serves the unfinished shards.
            again = run_tool("serve", S(c, images=c.fx.slow_dir, out=out), str(c.d), 300)
            outs, index, _ = serve_outputs(out)
            if again.rc != 0 or outs or len(index) != SLOW_IMAGES:
                problems.append(f"the rerun of the command: exit {again.rc} {outs}, "
                                f"{len(index)} rows")
        else:
            change = nothing_new(out, None, started=True)
            if change:
                problems.append(f"output folder {change}")
            problems += error_problems(proc, allow_documented=True)
        return proc, problems
    return runner


case("serve SIGTERM during a run", "serve", exits=(143,),
     runner=signal_runner(signal.SIGTERM, False))
case("serve SIGINT (Ctrl-C) during a run", "serve", exits=(130,),
     runner=signal_runner(signal.SIGINT, True))
case("serve SIGKILL during a run (+ a rerun)", "serve", exits=(-9,),
     runner=signal_runner(signal.SIGKILL, False))


def second_run(c):
    out = c.d / "out"
    first = start("serve", S(c, images=c.fx.slow_dir, out=out), str(c.d), tag="first")
    problems = []
    if not _wait_staging(out, first):
        problems.append("the first run never staged: inconclusive")
    proc = run_tool("serve", S(c, out=out), str(c.d), 120)
    still_running = first.poll() is None
    a = finish(first, 300)
    if not still_running:
        problems.append("the first run had ended before the second finished: inconclusive")
    if proc.rc == 0:
        problems.append("exit 0: the second run was let in")
    else:
        problems += error_problems(proc)
    outs, index, _ = serve_outputs(out)
    if a.rc != 0:
        problems.append(f"the first run then failed (exit {a.rc}: {first_line(a)[:80]})")
    elif outs or len(index) != SLOW_IMAGES:
        problems.append(f"the first run's outputs are not whole: {outs}, {len(index)} rows")
    if a.leftover:
        problems.append("the first run left processes behind")
    return proc, problems


case("serve second run into a folder another run holds", "serve", exits=(2,),
     runner=second_run)


def _other_run(c):
    """A finished run of the fixture model, with --k=3, in the output folder."""
    ran = run_tool("serve", S(c, "--k=3", gallery=c.fx.gallery_npz), str(c.d), 120)
    if ran.rc != 0:
        raise RuntimeError(f"the first run failed: {first_line(ran)}")


serve_case("serve rerun with other settings into a finished run's folder",
           lambda c: S(c, "--k=5", gallery=c.fx.gallery_npz), prepare=_other_run)


# ---------------------------------------------------------------- running

@dataclasses.dataclass
class Result:
    case: str
    tool: str
    exit: int
    outcome: str
    stderr_first_line: str
    problems: list
    notes: list
    documented_exit: list
    exit_as_documented: bool
    seconds: float
    argv: list
    stderr_noise_lines: int
    stderr: str


def evaluate(case_, c, proc, problems):
    if proc.timed_out:
        problems.insert(0, f"timed out after {case_.timeout:.0f} s (killed)")
    if TRACEBACK in proc.stderr:
        problems.insert(0, "Python traceback in stderr")
    if case_.runner is None:
        if case_.expect == "error":
            if proc.rc == 0:
                problems.insert(0, "exit 0: the bad input was accepted")
            elif not proc.timed_out:
                problems += error_problems(proc)
        elif case_.expect == "skip":
            if proc.rc != 0:
                problems.insert(0, f"exit {proc.rc}, documented 0 (skip the bad file)")
                problems += error_problems(proc)
        elif proc.rc != 0 and not proc.timed_out:
            problems += error_problems(proc)
        if proc.leftover:
            problems.append(f"{len(proc.leftover)} process(es) left behind")
    return problems


def run_case(case_, fx, tmp, index):
    d = Path(tmp) / f"case{index:03d}"
    d.mkdir()
    c = Ctx(case_, d, fx)
    t0 = time.time()
    if case_.runner:
        proc, problems = case_.runner(c)
    else:
        if case_.prepare:
            case_.prepare(c)
        proc = run_tool(case_.tool, case_.args(c), str(d), case_.timeout, case_.env)
        problems = list(case_.check(c, proc)) if case_.check else []
    problems = evaluate(case_, c, proc, problems)
    _, noise = stderr_lines(proc.stderr)
    notes = list(c.state.get("notes", []))
    documented = list(case_.exits)
    as_documented = not documented or proc.rc in documented
    if not as_documented:
        notes.insert(0, f"exit {proc.rc}, documented {'/'.join(map(str, documented))}")
    argv = [a.replace(str(tmp), "TMP").replace(str(ROOT) + "/", "") for a in proc.argv[1:]]
    result = Result(case_.name, case_.tool, proc.rc,
                    "NOT HANDLED" if problems else "HANDLED", first_line(proc).strip(),
                    problems, notes, documented, as_documented, round(time.time() - t0, 1),
                    argv, len(noise), proc.stderr[-3000:].replace(str(tmp), "TMP"))
    result.stderr_first_line = result.stderr_first_line.replace(str(tmp), "TMP")
    result.problems = [p.replace(str(tmp), "TMP") for p in result.problems]
    shutil.rmtree(d, ignore_errors=True)
    if d.exists():  # A read-only leftover or a FIFO: try harder.
        subprocess.run(["rm", "-rf", str(d)], check=False)
    return result


def table(results, width=90):
    rows = [("case", "tool", "exit", "outcome", "first line of stderr")]
    for r in results:
        rows.append((r.case, r.tool, str(r.exit), r.outcome,
                     r.stderr_first_line[:width] + ("..." if len(r.stderr_first_line) > width
                                                    else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append(" | ".join(row[i].ljust(widths[i]) for i in range(4)) + " | " + row[4])
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated tools: train,export,serve")
    parser.add_argument("--filter", default="", help="run only cases whose name holds this")
    parser.add_argument("--out", default="", help="write the results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    if only - set(TOOLS):
        print(f"error: --only={args.only}: choose among {', '.join(TOOLS)}.", file=sys.stderr)
        return 2
    selected = [k for k in CASES if (not only or k.tool in only) and args.filter in k.name]
    if not selected:
        print("error: no case selected.", file=sys.stderr)
        return 2
    names = [k.name for k in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    tmp = Path(tempfile.mkdtemp(prefix="bad_inputs."))
    fx = Fixtures(tmp)
    results = []
    started = time.time()
    print(f"{len(selected)} cases; python {PYTHON}; temporary folder {tmp}", flush=True)
    try:
        for i, k in enumerate(selected):
            try:
                r = run_case(k, fx, tmp, i)
            except FixtureError as e:
                print(f"error: fixture: {e}", file=sys.stderr)
                return 1
            results.append(r)
            print(f"[{i + 1}/{len(selected)}] {r.outcome:11} exit={r.exit!s:4} "
                  f"{r.seconds:6.1f}s  {r.case}" + (f"  <- {'; '.join(r.problems)}"
                                                     if r.problems else ""), flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                subprocess.run(["rm", "-rf", str(tmp)], check=False)
    handled = sum(r.outcome == "HANDLED" for r in results)
    print()
    print(table(results))
    print()
    off = [r for r in results if not r.exit_as_documented]
    print(f"handled: {handled} of {len(results)} "
          f"({len(off)} with an exit status other than the documented one); "
          f"{time.time() - started:.0f} s")
    for r in results:
        if r.outcome != "HANDLED":
            print(f"  NOT HANDLED: {r.case}: {'; '.join(r.problems)}")
    if args.out:
        report = {
            "command": "python tests/bad_inputs.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, "
                       f"{platform.system()} {platform.release()}",
            "python": PYTHON,
            "handled": handled,
            "total": len(results),
            "seconds": round(time.time() - started, 1),
            "fixtures": fx.log,
            "cases": [dataclasses.asdict(r) for r in results],
        }
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
