# Progress for long steps, sourced by scripts/setup_env.sh and scripts/check_wheel.sh:
#   run_step "what it does" "roughly how long" command [args...]
# prints the step with the time of day and the estimate, runs the command with its
# output in a log, prints every 30 s the seconds so far and what the command last
# said (for a compile: how many files of how many are done), then its seconds. On failure
# it prints the log's last 40 lines and exits with the command's status.
# PROGRESS_EVERY (seconds, default 30) sets the interval; STEP_LOG=path keeps the log
# there (default: a temporary file, removed when the step succeeds).

progress_started=$(date +%s)

run_step() {
  local what=$1 estimate=$2
  shift 2
  local start log=${STEP_LOG:-} pid status=0 waited=0 every=${PROGRESS_EVERY:-30}
  local size=0 new_size changed quiet=""
  start=$(date +%s)
  changed=$start
  [[ -n $log ]] || log=$(mktemp "${TMPDIR:-/tmp}/ge2e_step.XXXXXX")
  echo "== [$(date +%H:%M:%S)] $what (usually $estimate)"
  "$@" > "$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2> /dev/null; do
    sleep 1
    waited=$((waited + 1))
    if ((waited % every == 0)); then
      new_size=$(wc -c < "$log")
      if ((new_size != size)); then
        size=$new_size changed=$(date +%s) quiet=""
      else  # e.g. nvcc on one file: ninja says nothing until it is done
        quiet=" (no new output for $(($(date +%s) - changed)) s)"
      fi
      echo "   ... $(($(date +%s) - start)) s: $(_progress_last_word "$log")$quiet"
    fi
  done
  wait "$pid" || status=$?
  if ((status != 0)); then
    tail -n 40 "$log"
    echo "error: '$what' failed after $(($(date +%s) - start)) s (exit status $status; the" \
         "whole log: $log)" >&2
    exit "$status"
  fi
  echo "   done in $(($(date +%s) - start)) s ($(($(date +%s) - progress_started)) s in all)"
  [[ -n ${STEP_LOG:-} ]] || rm -f "$log"
}

# The last thing a log says, in one short line: ninja's "[3/7] ... -c file" (printed
# when a file is done) as "compiled 3 of 7, the last file", otherwise the last line.
_progress_last_word() {
  local ninja line
  ninja=$(grep -E '^ *\[[0-9]+/[0-9]+\] ' "$1" | tail -n 1 || true)
  if [[ -n $ninja ]]; then
    sed -E 's#^ *\[([0-9]+)/([0-9]+)\] .* -c ([^ ]+).*#compiled \1 of \2, the last \3#' \
      <<< "$ninja" | sed -E 's#/[^ ]*/(csrc/)#\1#' | cut -c 1-100
    return
  fi
  line=$(grep -v '^ *$' "$1" | tail -n 1 || true)
  echo "${line:-(no output yet)}" | cut -c 1-100
}
