# Sourced by the GPU scripts. run NAME SECONDS CMD...: CMD under a time limit of its own (SIGINT at
# the limit, so that a training run saves its checkpoint; SIGKILL 15 s later, so that the limits add
# up to the script's), its output in $logs/NAME.log, its exit status and the time so far in
# $out/summary.log.
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/summary.log"
  timeout -k 15 -s INT "$limit" "$@" > "$logs/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all" | tee -a "$out/summary.log"
}
