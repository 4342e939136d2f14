#!/usr/bin/env bash
# Installs (when missing) and starts the single-host test Slurm cluster of
# slurm.conf: munged, slurmctld and two slurmd (n1, n2) on 127.0.0.1. Run
# as root. Idempotent: daemons already up are left alone. Exits non-zero,
# saying why, when the cluster does not come up; the Slurm tests need it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

command -v pgrep >/dev/null 2>&1 || apt-get install -y -q procps >/dev/null

mkdir -p /etc/slurm /var/spool/strata-slurm/ctld /run/strata-slurm /var/log/strata-slurm
if ! cmp -s "$here/slurm.conf" /etc/slurm/slurm.conf; then
  cp "$here/slurm.conf" /etc/slurm/slurm.conf
fi

# munge: a key, and the daemon as its own user.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
# Starts whichever daemon is not running (one that was stopping a moment
# ago included).
daemons() {
  pgrep -x munged >/dev/null || runuser -u munge -- munged || true
  pgrep -x slurmctld >/dev/null || slurmctld || true
  for n in n1 n2; do
    mkdir -p "/var/spool/strata-slurm/d-$n"
    pgrep -f "slurmd -N $n\$" >/dev/null || slurmd -N "$n" || true
  done
}
daemons

# Up means both nodes idle (or allocated by an earlier run) in the debug
# partition.
for _ in $(seq 1 60); do
  up="$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|alloc|mix)/ {print $1}' | sort -u | tr '\n' ' ')"
  if [ "$up" = "n1 n2 " ]; then
    echo "slurm: n1 and n2 up"
    exit 0
  fi
  sleep 0.5
  daemons
done
echo "slurm: the test cluster did not come up; sinfo says:" >&2
sinfo -N -l >&2 || true
tail -n 20 /var/log/strata-slurm/*.log >&2 || true
exit 1
