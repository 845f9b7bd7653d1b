#!/usr/bin/env bash
# Same bytes before and after: run a fixed list of small, seeded `dit` commands and hash what they write.
#
#   bash benchmarks/same_bytes.sh [--venv DIR] [--force] OUTDIR
#   PATH=/tmp/base-venv/bin:$PATH bash benchmarks/same_bytes.sh /tmp/bytes-before
#   bash benchmarks/same_bytes.sh --venv /tmp/main-venv /tmp/bytes-after     # or SAME_BYTES_VENV=/tmp/main-venv
#   diff /tmp/bytes-before/hashes.txt /tmp/bytes-after/hashes.txt && echo same bytes
#   diff -r /tmp/bytes-before/normalised /tmp/bytes-after/normalised          # what differs, readably
#
# It runs whatever `dit` and `python` come first on PATH (--venv DIR puts DIR/bin first), so running it under two
# virtual environments compares two code trees: the tree is the one that environment's `dit` imports (an editable
# install), and its weights/ folder supplies the embedded models. It needs the Debian package dataset-fashion-mnist
# and nothing from the network: the latent model is a tiny seeded random AutoencoderKL (diffusers) made here.
#
# Only public CLI commands (`dit ...`) touch the package; the python snippets import torch, safetensors, diffusers,
# numpy and the standard library, never a ditcli module (those may move).
#
# OUTDIR/hashes.txt has one line per output file: "<sha256>  <raw|norm>  <path>". raw hashes the file's bytes; norm
# hashes OUTDIR/normalised/<path>.txt, a readable normal form of a file whose bytes are not reproducible run to run:
#   - JSON / JSONL / --json stdout: keys that hold timings or rates dropped (seconds, rank0_seconds,
#     images_per_second, compile_seconds, img_per_s, peak_mem_mb and any *_seconds/time/elapsed/date/duration
#     key), the tree's and OUTDIR's absolute paths replaced by <TREE> and <OUT>; key order kept.
#   - torch checkpoints (.pt): torch.save names its zip records after the temporary file the checkpoint was written
#     to (random), so the file is loaded (weights_only) and every tensor is hashed (dtype, shape, bytes) and every
#     plain value written out, in the order stored.
#   - .safetensors: safetensors writes __metadata__ in hash-map order (random per process), so the header is
#     rewritten with sorted metadata; the tensor table and the data bytes are hashed as they are.
#   - stderr: the progress bar lines are dropped, paths replaced as above.
# Every command's exit status is hashed too (logs/NAME.rc), so a command that starts or stops failing shows.
# Sampling from a checkpoint made in this run goes through canon/*.safetensors, a copy with a sorted header (made by
# a snippet here), so the checkpoint sha256 in PNG text chunks, provenance and run keys is reproducible.
#
# Environment: SAME_BYTES_VENV (as --venv), SAME_BYTES_THREADS (OMP/MKL threads, default 2: keep it equal for the
# two runs being compared; kernel results may depend on it). About 2 minutes on 2 CPU cores.
set -uo pipefail

usage() { echo "usage: $0 [--venv DIR] [--force] OUTDIR" >&2; exit 2; }
VENV="${SAME_BYTES_VENV:-}"; FORCE=0; OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || usage; VENV="$2"; shift 2 ;;
        --venv=*) VENV="${1#--venv=}"; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1"; shift ;;
    esac
done
[ -n "$OUT" ] || usage
if [ -n "$VENV" ]; then
    [ -x "$VENV/bin/dit" ] || { echo "error: no $VENV/bin/dit" >&2; exit 2; }
    export PATH="$VENV/bin:$PATH"
fi
command -v dit >/dev/null || { echo "error: no dit on PATH (pass --venv DIR)" >&2; exit 2; }
command -v python >/dev/null || { echo "error: no python on PATH" >&2; exit 2; }
[ -d /usr/share/datasets/fashion-mnist ] || { echo "error: apt-get install dataset-fashion-mnist" >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    [ "$FORCE" = 1 ] || { echo "error: $OUT exists and is not empty (pass --force to replace it)" >&2; exit 2; }
    rm -rf "$OUT"
fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd -P)"
cd "$OUT" || exit 2
mkdir -p logs inputs canon .tools .home

