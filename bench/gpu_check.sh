#!/usr/bin/env bash
# GPU check of lamm-ds in one go (<= 10 minutes on one H200): DeepSpeed bf16/fp16 steps at ZeRO-1
# and ZeRO-3 for PaiNN and EquiformerV2-31M, `lamm-ds calibrate --device cuda`, the load-balancing
# replay at 64 virtual ranks on the GPU (bench/balance_replay.py), EquiformerV2 fwd+bwd atoms/s
# against fairchem-core 1.x when it is installable (else recorded as skipped, with the reason), and
# PaiNN vs SchNetPack (training step) and MD steps/s of our calculator vs SchNetPack's and MACE's
# when those are installed or carried as --wheels.
#
#   bench/gpu_check.sh                          # on a GPU machine -> bench/results/gpu/gpu_check.json (+ .log)
#   bench/gpu_check.sh --out-dir "$OUT"         # e.g. on the device machine (2 files come back)
#   bench/gpu_check.sh --dry-run                # here, on CPU: every step's command with minimal sizes
#
# Options:
#   --dry-run        CPU only (CUDA hidden, gloo, DS_ACCELERATOR=cpu), tiny sizes: the script is known to
#                    work before a GPU is lent. fp16 has no CPU support in DeepSpeed: its steps run the
#                    fp32 config instead (recorded in each step's note); EquiformerV2 is a tiny one.
#   --out-dir DIR    where gpu_check.json and gpu_check.log go (default bench/results/gpu)
#   --budget S       total seconds (default 570): a step never runs past it; steps left are "skipped"
#   --python PY      the interpreter (default .venv/bin/python if present, else python3)
#   --wheels DIR     pip-install these wheels first (--no-index, into a temporary target on PYTHONPATH):
#                    the GPU image lacks deepspeed, omegaconf, lmdb, vesin, ase, ... (docs/load_balancing.md)
#   --mixture NAME   benchmark mixture of the replay (default auto: corpus+mlearn / corpus / demo, whichever
#                    exists; data/ does not travel unless carried, so usually demo on a fresh machine)
#   --only A,B       run only these steps (names as in the JSON; for re-running one)
#
# Each step runs under its own timeout; a failure or timeout is recorded (exit code, seconds, log tail)
# and the next step runs. gpu_check.json: {"ratios"/figures first, "steps": [{name, status, ...}]};
# gpu_check.log: every step's full output. Exit code 0 when every step passed or was skipped, else 1.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR="$REPO/bench/results/gpu"
DRY=0
BUDGET=570
PY=""
WHEELS=""
MIXTURE=auto
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out-dir) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --python) PY=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --mixture) MIXTURE=$2; shift ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
BOOK=python3                     # bookkeeping only (JSON lines), any Python 3
command -v "$BOOK" >/dev/null || BOOK="$PY"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STATUS="$WORK/status.jsonl"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
: > "$STATUS"
START=$(date +%s)
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning"
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  DEVICE=cpu
else
  DEVICE=cuda
fi

# record NAME STATUS RC SECONDS TIMEOUT LOGFILE RESULT RUNDIR NOTE CMD...
record() {
  "$BOOK" - "$STATUS" "$@" <<'PY'
import json, sys
status, name, state, rc, sec, tmo, log, result, run_dir, note, *cmd = sys.argv[1:]
with open(status, "a") as fh:
    fh.write(json.dumps({"name": name, "status": state, "rc": None if rc == "" else int(rc),
                         "seconds": None if sec == "" else round(float(sec), 1),
                         "timeout_s": None if tmo == "" else int(tmo), "log": log or None,
                         "result_file": result or None, "run_dir": run_dir or None, "note": note or None,
                         "command": " ".join(cmd)}) + "\n")
PY
}

