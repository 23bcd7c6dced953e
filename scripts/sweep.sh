#!/usr/bin/env bash
# Run a grid of QAT+BR configurations and seeds, each in its own folder under RUNS_DIR:
# one run after the other on this machine (then summarize.py), or as a SLURM job array.
#
#   usage: scripts/sweep.sh [-h] [-n] [--slurm [--submit]] [-- EXTRA FLAGS FOR cifar10_qat_br.py]
#
#   -h         print this help and exit.
#   -n         dry run: print what would run (new / resume / restart / skip), run nothing
#              (with --slurm: print the sbatch script instead of writing it).
#   --slurm    write RUNS_DIR/sweep.sbatch, a SLURM job array with one task per grid point
#              not finished yet, and print the sbatch command that submits it.
#   --submit   with --slurm: also submit it (sbatch), and print the job id.
#   --task I   run grid point I (0-based) only, as the job array's task I does.
#
# The grid is SEEDS x BITS x CLIPS x OPTIMIZERS x LAMBDAS x SCENARIOS, set with environment variables:
#
#   RUNS_DIR    folder of the run folders                           [runs/sweep]
#   DATA_DIR    --data-dir                                          [./data]
#   SCENARIOS   rows of the scenario table below, by key            [w-only wa-stable wa-moving a-only lsq]
#               (the seed's five; also lsq-frozen, w-only-free, wa-stable-free, wa-moving-free, dampen,
#               freeze, ptq)
#   BITS        widths: "2" (W2A2) or "w2a4" (W2, A4); space separated  [2]
#   LAMBDAS     λ of the BR terms a scenario enables                [1]
#   CLIPS       --clip-value c (activations clipped to [0, c]: "1" ReLU1-, "6" ReLU6-style);
#               "none": no clip; space separated                    [none]
#   OPTIMIZERS  --optimizer: "sgd", "adam"; space separated          [sgd]
#   SEEDS       --seed values                                       [42 43 44]
#   EPOCHS      --epochs          (empty: the tool's default, 100)  []
#   WARMUP      --warmup-epochs   (empty: the tool's default, 30 % of EPOCHS)  []
#   PRETRAINED  --pretrained float checkpoint (empty: none)         []
#   PYTHON      the interpreter                                     [python]
#   BRANCH      1: the runs of one seed, width, clip and optimizer share one warmup: the
#               first of them trains it, the others start at stage 2 from its warmup_end.pt
#               (--from-warmup; the same runs bit for bit, without W of their E epochs);
#               0: every run trains its own warmup                  [1]
#   JOBS        local runs at once; each gets OMP_NUM_THREADS = CPUs / JOBS unless set  [1]
#
# and, with --slurm, the resources of each array task (SBATCH_* variables, such as
# SBATCH_PARTITION or SBATCH_ACCOUNT, are read by sbatch itself and override these):
#
#   GPUS        --gres=gpu:GPUS (0: no GPU request)                 [1]
#   CPUS        --cpus-per-task                                     [4]
#   MEM         --mem (empty: the cluster's default)                []
#   TIME        --time, the time limit of one task                  [1-00:00:00]
#   PARTITION   --partition (empty: the cluster's default)          []
#   MAX_RUNNING at most this many tasks at once (--array=...%N; empty: no limit)  []
#
# Example (W2A2, the five scenarios, three seeds, from a float checkpoint):
#
#   RUNS_DIR=runs/w2a2 DATA_DIR=/data/cifar10 PRETRAINED=results/resnet20_fp32_s42/last.pt \
#       scripts/sweep.sh -- --no-download --tensorboard
#
# The ptq scenario quantizes PRETRAINED after training (cifar10_qat_br.py --ptq: no λ, no
# epochs; EPOCHS and WARMUP do not apply to it) and needs PRETRAINED.
#
# Run folders are named <scenario>_w<W>a<A>[_lam<λ>][_frz][_clip<c>][_<optimizer>]_s<seed>: _frz
# when the scenario freezes every step size after warmup (--freeze-alpha); the LSQ
# baseline has no λ (run once per width, clip, optimizer and seed), no clip adds no _clip part
# and SGD no optimizer part (so the folders of a grid without CLIPS and OPTIMIZERS keep the names
# they always had); PTQ trains nothing, so it runs once per width, clip and seed, without an
# optimizer. Every run is started with
# `cifar10_qat_br.py --resume auto`, locally and on SLURM alike: a folder with a finished
# run (summary.json) is skipped, one with a checkpoint (last.pt) is resumed, and one that
# never finished an epoch is started again; a run that another sweep process or SLURM
# task is running now (see sweep_running below) is skipped. So a local sweep and a SLURM array of the
# same grid are interchangeable, and either finishes the other's runs. A run's folder
# name is all the sweep knows of it: after changing EPOCHS, WARMUP, PRETRAINED or the
# extra flags, use a new RUNS_DIR (resuming a run with other experiment flags is refused
# by cifar10_qat_br.py, and counts as a failure). Extra flags that the grid sets (--seed,
# --num-bits*, --lambda-br*, --clip-value, --optimizer, --ptq, --output-dir) are refused.
#
# Each run's console output is appended to <run folder>/train.log, its command line is
# in <run folder>/sweep_command, <run folder>/sweep_running names the host and process
# (and SLURM job) while it runs, and a failed run leaves its exit status in
# <run folder>/sweep_exit_code (summarize.py lists such runs as failed). The grid is
# kept in RUNS_DIR/sweep_plan.tsv (summarize.py lists runs not started yet as pending).
# A failed run does not stop the sweep; Ctrl-C does (the interrupted run resumes on
# the next call). With JOBS > 1 a branch waits until its group's first run has written its
# warmup_end.pt, and the console shows when each run starts and ends. A SLURM task branches
# when the warmup exists as it starts, else trains its own (tasks start together: submit the
# array again after the warmups, or set MAX_RUNNING, to share them).
#
# On SLURM each array task requeues itself (--requeue) when its time limit is near:
# the script's --signal=B:USR1@120 makes the task stop its run at the next step (the
# finished epochs are in last.pt) and requeue; the requeued task resumes the run. On
# SIGTERM (preemption; scancel --signal=TERM --batch) the task stops the run the same
# way and exits 143; SLURM requeues preempted jobs, `scontrol requeue JOB_TASK` others.
#
# Exit status: 0 every run finished; 1 some run failed; 130/143 interrupted.