# The tree: the folder above the ditcli package that dit's own interpreter imports (importing the top-level
# package only, which does not move).
DIT_BIN="$(command -v dit)"
DIT_PY="$(head -n 1 "$DIT_BIN" | sed 's/^#! *//')"
[ -x "$DIT_PY" ] || DIT_PY=python
TREE="$("$DIT_PY" -c 'import ditcli, os; print(os.path.dirname(os.path.dirname(os.path.realpath(ditcli.__file__))))')"
[ -d "$TREE/weights" ] || { echo "error: $TREE/weights not found (install the tree with pip install -e)" >&2; exit 2; }

# Everything offline, in a private cache home, one fixed thread count, no locale or terminal width effects.
export DIT_HOME="$OUT/.home/dit" XDG_CACHE_HOME="$OUT/.home/cache" HF_HOME="$OUT/.home/hf" \
       DIT_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       OMP_NUM_THREADS="${SAME_BYTES_THREADS:-2}" MKL_NUM_THREADS="${SAME_BYTES_THREADS:-2}" \
       LC_ALL=C.UTF-8 TZ=UTC COLUMNS=120 NO_COLOR=1 CUDA_VISIBLE_DEVICES=""
unset WANDB_MODE 2>/dev/null || true
START=$(date +%s)
{
    echo "tree: $TREE"
    echo "dit: $DIT_BIN ($DIT_PY)"
    echo "git: $(git -C "$TREE" rev-parse HEAD 2>/dev/null || echo none), $(git --no-optional-locks -C "$TREE" status --porcelain 2>/dev/null | wc -l) changed or new files"
    git --no-optional-locks -C "$TREE" status --porcelain 2>/dev/null | sed 's/^/  /' 
    echo "python: $(python -c 'import sys; print(sys.version.split()[0])')"
    echo "torch: $(python -c 'import torch; print(torch.__version__)') diffusers: $(python -c 'import diffusers; print(diffusers.__version__)')"
    echo "threads: $OMP_NUM_THREADS  host: $(uname -m) $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
} > ABOUT.txt
echo "same_bytes: tree $TREE -> $OUT"

FAILED=0
run() {  # run NAME CMD...: stdout, stderr and exit status into logs/NAME.*
    local name="$1"; shift
    local t0=$(date +%s%N)
    local timer=()
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "%U %S" -o ".tools/$name.cpu")
    "${timer[@]}" "$@" > "logs/$name.stdout" 2> "logs/$name.stderr" < /dev/null
    local rc=$?
    echo "$rc" > "logs/$name.rc"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    local cpu=$(tail -n 1 ".tools/$name.cpu" 2>/dev/null | awk '{printf "%.1f", $1 + $2}')
    printf '  %-26s rc=%s  %3d.%d s wall  %5s s cpu\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) "$cpu"
}

