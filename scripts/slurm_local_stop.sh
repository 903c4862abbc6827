#!/usr/bin/env bash
# scripts/slurm_local_stop.sh - stop what scripts/slurm_local.sh started, by its PID files
# (never by process name): cancels queued/running jobs first, then stops every
# slurmd, slurmctld, slurmdbd, mariadbd and munged, and removes the network
# namespaces, bridge and /etc/hosts lines that SLURM_LOCAL_NODES>1 made.
#   SLURM_LOCAL_DIR  the folder slurm_local.sh used (default /tmp/effective-alignment-slurm)
#   --purge          also delete that folder (job state, logs, accounting DB)
set -uo pipefail
D=${SLURM_LOCAL_DIR:-/tmp/effective-alignment-slurm}
MARK="# managed by effective-alignment scripts/slurm_local.sh"
log() { echo "[slurm_local_stop] $*" >&2; }

pid_of() {  # pid_of PIDFILE COMM -> PID, if that process is alive and named COMM
  local f=$1 c=$2 p
  [ -s "$f" ] || return 1
  p=$(tr -dc 0-9 < "$f")
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$c" ] && echo "$p"
}
gone() {  # gone PID: exited (a zombie that init has not reaped yet counts as gone)
  [ ! -r "/proc/$1/stat" ] || [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" = Z ]
}
stop() {  # stop PIDFILE COMM
  local f=$1 c=$2 p i
  if ! p=$(pid_of "$f" "$c"); then rm -f "$f"; return 0; fi
  kill -TERM "$p" 2>/dev/null
  for ((i = 0; i < 100; i++)); do gone "$p" && break; sleep 0.1; done
  if ! gone "$p"; then log "$c ($p) ignored TERM for 10s: KILL"; kill -KILL "$p" 2>/dev/null; sleep 0.2; fi
  log "stopped $c ($p)"
  rm -f "$f"
}

if pid_of "$D/run/slurmctld.pid" slurmctld >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 60; i++)); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi
for f in "$D"/run/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
stop "$D/run/slurmctld.pid" slurmctld
stop "$D/run/slurmdbd.pid" slurmdbd
stop "$D/mysql/mariadb.pid" mariadbd
stop "$D/munge/munged.pid" munged

if [ -s "$D/netns.list" ]; then
  while read -r ns; do
    [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null && log "removed netns $ns"
  done < "$D/netns.list"
  rm -f "$D/netns.list"
fi
# Namespaces of ours that the list no longer names (its folder purged while jobs still held them).
for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^slm-n[0-9]+$/ {print $1}'); do
  ip netns del "$ns" 2>/dev/null && log "removed netns $ns"
done
ip link del slm-br 2>/dev/null && log "removed bridge slm-br"
if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
  t=$(mktemp); grep -vF "$MARK" /etc/hosts > "$t"; cat "$t" > /etc/hosts; rm -f "$t"
  log "removed node names from /etc/hosts"
fi
if [ "${1:-}" = --purge ]; then rm -rf "${D:?}"; log "removed $D"; fi
exit 0