set -u -o pipefail

# Scenario table (the README's ablations): key, λ_w on, λ_a on, extra flags (comma-separated), name.
# The seed's five rows first: its four BR scenarios freeze every step size after warmup, its
# baseline does not. lsq-frozen separates freezing from BR; the -free pair lets α train in
# stage 2, where a moving target can move (with α frozen, wa-moving is wa-stable bit for bit).
SCENARIO_TABLE="
w-only          1 0 --freeze-alpha                            W-only
wa-stable       1 1 --freeze-alpha                            W+A stable
wa-moving       1 1 --freeze-alpha,--br-backprop-to-alpha-act W+A moving target
a-only          0 1 --freeze-alpha                            A-only
lsq             0 0 -                                         LSQ baseline
lsq-frozen      0 0 --freeze-alpha                            LSQ, α frozen after warmup
w-only-free     1 0 --no-freeze-alpha                         W-only, α trained in stage 2
wa-stable-free  1 1 --no-freeze-alpha                         W+A stable, α trained in stage 2
wa-moving-free  1 1 --no-freeze-alpha,--br-backprop-to-alpha-act W+A moving target, α trained in stage 2
dampen          0 0 --freeze-alpha,--lambda-dampen,0.1         Oscillation dampening (Nagel et al. 2022)
freeze          0 0 --freeze-alpha,--freeze-oscillating,0.1:0.01 Iterative freezing (Nagel et al. 2022)
ptq             0 0 --ptq                                     PTQ (post-training quantization)
"

RUNS_DIR=${RUNS_DIR:-runs/sweep}
DATA_DIR=${DATA_DIR:-./data}
SCENARIOS=${SCENARIOS:-w-only wa-stable wa-moving a-only lsq}
BITS=${BITS:-2}
LAMBDAS=${LAMBDAS:-1}
SEEDS=${SEEDS:-42 43 44}
BRANCH=${BRANCH:-1}
JOBS=${JOBS:-1}
CLIPS=${CLIPS:-none}
OPTIMIZERS=${OPTIMIZERS:-sgd}
EPOCHS=${EPOCHS:-}
WARMUP=${WARMUP:-}
PRETRAINED=${PRETRAINED:-}
PYTHON=${PYTHON:-python}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRAIN="$REPO/cifar10_qat_br.py"
RUN_FILES=(config.json metrics.jsonl timing.jsonl last.pt best.pt warmup_end.pt summary.json)

