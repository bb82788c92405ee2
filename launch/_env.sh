# Sourced by the launchers: the interpreter, processes per node, and one thread per CPU rank.
# $1: processes per node when there is no GPU.
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
# torchrun's agent passes the stop signals on to its workers only if told to: by default SIGUSR1
# (Slurm's warning signal, or yours) kills the agent itself and orphans the workers. Newer torch
# reads the --signals-to-handle flag ($TORCHRUN_SIGNALS), older the variable. distrib stops
# gracefully on SIGTERM, SIGUSR1 and SIGINT; torchrun SIGKILLs the workers 30 s after a signal.
# gc.freeze() last: Python's exit then skips collecting torch's objects (0.3-0.7 s here; distrib/runtime/shutdown.py).
read -r GPUS TORCHRUN_SIGNALS TORCHELASTIC_SIGNALS_TO_HANDLE < <("$PYTHON" -c 'import gc, torch; from distrib.runtime.stop import LAUNCHER_SIGNALS as s, torchrun_signal_flag as f; print(torch.cuda.device_count() if torch.cuda.is_available() else 0, f() or "-", s); gc.freeze()')
[[ $TORCHRUN_SIGNALS == - ]] && TORCHRUN_SIGNALS=
export TORCHELASTIC_SIGNALS_TO_HANDLE  # distrib.runtime.stop.LAUNCHER_SIGNALS: older torch reads it instead of the flag
NPROC_PER_NODE=${NPROC_PER_NODE:-$([[ $GPUS -gt 0 ]] && echo "$GPUS" || echo "$1")}
if [[ $GPUS == 0 ]]; then
    # One thread per rank: N CPU ranks each using every core would oversubscribe the machine.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # glibc serves allocations above a *dynamic* threshold with fresh mmap'd pages, so a CPU step's
    # multi-MB temporaries (the optimizer's, activations) can page-fault in on every step depending
    # on the process's allocation history: measured 36 vs 48 steps/s for the same loop (BENCHMARKS.md).
    # Fixed thresholds keep them on the heap. Your own settings win.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-67108864} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-268435456}
fi
