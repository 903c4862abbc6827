#!/usr/bin/env bash
# scripts/slurm_local.sh - a real single-machine SLURM cluster for effective-alignment's tests and CI.
#
# Installs the Debian packages when missing (munge, slurmctld, slurmd, slurm-client; slurmdbd and
# mariadb-server for accounting), writes /etc/slurm/slurm.conf, starts the daemons as root without systemd and
# waits until every node is idle. Idempotent: a second call with the same settings returns at once; a call with
# other settings rewrites the config and restarts slurmctld/slurmd. Stop with scripts/slurm_local_stop.sh.
#
#   sudo bash scripts/slurm_local.sh && trap 'bash scripts/slurm_local_stop.sh --purge' EXIT
#   .venv/bin/pytest -m slow tests/slurm
#
# Accounting (slurmdbd + MariaDB) is on by default because submitit learns job states from `sacct`: without it a
# cancelled or timed-out job stays UNKNOWN and a Hydra multirun waits forever.
#
# Daemons started here (each leaves a PID file under $SLURM_LOCAL_DIR):
#   munged (as user munge), mariadbd + slurmdbd (accounting, optional), slurmctld, one slurmd per node.
#
# Environment (all optional):
#   SLURM_LOCAL_DIR         state/log/pid folder               (default /tmp/effective-alignment-slurm)
#   SLURM_LOCAL_ACCOUNTING  1: MariaDB + slurmdbd so that `sacct` works (default 1); 0: none
#   SLURM_LOCAL_PARTITION   partition name                     (default debug)
#   SLURM_LOCAL_NODES       1 (default): one node named `hostname -s`.
#                           N>1: nodes n1..nN, each slurmd in its own network namespace (slm-n1..) on a bridge
#                           slm-br, 10.231.0.1/24 for this host and 10.231.0.10i for node i, names in /etc/hosts
#   SLURM_LOCAL_CPUS        CPUs each node claims (default: the real count from `slurmd -C`); more than that
#                           oversubscribes the cores (SlurmdParameters=config_overrides)
#   SLURM_LOCAL_MEM_PER_CPU MB per allocated CPU for jobs that give no --mem (default 1024); without it a job
#                           gets the whole node's memory and jobs run one at a time
#   SLURM_LOCAL_DB_PORT     MariaDB TCP port on 127.0.0.1      (default 6833)
#   SLURM_LOCAL_TIMEOUT     seconds to wait for each step      (default 60)
#   SLURM_LOCAL_CLEAN       1: wipe saved job state and accounting DB first (daemons must be stopped)
#
# Writes /etc/slurm/slurm.conf (and /etc/slurm/slurmdbd.conf), where every client (sbatch, srun, sacct, submitit)
# finds it without SLURM_CONF. A foreign slurm.conf is moved to slurm.conf.bak.
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/effective-alignment-slurm}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
PART=${SLURM_LOCAL_PARTITION:-debug}
NODES=${SLURM_LOCAL_NODES:-1}
NCPU=${SLURM_LOCAL_CPUS:-}
MEMPERCPU=${SLURM_LOCAL_MEM_PER_CPU:-1024}
DBPORT=${SLURM_LOCAL_DB_PORT:-6833}
TMO=${SLURM_LOCAL_TIMEOUT:-60}
NET=10.231.0                                  # multi-node subnet: host .1, node i .10i
H=$(hostname -s)
MARK="# managed by effective-alignment scripts/slurm_local.sh"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[slurm_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "SLURM_LOCAL_NODES must be 1..99"

if [ "$NODES" = 1 ]; then
  names=("$H"); CTLD_ADDR=127.0.0.1
else
  names=(); for ((i = 1; i <= NODES; i++)); do names+=("n$i"); done; CTLD_ADDR=$NET.1
fi

alive() {  # alive PIDFILE COMM: the PID in the file runs a program named COMM
  local f=$1 c=$2 p
  p=$(tr -dc 0-9 2>/dev/null < "$f") || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$c" ] &&
    [ "$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1)" != Z ]
}
stop_pidfile() {  # stop_pidfile PIDFILE COMM: TERM a daemon of ours, wait until it exits
  local p i
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  p=$(tr -dc 0-9 2>/dev/null < "$1") || return 0; kill -TERM "$p" 2>/dev/null
  for ((i = 0; i < 100; i++)); do   # until gone (an unreaped zombie counts as gone)
    [ -r "/proc/$p/stat" ] && [ "$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1)" != Z ] || break
    sleep 0.1
  done
  rm -f "$1"
}
wait_for() {  # wait_for DESCRIPTION COMMAND...
  local what=$1 i; shift
  for ((i = 0; i < TMO * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "timed out after ${TMO}s waiting for $what"
}
states() { sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//'; }

# ---------------------------------------------------------------- slurm.conf text
gen_conf() {  # print the wanted slurm.conf
  local hw cpus mem nodelines="" over="" prolog="" acct i
  hw=$(slurmd -C | head -1 | sed 's/ UpTime=.*//')    # NodeName=... CPUs=... RealMemory=...
  [[ "$hw" == NodeName=* ]] || die "slurmd -C printed no node line: $hw"
  cpus=${NCPU:-$(grep -o 'CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)}
  mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
  if [ "$NODES" = 1 ] && [[ "$hw" == *" CPUs=$cpus "* ]]; then
    nodelines="$hw NodeAddr=127.0.0.1 State=UNKNOWN"
  else
    over="SlurmdParameters=config_overrides"
    for ((i = 0; i < NODES; i++)); do
      local addr=127.0.0.1; [ "$NODES" = 1 ] || addr=$NET.$((101 + i))
      nodelines+="NodeName=${names[$i]} NodeAddr=$addr CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$((mem / NODES)) State=UNKNOWN"$'\n'
    done
    nodelines=${nodelines%$'\n'}
  fi
  # every "node" shares this machine's hostname, which resolves to 127.0.0.1:
  # point gloo/NCCL at the namespace's own interface instead
  [ "$NODES" = 1 ] || prolog="TaskProlog=$D/task_prolog.sh"
  if [ "$ACCT" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat <<EOF
$MARK (test cluster on one machine; state under $D)
ClusterName=$H
SlurmctldHost=$H($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$MEMPERCPU
$over
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$prolog
$acct
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$nodelines
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# ---------------------------------------------------------------- fast path
running=1
alive "$D/munge/munged.pid" munged || running=0
alive "$D/run/slurmctld.pid" slurmctld || running=0
for n in "${names[@]}"; do alive "$D/run/slurmd-$n.pid" slurmd || running=0; done
if [ "$ACCT" = 1 ]; then
  alive "$D/mysql/mariadb.pid" mariadbd || running=0
  alive "$D/run/slurmdbd.pid" slurmdbd || running=0
fi
if [ "$running" = 1 ] && gen_conf 2>/dev/null | cmp -s - /etc/slurm/slurm.conf &&
   [[ "$(states)" =~ ^(idle|mixed|allocated|completing)( (idle|mixed|allocated|completing))*$ ]]; then
  log "already running (nodes: $(states))"
  exit 0
fi

# ---------------------------------------------------------------- packages
pkgs="munge slurmctld slurmd slurm-client"
[ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
[ "$NODES" = 1 ] || pkgs="$pkgs iproute2"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  t0=$(date +%s)
  own_policy=0   # keep the packages' own init scripts from starting daemons
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  command -v apt-get >/dev/null || die "packages missing ($missing) and no apt-get to install them"
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed in $(( $(date +%s) - t0 ))s"
fi

mkdir -p "$D"/{run,log,state,spool,munge} /etc/slurm
chmod 755 "$D"
if [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then
  alive "$D/run/slurmctld.pid" slurmctld && die "SLURM_LOCAL_CLEAN=1 needs the daemons stopped first (slurm_local_stop.sh)"
  alive "$D/mysql/mariadb.pid" mariadbd && die "SLURM_LOCAL_CLEAN=1 needs the daemons stopped first (slurm_local_stop.sh)"
  rm -rf "${D:?}/state/"* "${D:?}/spool/"* "${D:?}/mysql"
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
chown munge:munge "$D/munge"; chmod 700 "$D/munge"
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if alive "$D/munge/munged.pid" munged; then :
elif munge_ok 2>/dev/null; then
  log "a munged not started by this script already answers on /run/munge; using it"
else
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --pid-file="$D/munge/munged.pid" \
    --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
  wait_for munged munge_ok
fi

# ---------------------------------------------------------------- network namespaces (NODES>1)
if [ "$NODES" != 1 ]; then
  ip link show slm-br >/dev/null 2>&1 || {
    ip link add slm-br type bridge; ip addr add "$NET.1/24" dev slm-br; }
  ip link set slm-br up
  for ((i = 1; i <= NODES; i++)); do
    ns=slm-n$i
    if [ ! -e "/run/netns/$ns" ]; then
      ip netns add "$ns"
      ip link add "slm-v$i" type veth peer name eth0 netns "$ns"
      ip link set "slm-v$i" master slm-br; ip link set "slm-v$i" up
      ip -n "$ns" addr add "$NET.$((100 + i))/24" dev eth0
      ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
      echo "$ns" >> "$D/netns.list"
    fi
    # names in /etc/hosts, written in place (it may be a bind mount)
    grep -q "^$NET.$((100 + i)) n$i " /etc/hosts ||
      echo "$NET.$((100 + i)) n$i $MARK" >> /etc/hosts
  done
  printf '#!/bin/sh\n# lines "export K=V" printed here land in every task'"'"'s environment\necho export GLOO_SOCKET_IFNAME=eth0\necho export NCCL_SOCKET_IFNAME=eth0\n' \
    > "$D/task_prolog.sh"
  chmod 755 "$D/task_prolog.sh"
fi

# ---------------------------------------------------------------- slurm.conf
if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARK" /etc/slurm/slurm.conf; then
  log "moving an existing /etc/slurm/slurm.conf aside to slurm.conf.bak"
  mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.bak
fi
gen_conf > "$D/slurm.conf.new"
if ! cmp -s "$D/slurm.conf.new" /etc/slurm/slurm.conf; then
  mv "$D/slurm.conf.new" /etc/slurm/slurm.conf; conf_changed=1
else
  rm -f "$D/slurm.conf.new"; conf_changed=0
fi
chmod 644 /etc/slurm/slurm.conf

# ---------------------------------------------------------------- accounting
if [ "$ACCT" = 1 ]; then
  mkdir -p "$D/mysql"; chown mysql:mysql "$D/mysql"
  if [ ! -d "$D/mysql/db/mysql" ]; then
    log "initialising a private MariaDB data dir"
    mariadb-install-db --no-defaults --datadir="$D/mysql/db" --user=mysql \
      --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 \
      || { cat "$D/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  sqlroot() { mariadb --no-defaults -S "$D/mysql/mysqld.sock" -u root "$@"; }
  if ! alive "$D/mysql/mariadb.pid" mariadbd; then
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/mysql/db" \
      --socket="$D/mysql/mysqld.sock" --pid-file="$D/mysql/mariadb.pid" \
      --bind-address=127.0.0.1 --port="$DBPORT" --skip-name-resolve \
      --log-error="$D/log/mariadb.log" --innodb-buffer-pool-size=256M \
      --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for mariadbd sqlroot -e 'select 1'
  fi
  sqlroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  cat > "$D/slurmdbd.conf.new" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$H
DbdAddr=$CTLD_ADDR
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  if [ -e /etc/slurm/slurmdbd.conf ] && ! grep -qF "$MARK" /etc/slurm/slurmdbd.conf; then
    mv /etc/slurm/slurmdbd.conf /etc/slurm/slurmdbd.conf.bak
  fi
  if ! cmp -s "$D/slurmdbd.conf.new" /etc/slurm/slurmdbd.conf; then
    mv "$D/slurmdbd.conf.new" /etc/slurm/slurmdbd.conf
    stop_pidfile "$D/run/slurmdbd.pid" slurmdbd     # restart with the new file
  else
    rm -f "$D/slurmdbd.conf.new"
  fi
  chmod 600 /etc/slurm/slurmdbd.conf    # slurmdbd refuses a file others can read
  alive "$D/run/slurmdbd.pid" slurmdbd || /usr/sbin/slurmdbd
  wait_for slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$H" || sacctmgr -i add cluster "$H" >/dev/null
fi

# ---------------------------------------------------------------- slurm daemons
if [ "$conf_changed" = 1 ]; then
  # plugin changes (e.g. accounting) need a restart; `scontrol reconfigure` is not enough
  for f in "$D"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
  if alive "$D/run/slurmctld.pid" slurmctld; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
    stop_pidfile "$D/run/slurmctld.pid" slurmctld
  fi
fi
alive "$D/run/slurmctld.pid" slurmctld || /usr/sbin/slurmctld
wait_for slurmctld scontrol ping
for ((i = 0; i < NODES; i++)); do
  n=${names[$i]}
  alive "$D/run/slurmd-$n.pid" slurmd && continue
  mkdir -p "$D/spool/$n"
  if [ "$NODES" = 1 ]; then /usr/sbin/slurmd -N "$n"
  # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup,
  # and slurmd then fails with "No filesystem mounted on /sys/fs/cgroup"
  else nsenter --net="/run/netns/slm-n$((i + 1))" /usr/sbin/slurmd -N "$n"; fi
done

for ((i = 0; i < TMO * 4; i++)); do
  st=$(states)
  [ "$st" = idle ] && break
  if [[ "$st" =~ down|drain|fail ]]; then
    scontrol update nodename="$(IFS=,; echo "${names[*]}")" state=resume 2>/dev/null || true
  fi
  sleep 0.25
done
if [ "$(states)" != idle ]; then
  tail -n 20 "$D/log/slurmctld.log" "$D"/log/slurmd-*.log >&2 || true
  sinfo -N -l >&2 || true
  die "nodes are '$(states)', not idle, after ${TMO}s"
fi
log "up: cluster $H, partition $PART, $(sinfo -h -N -o '%N(%c CPUs, %m MB)' | sort -u | tr '\n' ' ')all idle; accounting=$ACCT; dir $D"