# step NAME TIMEOUT RESULT_FILE RUN_DIR NOTE -- CMD...
step() {
  local name=$1 tmo=$2 result=$3 run_dir=$4 note=$5
  shift 6
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
  local now left
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (time budget of ${BUDGET}s spent)" | tee -a "$LOG" >&2
    record "$name" skipped "" "" "$tmo" "" "" "" "out of the ${BUDGET}s time budget${note:+; $note}" "$@"
    return 0
  fi
  [ "$tmo" -gt "$left" ] && tmo=$left
  local log="$WORK/$name.log"
  echo "== $name (timeout ${tmo}s): $*" | tee -a "$LOG" >&2
  local t0 t1 rc state
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$tmo" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  if [ "$rc" = 0 ]; then state=ok; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then state=timeout; else state=failed; fi
  # a benchmark that skips itself says so in its last line ({"skipped": true, "reason": ...})
  if [ "$rc" = 0 ] && tail -n 1 "$log" | grep -q '"skipped": true'; then
    state=skipped
    if [ -n "$result" ] && [ ! -f "$result" ]; then tail -n 1 "$log" >"$result"; fi
  fi
  cat "$log" >>"$LOG"
  echo "== $name: $state (exit $rc, $(awk "BEGIN{printf \"%.0f\", $t1-$t0}") s)" | tee -a "$LOG" >&2
  record "$name" "$state" "$rc" "$(awk "BEGIN{print $t1-$t0}")" "$tmo" "$log" "$result" "$run_dir" "$note" "$@"
}

# ------------------------------------------------------------------------------------ 0. environment
if [ -n "$WHEELS" ]; then
  step wheels 120 "" "" "offline install of carried wheels" -- \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" $(ls "$WHEELS"/*.whl)
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
step env 60 "$WORK/env.json" "" "" -- "$PY" -c "
import json, platform, shutil, subprocess, sys
info = {'python': sys.version.split()[0], 'platform': platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())])
except Exception as exc:
    info['torch_error'] = repr(exc)
for mod in ('deepspeed', 'omegaconf', 'lmdb', 'vesin', 'ase', 'lamm_ds', 'fairchem'):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, '__version__', 'present')
    except Exception as exc:
        info[mod] = None
        info.setdefault('missing', []).append(mod)