GPUS=${GPUS:-1}
CPUS=${CPUS:-4}
MEM=${MEM:-}
TIME=${TIME:-1-00:00:00}
PARTITION=${PARTITION:-}
MAX_RUNNING=${MAX_RUNNING:-}

USAGE="usage: scripts/sweep.sh [-h] [-n] [--slurm [--submit]] [-- EXTRA FLAGS FOR cifar10_qat_br.py]"
die() { echo "error: $*" >&2; exit 2; }

DRY_RUN=0; MODE=local; SUBMIT=0; TASK=
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) sed -n '2,/^$/{/^$/q;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; exit 0 ;;  # the comment above
        -n) DRY_RUN=1 ;;
        --slurm) MODE=slurm ;;
        --submit) SUBMIT=1 ;;
        --task) MODE=task; TASK=${2:-}; shift ;;
        --) shift; break ;;
        --*) break ;;  # the extra flags, without "--" before them
        *) echo "$USAGE" >&2; exit 2 ;;
    esac
    shift
done
EXTRA=("$@")
[[ $SUBMIT == 1 && $MODE != slurm ]] && die "--submit goes with --slurm"

# Check the settings before running anything.
for key in $SCENARIOS; do
    grep -q "^$key " <<<"$SCENARIO_TABLE" ||
        die "SCENARIOS: unknown scenario '$key' (choose from: $(awk 'NF {print $1}' <<<"$SCENARIO_TABLE" | paste -sd' '))"
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
[[ $BRANCH == 0 || $BRANCH == 1 ]] || die "BRANCH: '$BRANCH' is not 0 or 1"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS: '$JOBS' is not a number of runs at once (1, 2, ...)"
for clip in $CLIPS; do
    [[ $clip == none || $clip =~ ^[0-9]*\.?[0-9]+$ ]] || die "CLIPS: '$clip' is not 'none' or a number (e.g. 1 or 6)"
    [[ $clip == none || $clip =~ [1-9] ]] || die "CLIPS: '$clip' must be > 0 (--clip-value clips to [0, c])"
done
for opt in $OPTIMIZERS; do
    [[ $opt == sgd || $opt == adam ]] || die "OPTIMIZERS: '$opt' is not sgd or adam"
done
# The grid sets these flags and names the run folders by them: an extra flag must not change
# them behind the folder's name (argparse also takes an unambiguous prefix, as --optim).
GRID_FLAGS="SEEDS:--seed BITS:--num-bits BITS:--num-bits-weight BITS:--num-bits-act LAMBDAS:--lambda-br
    LAMBDAS:--lambda-br-act SCENARIOS:--br-backprop-to-alpha-act SCENARIOS:--ptq SCENARIOS:--freeze-alpha
    SCENARIOS:--no-freeze-alpha SCENARIOS:--freeze-weight-alpha SCENARIOS:--freeze-act-alpha CLIPS:--clip-value
    OPTIMIZERS:--optimizer RUNS_DIR:--output-dir BRANCH:--from-warmup"
