#!/usr/bin/env bash
# Run a grid of QAT+BR configurations and seeds, one run after the other, each in its
# own folder under RUNS_DIR; then summarise them (summarize.py).
#
#   scripts/sweep.sh [-n] [-- EXTRA FLAGS FOR cifar10_qat_br.py]
#
#   -n   dry run: print what would run (new / resume / restart / skip), run nothing.
#
# The grid is SEEDS x BITS x LAMBDAS x SCENARIOS, set with environment variables:
#
#   RUNS_DIR    folder of the run folders                           [runs/sweep]
#   DATA_DIR    --data-dir                                          [./data]
#   SCENARIOS   rows of the scenario table below, by key            [the five QAT ones]
#   BITS        widths: "2" (W2A2) or "w2a4" (W2, A4); space separated  [2]
#   LAMBDAS     λ of the BR terms a scenario enables                [1]
#   SEEDS       --seed values                                       [42 43 44]
#   EPOCHS      --epochs          (empty: the tool's default, 100)  []
#   WARMUP      --warmup-epochs   (empty: the tool's default, 30)   []
#   PRETRAINED  --pretrained float checkpoint (empty: none)         []
#   PYTHON      the interpreter                                     [python]
#
# Example (W2A2, the five scenarios, three seeds, from a float checkpoint):
#
#   RUNS_DIR=runs/w2a2 DATA_DIR=/data/cifar10 PRETRAINED=results/resnet20_fp32_s42/best.pt \
#       scripts/sweep.sh -- --no-download --tensorboard
#
# The ptq scenario quantizes PRETRAINED after training (cifar10_qat_br.py --ptq: no λ, no
# epochs; EPOCHS and WARMUP do not apply to it) and needs PRETRAINED.
#
# Run folders are named <scenario>_w<W>a<A>_lam<λ>_s<seed> (the LSQ baseline, which has
# no λ, once per width and seed: lsq_w<W>a<A>_s<seed>). On a rerun, a folder with a
# finished run (summary.json) is skipped, one with a checkpoint (last.pt) is resumed
# with --resume, and one that never finished an epoch is started again (--overwrite).
# A run's folder name is all the sweep knows of it: after changing EPOCHS, WARMUP,
# PRETRAINED or the extra flags, use a new RUNS_DIR (resuming a run with other
# experiment flags is refused by cifar10_qat_br.py, and counts as a failure).
#
# Each run's console output is appended to <run folder>/train.log, its command line is
# in <run folder>/sweep_command, and a failed run leaves its exit status in
# <run folder>/sweep_exit_code (summarize.py lists such runs as failed). A failed run
# does not stop the sweep; Ctrl-C does (the interrupted run resumes on the next call).
#
# Exit status: 0 every run finished; 1 some run failed; 130/143 interrupted.

set -u -o pipefail

# Scenario table (the README's ablations): key, λ_w on, λ_a on, extra flags, name.
SCENARIO_TABLE="
w-only     1 0 -                          W-only
wa-stable  1 1 -                          W+A stable
wa-moving  1 1 --br-backprop-to-alpha-act W+A moving target
a-only     0 1 -                          A-only
lsq        0 0 -                          LSQ baseline
ptq        0 0 --ptq                      PTQ (post-training quantization)
"

RUNS_DIR=${RUNS_DIR:-runs/sweep}
DATA_DIR=${DATA_DIR:-./data}
SCENARIOS=${SCENARIOS:-w-only wa-stable wa-moving a-only lsq}
BITS=${BITS:-2}
LAMBDAS=${LAMBDAS:-1}
SEEDS=${SEEDS:-42 43 44}
EPOCHS=${EPOCHS:-}
WARMUP=${WARMUP:-}
PRETRAINED=${PRETRAINED:-}
PYTHON=${PYTHON:-python}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRAIN="$REPO/cifar10_qat_br.py"
RUN_FILES=(config.json metrics.jsonl timing.jsonl last.pt best.pt warmup_end.pt summary.json)