if shutil.which('nvidia-smi'):
    info['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                                         '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()
json.dump(info, open('$WORK/env.json', 'w'), indent=1)
print(json.dumps(info))
sys.exit(1 if info.get('missing', []) not in ([], ['fairchem']) else 0)
"

# ------------------------------------------------------------------------------------ 1. demo data
step demo_data 180 "" "" "reduced demo sizes" -- "$PY" -c "
from lamm_ds.demo import DemoSizes, make_demo
make_demo('$WORK/demo', DemoSizes(metals=80, metals_test=20, energy_only=30, molecules=80, downstream=10,
                                  downstream_test=10), workers=4)
"

# ------------------------------------------------------------------------------------ 2. DeepSpeed steps
TINY_EQV2="model_kind=equiformer_v2 equiformer_v2.num_layers=2 equiformer_v2.lmax=2 equiformer_v2.mmax=1
equiformer_v2.sphere_channels=16 equiformer_v2.attn_hidden_channels=16 equiformer_v2.num_heads=2
equiformer_v2.attn_alpha_channels=8 equiformer_v2.attn_value_channels=4 equiformer_v2.ffn_hidden_channels=16
equiformer_v2.edge_channels=16 equiformer_v2.cutoff=4.0 equiformer_v2.max_neighbors=12 equiformer_v2.grid_resolution=8"
if [ "$DRY" = 1 ]; then
  EQV2=$TINY_EQV2; DS_STEPS=2; EQV2_NOTE="dry run: a tiny EquiformerV2"
else
  EQV2=$("$PY" bench/_models.py overrides eqv2-31m 2>/dev/null || echo "model_kind=equiformer_v2"); DS_STEPS=8; EQV2_NOTE="EquiformerV2-31M preset"
fi
COMMON_DS="data.demo_dir=$WORK/demo eval_datasets=[] checkpoint.every=0 log_every=1 data.stats_samples=50 optim.warmup_steps=1"
for model in painn eqv2; do
  for zero in 1 3; do
    for prec in bf16 fp16; do
      cfg="ds_configs/zero${zero}_${prec}.json"
      note=""
      if [ "$DRY" = 1 ] && [ "$prec" = fp16 ]; then
        cfg="ds_configs/zero${zero}_fp32.json"; note="dry run: fp32 stands in for fp16 (no fp16 on DeepSpeed's CPU accelerator)"
      fi
      if [ "$model" = painn ]; then
        extra="data.batch_size=8"            # configs/demo.yaml's PaiNN: direct forces (ZeRO-3 refuses conservative)
        tmo=120
      else
        extra="$EQV2 data.batch_size=4"
        note="${note:+$note; }$EQV2_NOTE"
        tmo=180
      fi
      name="ds_${model}_zero${zero}_${prec}"
      # shellcheck disable=SC2086
      step "$name" "$tmo" "" "$WORK/$name" "$note" -- "$PY" launch/pretrain.py --config configs/demo.yaml \
        --run-dir "$WORK/$name" --quiet --max-steps "$DS_STEPS" deepspeed_config="$cfg" $COMMON_DS $extra
    done
  done
done

# ------------------------------------------------------------------------------------ 3. calibrate
if [ "$DRY" = 1 ]; then CAL="--batches 8 --repeats 1 --max-graphs 6"; else CAL="--batches 40 --repeats 3 --max-graphs 16"; fi
# shellcheck disable=SC2086
step calibrate 150 "$WORK/cost_model_$DEVICE.json" "" "configs/demo.yaml PaiNN on the demo data" -- \
  "$PY" -m lamm_ds.cli calibrate --config configs/demo.yaml --out "$WORK/cost_model_$DEVICE.json" $CAL \
  --device "$DEVICE" --quiet data.demo_dir="$WORK/demo"

# ------------------------------------------------------------------------------------ 4. replay, 64 virtual ranks
if [ "$DRY" = 1 ]; then
  REPLAY_PAINN="--ranks 64 --per-rank 2 --steps 1 --window-steps 1 --repeats 1 --warmup 1 --calib-batches 8 --calib-repeats 1 --strategies fixed max_atoms balanced"
  REPLAY_EQV2="--ranks 8 --per-rank 1 --steps 1 --window-steps 1 --repeats 1 --warmup 1 --calib-batches 8 --calib-repeats 1 --strategies fixed balanced -- $TINY_EQV2"
else
  REPLAY_PAINN="--ranks 64 --per-rank 1 2 --steps 16 --window-steps 16 --repeats 2 --strategies fixed atoms max_atoms balanced"
  REPLAY_EQV2="--ranks 64 --per-rank 1 --steps 4 --window-steps 4 --repeats 1 --warmup 2 --calib-batches 16 --calib-repeats 2 --strategies fixed atoms max_atoms balanced"
fi
# shellcheck disable=SC2086
step replay_painn 240 "$WORK/balance_replay.json" "" "" -- "$PY" bench/balance_replay.py --model painn \
  --mixture "$MIXTURE" --device "$DEVICE" --out "$WORK/balance_replay.json" $REPLAY_PAINN

# ------------------------------------------------------------------------------------ 5. EquiformerV2 vs fairchem-core 1.x
# not importable and not installable (no package index, no wheel carried): skipped, with pip's reason
step fairchem_install 60 "$WORK/fairchem_install.json" "" "only when fairchem is not importable; needs a package index or --wheels" -- \
  "$PY" -c "
import importlib.util, json, subprocess, sys
if importlib.util.find_spec('fairchem') is not None:
    print('fairchem already importable'); sys.exit(0)
p = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--retries', '0', '--timeout', '5',
                    '--target', '$WORK/site', 'fairchem-core<2'], capture_output=True, text=True)
print(p.stdout + p.stderr)
if p.returncode:
    why = (p.stderr.strip().splitlines() or ['pip failed'])[-1]
    print(json.dumps({'skipped': True, 'reason': 'fairchem-core<2 not installable here: ' + why}))
"
export PYTHONPATH="$WORK/site:$PYTHONPATH"
if [ "$DRY" = 1 ]; then EQB="--molecules 1 --cells 0 --rounds 1"; else EQB="--molecules 32 --cells 8 --rounds 5"; fi
# shellcheck disable=SC2086
step eqv2_vs_fairchem 150 "$WORK/eqv2_throughput.json" "" "" -- "$PY" bench/eqv2_throughput.py --device "$DEVICE" \
  --preset 31M $EQB --out "$WORK/eqv2_throughput.json"

# issue 18: PaiNN training step vs SchNetPack, and MD steps/s of the calculators (each skips itself,
# with the reason, when its reference is not installed; the calculator bench then times ours only)
if [ "$DRY" = 1 ]; then MTB="--molecules 2 --rounds 1 --mem-rounds 1 --pass-seconds 0.05 --no-ftz"; CSB="--rounds 1 --pass-seconds 0.05 --no-compile"
else MTB="--rounds 3 --mem-rounds 1 --pass-seconds 0.5"; CSB="--rounds 3 --pass-seconds 0.5"; fi
# shellcheck disable=SC2086
step painn_vs_schnetpack 120 "$WORK/model_throughput.json" "" "" -- "$PY" bench/model_throughput.py --device "$DEVICE" \
  $MTB --out "$WORK/model_throughput.json"