for arg in "${EXTRA[@]}"; do
    name=${arg%%=*}
    [[ $name == --?* ]] || continue
    for entry in $GRID_FLAGS; do
        [[ ${entry#*:} == "$name"* ]] &&
            die "extra flag $arg: the grid sets ${entry#*:} (use ${entry%%:*}), and names the run folders by it"
    done
done
if [[ $MODE == slurm ]]; then
    [[ $GPUS =~ ^[0-9]+$ ]] || die "GPUS: '$GPUS' is not a number of GPUs"
    [[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "CPUS: '$CPUS' is not a number of CPUs"
    [[ -z $MAX_RUNNING || $MAX_RUNNING =~ ^[1-9][0-9]*$ ]] || die "MAX_RUNNING: '$MAX_RUNNING' is not a number"
fi

# Build the list of runs: one line per run, "folder<TAB>flags". SOURCE[i]: the grid point whose
# warmup point i branches from (empty: it trains its own), the first training run of its group.
PLAN=()
SOURCE=()
declare -A GROUP_SOURCE=()
for seed in $SEEDS; do
    for b in $BITS; do
        if [[ $b =~ ^w([0-9]+)a([0-9]+)$ ]]; then
            w=${BASH_REMATCH[1]}; a=${BASH_REMATCH[2]}
        else
            w=$b; a=$b
        fi
        for clip in $CLIPS; do
            first_opt=1
            for opt in $OPTIMIZERS; do
                first_lambda=1
                for lam in $LAMBDAS; do
                    for key in $SCENARIOS; do
                        read -r _ w_on a_on extra _ < <(grep "^$key " <<<"$SCENARIO_TABLE")
                        [[ $key == ptq && $first_opt == 0 ]] && continue  # PTQ has no optimizer: run it once
                        lam_w=0; lam_a=0
                        [[ $w_on == 1 ]] && lam_w=$lam
                        [[ $a_on == 1 ]] && lam_a=$lam
                        if [[ $w_on == 0 && $a_on == 0 ]]; then
                            [[ $first_lambda == 1 ]] || continue  # the baseline has no λ: run it once
                            name="${key}_w${w}a${a}"
                        else
                            name="${key}_w${w}a${a}_lam${lam}"
                        fi
                        flags="--num-bits-weight $w --num-bits-act $a --seed $seed"
                        [[ $key != ptq ]] && flags+=" --lambda-br $lam_w --lambda-br-act $lam_a"
                        [[ $extra != "-" ]] && flags+=" ${extra//,/ }"
                        [[ $extra == *--freeze-alpha* ]] && name+="_frz"
                        if [[ $clip != none ]]; then
                            name+="_clip${clip}"; flags+=" --clip-value $clip"
                        fi
                        if [[ $key != ptq && $opt != sgd ]]; then
                            name+="_${opt}"; flags+=" --optimizer $opt"
                        fi
                        group="$seed $w $a $clip $opt"  # what stage 1 depends on; λ and freezing do not
                        if [[ $key == ptq || $BRANCH == 0 ]]; then
                            SOURCE+=("")
                        elif [[ -n ${GROUP_SOURCE[$group]:-} ]]; then
                            SOURCE+=("${GROUP_SOURCE[$group]}")
                        else
                            GROUP_SOURCE[$group]=${#PLAN[@]}
                            SOURCE+=("")
                        fi
                        PLAN+=("${name}_s${seed}"$'\t'"$flags")
                    done
                    first_lambda=0
                done
                first_opt=0
            done
        done
    done
done

is_finished() { [[ -f $1/summary.json ]] && grep -q '"status": *"finished"' "$1/summary.json"; }
has_run_files() { for f in "${RUN_FILES[@]}"; do [[ -e $1/$f ]] && return 0; done; return 1; }

THIS_JOB=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}

# The marker of another sweep process that runs this folder's run now ("" if none): a live
# process on this host, or a SLURM job still in the queue (a marker left by this very job,
# before it was requeued, does not count).
other_runner() {
    local marker=$1/sweep_running host pid job
    [[ -f $marker ]] || return 0
    host=$(grep -o 'host=[^ ]*' "$marker" | cut -d= -f2)
    pid=$(grep -o 'pid=[0-9]*' "$marker" | cut -d= -f2)
    job=$(grep -o 'slurm_job=[^ ]*' "$marker" | cut -d= -f2)
    if [[ -n $job ]]; then
        [[ $job != "$THIS_JOB" && -n $(squeue -h -j "$job" -o %i 2>/dev/null) ]] && cat "$marker"
    elif [[ $host == "$(hostname)" && -n $pid && $pid != $$ ]] && kill -0 "$pid" 2>/dev/null; then
        cat "$marker"
    fi
    return 0
}

# What --resume auto will do with a run folder (cifar10_qat_br.py decides; this is for the log).
action_of() {
    local other
    other=$(other_runner "$1")
    if [[ -n $other ]]; then echo "running elsewhere ($other), skipped"
    elif is_finished "$1"; then echo "finished, skipped"
    elif [[ -f $1/last.pt ]]; then echo "resume"
    elif [[ -d $1 ]] && has_run_files "$1"; then echo "restart (no finished epoch)"
    else echo "new"; fi
}

# The run folder of grid point $1.
folder_of() { local entry=${PLAN[$1]}; echo "$RUNS_DIR/${entry%%$'\t'*}"; }

# Set name, dir, cmd (the run's command line) and warmup (the warmup_end.pt it branches from, or
# "") for grid point $1 (0-based). A branch gets --from-warmup only once that file exists: until
# then it trains its own warmup, the same epochs bit for bit (a run that started so stays so).
point() {
    local entry=${PLAN[$1]} flags
    warmup=""
    [[ -n ${SOURCE[$1]} ]] && warmup="$(folder_of "${SOURCE[$1]}")/warmup_end.pt"
    name=${entry%%$'\t'*}
    read -r -a flags <<<"${entry#*$'\t'}"
    dir="$RUNS_DIR/$name"
    cmd=("$PYTHON" "$TRAIN" --data-dir "$DATA_DIR" --output-dir "$dir" "${flags[@]}")
    if [[ $name != ptq_* ]]; then  # PTQ trains nothing
        [[ -n $EPOCHS ]] && cmd+=(--epochs "$EPOCHS")
        [[ -n $WARMUP ]] && cmd+=(--warmup-epochs "$WARMUP")
    fi
    [[ -n $PRETRAINED ]] && cmd+=(--pretrained "$PRETRAINED")
    [[ -n $warmup && -f $warmup ]] && cmd+=(--from-warmup "$warmup")
    cmd+=("${EXTRA[@]}" --resume auto)
}

# Before a run: its folder, command line, log header and the marker naming who runs it.
start_point() {
    mkdir -p "$dir"
    rm -f "$dir/sweep_exit_code"
    printf '%q ' "${cmd[@]}" >"$dir/sweep_command"
    echo >>"$dir/sweep_command"
    echo "host=$(hostname) pid=$$${THIS_JOB:+ slurm_job=$THIS_JOB} since=$(date '+%FT%T')" >"$dir/sweep_running"
    echo "===== $(date '+%F %T') $1: ${cmd[*]}" >>"$dir/train.log"
}

# After a run: its exit status (none when it finished) and no running marker.
end_point() {
    rm -f "$dir/sweep_running"
    [[ $1 != 0 ]] && echo "$1" >"$dir/sweep_exit_code"
    return 0
}

write_plan() {
    mkdir -p "$RUNS_DIR" || die "cannot create RUNS_DIR $RUNS_DIR"
    printf '%s\n' "${PLAN[@]}" >"$RUNS_DIR/sweep_plan.tsv"
}

total=${#PLAN[@]}
GRID="seeds: $SEEDS; bits: $BITS; clips: $CLIPS; optimizers: $OPTIMIZERS; λ: $LAMBDAS; scenarios: $SCENARIOS"

# --task I: one grid point, as a SLURM array task. The run goes to the background so that
# this shell (the job's batch step) can pass SLURM's signals on to it: USR1 (the time
# limit is near) stops it and requeues the task, TERM (preemption, scancel) stops it.
if [[ $MODE == task ]]; then
    [[ $TASK =~ ^[0-9]+$ && $TASK -lt $total ]] || die "--task: '$TASK' is not a grid point (0-$((total - 1)))"
    point "$TASK"
    action=$(action_of "$dir")
    echo "[$((TASK + 1))/$total] $name: $action"
    [[ $action == *skipped ]] && exit 0
    start_point "$action"
    stop=""
    trap 'stop=USR1; kill -TERM "$child" 2>/dev/null' USR1
    trap 'stop=${stop:-TERM}; kill -TERM "$child" 2>/dev/null' TERM
    # tee ignores the signals SLURM may send to every process of the job (preemption,
    # scancel --full): the run's last lines still reach the log.
    "${cmd[@]}" > >(trap '' INT TERM USR1; exec tee -a "$dir/train.log") 2>&1 &
    child=$!
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # a trapped signal ends a wait early
    wait "$child"; rc=$?
    end_point "$rc"
    if [[ $stop == USR1 && -n $THIS_JOB ]]; then
        echo "[$((TASK + 1))/$total] $name: stopped before the time limit (exit $rc); requeueing $THIS_JOB" |
            tee -a "$dir/train.log"
        scontrol requeue "$THIS_JOB"
    fi
    exit "$rc"
fi

# --slurm: one sbatch script, one array task per grid point not finished yet.
if [[ $MODE == slurm ]]; then
    todo=()
    for ((i = 0; i < total; i++)); do
        point "$i"
        is_finished "$dir" || todo+=("$i")  # a run going on elsewhere gets a task that skips it
    done
    echo "Sweep: $total run(s) into $RUNS_DIR, ${#todo[@]} not finished ($GRID)"
    if [[ ${#todo[@]} == 0 ]]; then
        echo "Every run is finished; nothing to submit."
        exit 0
    fi
    array=$(IFS=,; echo "${todo[*]}")
    [[ $array == "0,"* && ${#todo[@]} == "$total" ]] && array="0-$((total - 1))"
    [[ -n $MAX_RUNNING ]] && array+="%$MAX_RUNNING"
    runs_abs=$(realpath -m "$RUNS_DIR")
    script=$(
        echo "#!/usr/bin/env bash"
        echo "#SBATCH --job-name=sweep-$(basename "$runs_abs")"
        echo "#SBATCH --array=$array"
        [[ $GPUS != 0 ]] && echo "#SBATCH --gres=gpu:$GPUS"
        echo "#SBATCH --cpus-per-task=$CPUS"
        [[ -n $MEM ]] && echo "#SBATCH --mem=$MEM"
        echo "#SBATCH --time=$TIME"
        [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
        echo "#SBATCH --requeue"
        echo "#SBATCH --signal=B:USR1@120"
        echo "#SBATCH --open-mode=append"
        echo "#SBATCH --output=$runs_abs/slurm_logs/%A_%a.out"
        echo "# Written by scripts/sweep.sh --slurm on $(date '+%F %T'): task I runs grid point I"
        echo "# (RUNS_DIR/sweep_plan.tsv, line I+1) with cifar10_qat_br.py --resume auto, exactly"
        echo "# as the local sweep does; submitting it again finishes what is not finished."
        printf 'cd %q || exit 2\n' "$(pwd)"
        for var in RUNS_DIR DATA_DIR SCENARIOS BITS LAMBDAS CLIPS OPTIMIZERS SEEDS EPOCHS WARMUP PRETRAINED PYTHON; do
            value=${!var}
            [[ $var == PYTHON ]] && value=$(command -v "$PYTHON" || echo "$PYTHON")  # the interpreter of this shell
            printf 'export %s=%q\n' "$var" "$value"
        done
        # torch would start one thread per core of the node, whoever else runs there: tasks sharing a
        # node then spin against each other (measured: 2 tasks on 2 cores, 8 against 350 img/s each)
        echo 'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}'
        printf 'exec %q --task "$SLURM_ARRAY_TASK_ID" --' "$REPO/scripts/sweep.sh"
        [[ ${#EXTRA[@]} -gt 0 ]] && printf ' %q' "${EXTRA[@]}"
        echo
    )
    if [[ $DRY_RUN == 1 ]]; then
        echo "$script"
        exit 0
    fi
    write_plan
    mkdir -p "$RUNS_DIR/slurm_logs"
    echo "$script" >"$RUNS_DIR/sweep.sbatch"
    echo "Wrote $RUNS_DIR/sweep.sbatch (array $array). Submit it with:"
    echo "    sbatch $RUNS_DIR/sweep.sbatch"
    if [[ $SUBMIT == 1 ]]; then
        job=$(sbatch --parsable "$RUNS_DIR/sweep.sbatch") || die "sbatch failed"
        echo "Submitted job array $job; follow it with: squeue -j $job; python summarize.py $RUNS_DIR"
    fi
    exit 0
fi

echo "Sweep: $total run(s) into $RUNS_DIR ($GRID)"
[[ $DRY_RUN == 1 ]] || write_plan
failed=()

# After run $1 (grid point index) ended with status $2: record it; a stop signal ends the sweep.
ended() {
    point "$1"
    end_point "$2"
    [[ $2 == 0 ]] && return 0
    failed+=("$name (exit $2)")
    [[ $2 == 130 || $2 == 143 ]] && return 0
    echo "[$(($1 + 1))/$total] $name FAILED (exit $2); see $dir/train.log. Continuing." >&2
}

# The runs to do, in plan order; each is "todo", "running" or "done" in STATE.
declare -A STATE=()
todo=()
for ((i = 0; i < total; i++)); do
    point "$i"
    action=$(action_of "$dir")
    if [[ $action == *skipped || $DRY_RUN == 1 ]]; then
        echo "[$((i + 1))/$total] $name: $action"
        [[ $action == *skipped ]] && continue
        echo "    ${cmd[*]}"
        [[ -n $warmup && ! -f $warmup ]] && echo "    (--from-warmup $warmup once it exists; else its own warmup)"
        continue
    fi
    STATE[$i]=todo
    todo+=("$i")
done
[[ $DRY_RUN == 1 ]] && exit 0

if [[ $JOBS == 1 ]]; then  # one run after the other, its output on this console too
    for i in "${todo[@]}"; do
        point "$i"  # now: a branch's warmup may have appeared since the list was made
        action=$(action_of "$dir")
        echo "[$((i + 1))/$total] $name: $action"
        echo "    ${cmd[*]}"
        start_point "$action"
        # tee -i ignores Ctrl-C, so the run can still print how to resume.
        "${cmd[@]}" 2>&1 | tee -i -a "$dir/train.log"
        rc=${PIPESTATUS[0]}
        ended "$i" "$rc"
        if [[ $rc == 130 || $rc == 143 ]]; then
            echo "Sweep interrupted during $name; run the same command again to resume it." >&2
            exit "$rc"
        fi
    done
else
    # JOBS runs side by side, each on its share of the CPUs (one thread per run on two cores: busy
    # threads of several runs on one core spin against each other; README "Speed"). A branch waits
    # while its group's first run, in this sweep, has not reached the end of its warmup.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
    echo "Running $JOBS at once, OMP_NUM_THREADS=$OMP_NUM_THREADS each; each run's output is in its train.log"
    waiting() {  # grid point $1 waits for its warmup
        local src=${SOURCE[$1]}
        [[ -n $src && ! -f $(folder_of "$src")/warmup_end.pt && ${STATE[$src]:-done} != done ]]
    }
    declare -A RUNNING=()  # pid -> grid point
    stop=""
    trap 'stop=130' INT  # Ctrl-C reaches the runs themselves (they stop at the next step)
    trap 'stop=143; kill -TERM "${!RUNNING[@]}" 2>/dev/null' TERM
    while :; do
        while [[ -z $stop && ${#RUNNING[@]} -lt $JOBS ]]; do
            next=""
            for i in "${todo[@]}"; do
                [[ ${STATE[$i]} == todo ]] && ! waiting "$i" && { next=$i; break; }
            done
            [[ -n $next ]] || break
            point "$next"
            action=$(action_of "$dir")
            echo "[$((next + 1))/$total] $name: $action, started $(date '+%F %T')"
            echo "    ${cmd[*]}"
            start_point "$action"
            "${cmd[@]}" >>"$dir/train.log" 2>&1 &
            RUNNING[$!]=$next
            STATE[$next]=running
        done
        [[ ${#RUNNING[@]} == 0 ]] && break
        sleep 2
        for pid in "${!RUNNING[@]}"; do
            kill -0 "$pid" 2>/dev/null && continue
            wait "$pid"; rc=$?
            i=${RUNNING[$pid]}
            unset "RUNNING[$pid]"
            STATE[$i]=done
            ended "$i" "$rc"
            echo "[$((i + 1))/$total] $name: ended $(date '+%F %T'), exit $rc"
        done
    done
    if [[ -n $stop ]]; then
        echo "Sweep interrupted; run the same command again to resume its runs." >&2
        exit "$stop"
    fi
fi

echo
"$PYTHON" "$REPO/summarize.py" "$RUNS_DIR"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "${#failed[@]} run(s) failed: ${failed[*]}" >&2
    exit 1
fi
exit 0