DRY_RUN=0
if [[ ${1:-} == "-n" ]]; then DRY_RUN=1; shift; fi
if [[ ${1:-} == "--" ]]; then shift; fi
if [[ $# -gt 0 && ${1:0:2} != "--" ]]; then
    echo "usage: scripts/sweep.sh [-n] [-- EXTRA FLAGS FOR cifar10_qat_br.py]" >&2
    exit 2
fi
EXTRA=("$@")

die() { echo "error: $*" >&2; exit 2; }

# Check the settings before running anything.
for key in $SCENARIOS; do
    grep -q "^$key " <<<"$SCENARIO_TABLE" ||
        die "SCENARIOS: unknown scenario '$key' (choose from: w-only wa-stable wa-moving a-only lsq ptq)"
done
for b in $BITS; do
    [[ $b =~ ^[0-9]+$ || $b =~ ^w[0-9]+a[0-9]+$ ]] || die "BITS: '$b' is not N or wNaM (e.g. 2 or w2a4)"
done
for lam in $LAMBDAS; do
    [[ $lam =~ ^[0-9]*\.?[0-9]+$ ]] || die "LAMBDAS: '$lam' is not a number"
done
for seed in $SEEDS; do
    [[ $seed =~ ^[0-9]+$ ]] || die "SEEDS: '$seed' is not an integer"
done

# Build the list of runs: one line per run, "folder<TAB>flags".
PLAN=()
for seed in $SEEDS; do
    for b in $BITS; do
        if [[ $b =~ ^w([0-9]+)a([0-9]+)$ ]]; then
            w=${BASH_REMATCH[1]}; a=${BASH_REMATCH[2]}
        else
            w=$b; a=$b
        fi
        first_lambda=1
        for lam in $LAMBDAS; do
            for key in $SCENARIOS; do
                read -r _ w_on a_on extra _ < <(grep "^$key " <<<"$SCENARIO_TABLE")
                lam_w=0; lam_a=0
                [[ $w_on == 1 ]] && lam_w=$lam
                [[ $a_on == 1 ]] && lam_a=$lam
                if [[ $w_on == 0 && $a_on == 0 ]]; then
                    [[ $first_lambda == 1 ]] || continue  # the baseline has no λ: run it once
                    name="${key}_w${w}a${a}_s${seed}"
                else
                    name="${key}_w${w}a${a}_lam${lam}_s${seed}"
                fi
                flags="--num-bits-weight $w --num-bits-act $a --seed $seed"
                [[ $key != ptq ]] && flags+=" --lambda-br $lam_w --lambda-br-act $lam_a"
                [[ $extra != "-" ]] && flags+=" $extra"
                PLAN+=("$name"$'\t'"$flags")
            done
            first_lambda=0
        done
    done
done

is_finished() { [[ -f $1/summary.json ]] && grep -q '"status": *"finished"' "$1/summary.json"; }
has_run_files() { for f in "${RUN_FILES[@]}"; do [[ -e $1/$f ]] && return 0; done; return 1; }

total=${#PLAN[@]}
echo "Sweep: $total run(s) into $RUNS_DIR (seeds: $SEEDS; bits: $BITS; λ: $LAMBDAS; scenarios: $SCENARIOS)"
mkdir -p "$RUNS_DIR" || die "cannot create RUNS_DIR $RUNS_DIR"
failed=()
i=0
for entry in "${PLAN[@]}"; do
    i=$((i + 1))
    name=${entry%%$'\t'*}
    read -r -a flags <<<"${entry#*$'\t'}"
    dir="$RUNS_DIR/$name"
    if is_finished "$dir"; then
        echo "[$i/$total] $name: finished, skipped"
        continue
    elif [[ -f $dir/last.pt ]]; then
        action="resume"; mode=(--resume)
    elif [[ -d $dir ]] && has_run_files "$dir"; then
        action="restart (no finished epoch)"; mode=(--overwrite)
    else
        action="new"; mode=()
    fi
    cmd=("$PYTHON" "$TRAIN" --data-dir "$DATA_DIR" --output-dir "$dir" "${flags[@]}")
    if [[ $name != ptq_* ]]; then  # PTQ trains nothing
        [[ -n $EPOCHS ]] && cmd+=(--epochs "$EPOCHS")
        [[ -n $WARMUP ]] && cmd+=(--warmup-epochs "$WARMUP")
    fi
    [[ -n $PRETRAINED ]] && cmd+=(--pretrained "$PRETRAINED")
    cmd+=("${EXTRA[@]}" "${mode[@]}")
    echo "[$i/$total] $name: $action"
    echo "    ${cmd[*]}"
    [[ $DRY_RUN == 1 ]] && continue
    mkdir -p "$dir"
    rm -f "$dir/sweep_exit_code"
    printf '%q ' "${cmd[@]}" >"$dir/sweep_command"
    echo >>"$dir/sweep_command"
    echo "===== $(date '+%F %T') $action: ${cmd[*]}" >>"$dir/train.log"
    # tee -i ignores Ctrl-C, so the run can still print how to resume.
    "${cmd[@]}" 2>&1 | tee -i -a "$dir/train.log"
    rc=${PIPESTATUS[0]}
    if [[ $rc != 0 ]]; then
        echo "$rc" >"$dir/sweep_exit_code"
        failed+=("$name (exit $rc)")
        if [[ $rc == 130 || $rc == 143 ]]; then
            echo "Sweep interrupted during $name; run the same command again to resume it." >&2
            exit "$rc"
        fi
        echo "[$i/$total] $name FAILED (exit $rc); see $dir/train.log. Continuing." >&2
    fi
done

[[ $DRY_RUN == 1 ]] && exit 0
echo
"$PYTHON" "$REPO/summarize.py" "$RUNS_DIR"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "${#failed[@]} run(s) failed: ${failed[*]}" >&2
    exit 1
fi
exit 0