# shellcheck disable=SC2086
step calculator_speed 120 "$WORK/calculator_speed.json" "" "" -- "$PY" bench/calculator_speed.py --device "$DEVICE" \
  $CSB --out "$WORK/calculator_speed.json"

# shellcheck disable=SC2086
step replay_eqv2 240 "$WORK/balance_replay.json" "" "$EQV2_NOTE" -- "$PY" bench/balance_replay.py --model eqv2-31m \
  --mixture "$MIXTURE" --device "$DEVICE" --out "$WORK/balance_replay.json" $REPLAY_EQV2

# ------------------------------------------------------------------------------------ report
END=$(date +%s)
"$BOOK" - "$STATUS" "$OUT_DIR/gpu_check.json" "$DRY" "$BUDGET" "$START" "$END" "$WORK" <<'PY'
import json, sys, time
from pathlib import Path

status, out, dry, budget, start, end, work = sys.argv[1:]
steps = [json.loads(x) for x in Path(status).read_text().splitlines() if x.strip()]


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


for s in steps:
    if s["log"]:
        try:
            s["log_tail"] = Path(s["log"]).read_text(errors="replace").splitlines()[-15:]
        except OSError:
            s["log_tail"] = []
    if s["result_file"]:
        r = load(s["result_file"])
        if isinstance(r, dict) and s["name"].startswith("replay"):  # the ratios only: the file is large
            r = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        elif isinstance(r, dict) and "meta" in r:                   # a cost model: coefficients and fit
            r = {"coefficients": r.get("coefficients"), "fit": r["meta"].get("fit")}
        s["result"] = r
        if s["status"] == "skipped" and isinstance(r, dict):
            s["note"] = "; ".join(x for x in (s["note"], r.get("reason")) if x)
    if s["run_dir"]:
        m = Path(s["run_dir"]) / "metrics.jsonl"
        recs = [json.loads(x) for x in m.read_text().splitlines()] if m.is_file() else []
        s["result"] = {"steps": len(recs), "losses": [round(r["loss"], 5) for r in recs],
                       "finite": bool(recs) and all(r["loss"] == r["loss"] for r in recs),
                       "step_s_median": sorted(r["step_time_max"] for r in recs)[len(recs) // 2] if recs else None}
    for k in ("log", "result_file", "run_dir"):
        s.pop(k, None)
figures = {}
for s in steps:
    if s["name"] == "replay_eqv2" and isinstance(s.get("result"), dict):
        figures.update({k: v for k, v in s["result"].items() if k.startswith("eqv2_") and "imbalance" not in k})
    elif s["name"] == "replay_painn" and isinstance(s.get("result"), dict):
        figures.update({k: v for k, v in s["result"].items() if not k.startswith("eqv2_") and "imbalance" not in k})
    elif s["name"] == "eqv2_vs_fairchem" and isinstance(s.get("result"), dict) and "speedup" in s["result"]:
        figures["eqv2_vs_fairchem_speedup"] = s["result"]["speedup"]          # per case
        figures["eqv2_vs_fairchem_memory_ratio"] = s["result"]["memory_ratio"]
        figures["eqv2_ours_atoms_per_s"] = {c: d.get("ours_atoms_per_s") for c, d in s["result"].get("details", {}).items()}
    elif s["name"] in ("painn_vs_schnetpack", "calculator_speed") and isinstance(s.get("result"), dict) \
            and "ratios" in s["result"]:
        figures[s["name"]] = s["result"]["ratios"]
counts = {}
for s in steps:
    counts[s["status"]] = counts.get(s["status"], 0) + 1
env = next((s.get("result") for s in steps if s["name"] == "env"), None)
result = {**figures, "status_counts": counts, "dry_run": dry == "1", "budget_s": int(budget),
          "wall_s": int(end) - int(start), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(start))),
          "environment": env, "steps": steps}
Path(out).write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
sys.exit(0 if all(s["status"] in ("ok", "skipped") for s in steps) else 1)
PY
rc=$?
echo "gpu_check: $OUT_DIR/gpu_check.json, log $LOG" >&2
rm -rf "$WORK"
exit $rc