canon() {  # canon SRC DST: a copy of a .safetensors file with its metadata in sorted order
    python - "$1" "$2" <<'EOF'
import json, struct, sys
src, dst = sys.argv[1:3]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
meta = header.pop("__metadata__", None)
out = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
out.update(header)
text = json.dumps(out, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
open(dst, "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
EOF
}

# ---- inputs made here: a tiny seeded random VAE and a tiny RGB .npz for the latent model ----
python - <<'EOF' || { echo "error: could not build the tiny VAE" >&2; exit 1; }
import numpy as np
import torch
from diffusers import AutoencoderKL

torch.manual_seed(0)
# 4 blocks: 8x downsampling, as dit train expects of a VAE (a 2-block, 2x VAE fails at the first step)
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                    norm_num_groups=4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
vae.save_pretrained("inputs/vae")
g = torch.Generator().manual_seed(1)
images = torch.randint(0, 256, (24, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
images[:12, :16] //= 4  # two classes that differ: darker top half, and
images[12:, :, :16] //= 4  # darker left half
labels = np.repeat(np.arange(2, dtype=np.int64), 12)
np.savez("inputs/latent-data.npz", images=images, labels=labels, class_names=np.array(["top", "left"]))

# every 10th image of the Fashion-MNIST test split: a 1,000-image reference that is quick to score against
import gzip
root = "/usr/share/datasets/fashion-mnist/"
with gzip.open(root + "t10k-images-idx3-ubyte.gz") as f:
    test = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
with gzip.open(root + "t10k-labels-idx1-ubyte.gz") as f:
    test_labels = np.frombuffer(f.read(), np.uint8, offset=8)
np.savez("inputs/fashion-test-1k.npz", images=test[::10], labels=test_labels[::10].astype(np.int64))
EOF

S=(dit sample --device cpu --no-compile --json)
T=(dit train --device cpu --json --model DiT-S/4 --hidden-size 32 --depth 2 --num-heads 2 --global-batch 8
   --steps 10 --log-every 1 --ckpt-every 5 --sample-every 10 --seed 0)
FJ=(--features fashion-judge --device cpu --json)

echo "sampling the embedded models"
run classes-imagenet  dit classes --search retriever --json
run classes-fashion   dit classes --model fashion-mnist --json
F=("${S[@]}" --model fashion-mnist-flow)  # the flow model (`fashion-mnist` names the mean-flow model since 2026-12-07)
run sample-meanflow   "${S[@]}" --model fashion-mnist --num 32 --seed 0 --out samples/meanflow \
    --npz samples/meanflow.npz
run sample-meanflow-1 "${S[@]}" --model fashion-mnist --steps 1 --num 16 --seed 9 --npz samples/meanflow-1.npz
run sample-flow       "${F[@]}" --num 32 --seed 0 --out samples/flow --npz samples/flow.npz
run sample-ddpm       "${S[@]}" --model fashion-mnist-ddpm --num 32 --seed 0 --npz samples/ddpm.npz
run sample-flow-bf16  "${F[@]}" --precision bf16 --num 16 --seed 1 --npz samples/flow-bf16.npz
run sample-flow-heun  "${F[@]}" --sampler heun --steps 5 --num 16 --seed 2 --npz samples/flow-heun.npz
run sample-flow-sde   "${F[@]}" --sampler sde --steps 10 --num 16 --seed 3 --npz samples/flow-sde.npz
run sample-flow-dopri5 "${F[@]}" --sampler dopri5 --atol 1e-3 --rtol 1e-2 --num 4 --seed 4 \
    --npz samples/flow-dopri5.npz
run sample-ddpm-ddim  "${S[@]}" --model fashion-mnist-ddpm --sampler ddim --steps 10 --eta 0.5 --num 16 --seed 5 \
    --npz samples/ddpm-ddim.npz
run sample-ddpm-ancestral "${S[@]}" --model fashion-mnist-ddpm --sampler ddpm --steps 20 --num 8 --seed 6 \
    --npz samples/ddpm-ancestral.npz
run sample-ddpm-classes "${S[@]}" --model fashion-mnist-ddpm --class sneaker --class BAG --num-per-class 3 \
    --sampler dpm++2m --steps 5 --cfg 2 --guidance-interval none --batch-size 4 --seed 7 --out samples/ddpm-classes
run sample-ddpm-cache "${S[@]}" --model fashion-mnist-ddpm --cache 0.1 --steps 10 --num 8 --seed 8 \
    --npz samples/ddpm-cache.npz

echo "evaluating"
run fid-make-ref      dit fid --make-ref fashion-mnist --split test -o ref/fashion-test.npz "${FJ[@]}"
run fid-make-ref-1k   dit fid --make-ref inputs/fashion-test-1k.npz -o ref/fashion-test-1k.npz "${FJ[@]}"
run fid-flow          dit fid samples/flow.npz --ref ref/fashion-test-1k.npz "${FJ[@]}"
run fid-ddpm          dit fid samples/ddpm.npz --ref ref/fashion-test-1k.npz "${FJ[@]}"
run fid-flow-pngs     dit fid samples/flow --ref ref/fashion-test-1k.npz "${FJ[@]}"
run fid-bf16-vs-flow  dit fid samples/flow-bf16.npz --ref samples/flow.npz "${FJ[@]}"

echo "training (10 steps each) and converting"
run train-ddpm        "${T[@]}" --data fashion-mnist --objective ddpm --image-size 28 --vae none --channels 1 \
    --out train/ddpm
run train-flow        "${T[@]}" --data fashion-mnist --objective flow --time-sampling logit-normal --no-learn-sigma \
    --image-size 28 --vae none --channels 1 --out train/flow
run train-latent      "${T[@]}" --data inputs/latent-data.npz --vae inputs/vae --image-size 32 --model DiT-S/2 \
    --lr 1e-3 --ema-warmup --out train/latent
run convert-ddpm      dit convert train/ddpm/ckpt-0000010.pt convert/ddpm.safetensors --json
run convert-flow-fp16 dit convert train/flow/ckpt-0000010.pt convert/flow-fp16.safetensors --dtype fp16 \
    --sampler heun --steps 4 --cfg 2 --json
run convert-latent    dit convert train/latent/ckpt-0000010.pt convert/latent.safetensors --json
run convert-latent-diffusers dit convert train/latent/ckpt-0000010.pt convert/latent-diffusers --to diffusers \
    --vae inputs/vae --json
run convert-embedded-bf16 dit convert "$TREE/weights/fashion-mnist-ddpm.safetensors" convert/ddpm-embedded-bf16.safetensors \
    --dtype bf16 --json
run info-flow-fp16    dit convert --info convert/flow-fp16.safetensors --json
run info-embedded     dit convert --info "$TREE/weights/fashion-mnist.safetensors" --json
run info-train-ckpt   dit convert --info train/latent/ckpt-0000010.pt --json

echo "sampling the trained models"
for name in ddpm flow-fp16 latent; do
    [ -f "convert/$name.safetensors" ] && canon "convert/$name.safetensors" "canon/$name.safetensors"
done
run sample-trained-ddpm "${S[@]}" --ckpt canon/ddpm.safetensors --num 8 --steps 5 --seed 9 --npz samples/trained-ddpm.npz
run sample-trained-flow "${S[@]}" --ckpt canon/flow-fp16.safetensors --num 8 --seed 10 --npz samples/trained-flow.npz
run sample-latent     "${S[@]}" --ckpt canon/latent.safetensors --num 8 --steps 5 --cfg 1.5 --seed 11 \
    --out samples/latent --npz samples/latent.npz
run sample-latent-diffusers "${S[@]}" --ckpt convert/latent-diffusers --num 4 --steps 5 --sampler ddim --seed 12 \
    --npz samples/latent-diffusers.npz

# ---- hashes ----
cat > .tools/normalise.py <<'EOF'
"""Hash every output under OUT: raw bytes where they are reproducible, a written-out normal form where not."""
import hashlib
import json
import re
import struct
import sys
from pathlib import Path

OUT, TREE = Path(sys.argv[1]), sys.argv[2]
NORM = OUT / "normalised"
SKIP_TOP = {".home", ".tools", "normalised", "hashes.txt", "ABOUT.txt"}
VOLATILE = {"seconds", "rank0_seconds", "images_per_second", "compile_seconds", "img_per_s", "peak_mem_mb"}
VOLATILE_RE = re.compile(r"(^|_)(seconds|secs|time|elapsed|date|duration|timestamp|mtime)$")
dropped = {}


def paths(text: str) -> str:
    return text.replace(str(OUT), "<OUT>").replace(TREE, "<TREE>")


def clean(value, where):
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if key in VOLATILE or VOLATILE_RE.search(str(key)):
                dropped.setdefault(where, set()).add(key)
                continue
            kept[key] = clean(item, where)
        return kept
    if isinstance(value, list):
        return [clean(item, where) for item in value]
    if isinstance(value, str):
        return paths(value)
    return value


def json_text(text: str, where: str) -> str | None:
    try:
        return json.dumps(clean(json.loads(text), where), indent=1, ensure_ascii=False) + "\n"
    except ValueError:
        pass
    lines = [line for line in text.splitlines() if line.strip()]
    try:  # JSONL
        return "".join(json.dumps(clean(json.loads(line), where), ensure_ascii=False) + "\n" for line in lines)
    except ValueError:
        return None


def torch_text(path: Path) -> str:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    rows = []

    def walk(value, key):
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            rows.append(f"{key}: tensor {str(t.dtype)} {tuple(t.shape)} {digest}")
        elif isinstance(value, dict):
            rows.append(f"{key}: dict[{len(value)}]")
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            rows.append(f"{key}: {type(value).__name__}[{len(value)}]")
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            rows.append(f"{key}: {paths(repr(value))}")

    walk(data, "")
    return "\n".join(rows) + "\n"


def safetensors_text(path: Path) -> str:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    rows = [f"metadata {k}: {paths(v)}" for k, v in sorted(meta.items())]
    body = raw[8 + n:]
    for name, entry in header.items():  # the order safetensors wrote them in
        a, b = entry["data_offsets"]
        rows.append(f"tensor {name}: {entry['dtype']} {entry['shape']} {a}-{b} "
                    f"{hashlib.sha256(body[a:b]).hexdigest()}")
    rows.append(f"data bytes: {len(body)} {hashlib.sha256(body).hexdigest()}")
    return "\n".join(rows) + "\n"


def stderr_text(text: str) -> str:
    bar = re.compile(r"━|\beta\b|it/s|img/s|s/it")
    return "".join(paths(line) + "\n" for line in text.splitlines() if not bar.search(line))


def normal_form(rel: str, path: Path) -> str | None:
    suffix = path.suffix
    if suffix == ".pt":
        return torch_text(path)
    if suffix == ".safetensors":
        return None if rel.startswith(("canon/", "inputs/")) else safetensors_text(path)
    if suffix in (".json", ".jsonl"):
        text = json_text(path.read_text(), rel)
        return text if text is not None else paths(path.read_text())
    if rel.startswith("logs/") and suffix == ".stdout":
        text = path.read_text()
        return json_text(text, rel) or paths(text)
    if rel.startswith("logs/") and suffix == ".stderr":
        return stderr_text(path.read_text())
    return None  # raw bytes: PNG, npz, npy, .rc, the canonical copies and the inputs


lines = []
for path in sorted(OUT.rglob("*")):
    rel = path.relative_to(OUT).as_posix()
    if not path.is_file() or rel.split("/")[0] in SKIP_TOP:
        continue
    text = normal_form(rel, path)
    if text is None:
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  raw   {rel}")
    else:
        target = NORM / (rel + ".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        lines.append(f"{hashlib.sha256(text.encode()).hexdigest()}  norm  {rel}")
(OUT / "hashes.txt").write_text("\n".join(lines) + "\n")
NORM.mkdir(exist_ok=True)
(NORM / "DROPPED.txt").write_text("".join(f"{where}: {', '.join(sorted(map(str, keys)))}\n"
                                          for where, keys in sorted(dropped.items())))
print(f"{len(lines)} files hashed, {sum(' norm ' in l for l in lines)} through a normal form")
EOF
echo "hashing"
python .tools/normalise.py "$OUT" "$TREE" || { echo "error: hashing failed" >&2; exit 1; }
SECONDS_TAKEN=$(( $(date +%s) - START ))
CPU_TAKEN=$(cat .tools/*.cpu 2>/dev/null | awk 'NF == 2 && $1 ~ /^[0-9.]+$/ {s += $1 + $2} END {printf "%.0f", s}')
echo "seconds: $SECONDS_TAKEN wall, $CPU_TAKEN cpu in the dit commands; failed commands: $FAILED" >> ABOUT.txt
echo "same_bytes: $OUT/hashes.txt ($SECONDS_TAKEN s wall, $CPU_TAKEN s cpu; $FAILED commands failed: see logs/*.rc)"
