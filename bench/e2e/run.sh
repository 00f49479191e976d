#!/usr/bin/env bash
# End-to-end benchmark of the whole appliance on one machine: the tax-server emulator
# (PCIe region, or TCP with ROUTE=tcp), `appliance serve` (2 shards by default) and
# loadgen, all real processes. Prints loadgen's summary, each process's CPU per invoice
# (process CPU time over the run / invoices the appliance issued) and the appliance's
# per-stage latency quantiles from its control port. docs/PERFORMANCE.md §11.
#
# usage: bench/e2e/run.sh RATE INVOICES_PER_REQUEST SECONDS [loadgen run flags...]
#   bench/e2e/run.sh 300000 1000 10 --connections 2 --streams 32     # bulk (8 streams leave
#                                         the shards idle between batches: PERFORMANCE §13)
#   bench/e2e/run.sh 25000 1 10 --connections 2 --streams 256        # per-invoice
# env: B (binaries, default target/release), WORK (default /var/tmp/einvoice-e2e; not
#      tmpfs: journals use O_DIRECT), ROUTE (pcie|tcp), SPIN (spin_before_park_us),
#      PERF=1 (perf record the appliance for 5 s), PORT/CONTROL (4433/9443),
#      SHARDS (appliance shards, default one per CPU), CPUS (shard CPU list, e.g. "[0]"),
#      EMU_CPUS / LG_CPUS (taskset CPU lists for the emulator and loadgen; default any),
#      EMU_FLAGS (extra hsm-emu flags, e.g. "--pcie-spin-us 0"), TICKS (limits.ticks_in_flight),
#      SYNC (limits.journal_sync: dsync|fdatasync).
set -u
top=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$top/target/release}
W=${WORK:-/var/tmp/einvoice-e2e}
PORT=${PORT:-4433}
CONTROL=${CONTROL:-9443}
RATE=$1; IPR=$2; DUR=$3; shift 3
D=$W/run; P=$W/pki; SHM=/dev/shm/einvoice-e2e-$PORT.pcie
pkill -f "appliance serve --config $D/" ; pkill -f "hsm-emu --data-dir $D/"; sleep 0.5
rm -rf "$D"; mkdir -p "$D/data" "$D/hsm"
if [ ! -f "$P/ca.pem" ]; then
  # A throw-away PKI: the demo's, kept from a 1,000-invoice run.
  rm -rf "$W/pki-demo"
  "$B/appliance" demo --invoices 1000 --keep-data --data-dir "$W/pki-demo" >/dev/null 2>&1
  mkdir -p "$P" && cp "$W/pki-demo/pki/"* "$P/" && rm -rf "$W/pki-demo"
fi
sellers=(91110000717000000B 91110000717000001E 91110000717000002H 91110000717000003L)
TP=""; for i in 0 1 2 3; do TP="$TP --taxpayer ${sellers[$i]}:1100230000${i}1:1:99999999"; done
${EMU_CPUS:+taskset -c $EMU_CPUS} "$B/hsm-emu" --data-dir "$D/hsm" --listen 127.0.0.1:0 $TP --pcie "$SHM" --pcie-queues 2 ${EMU_FLAGS:-} > "$D/emu.out" 2> "$D/emu.err" &
EMU=$!
for _ in $(seq 50); do grep -q '^pcie' "$D/emu.out" && break; sleep 0.1; done
ADDR=$(grep -o 'listening [0-9.:]*' "$D/emu.out" | awk '{print $2}')
if [ "${ROUTE:-pcie}" = pcie ]; then R="pcie:$SHM"; else R="tcp://$ADDR"; fi
{
  echo "data_dir = \"$D/data\""
  echo "spin_before_park_us = ${SPIN:-0}"
  [ -n "${SHARDS:-}" ] && echo "shards = $SHARDS"
  [ -n "${CPUS:-}" ] && echo "cpus = $CPUS"
  printf '[listen]\nservice = "127.0.0.1:%s"\ncontrol = "127.0.0.1:%s"\n' "$PORT" "$CONTROL"
  printf '[tls]\ncert = "%s/server.pem"\nkey = "%s/server.key"\nclient_ca = "%s/ca.pem"\n' "$P" "$P" "$P"
  printf '[[clients]]\nidentity = "demo"\nsellers = ["*"]\n[tax_server]\nroute = "%s"\n' "$R"
  for s in "${sellers[@]}"; do
    printf '[[taxpayers]]\nid = "%s"\nceiling_fen = 10000000\nlow_watermark = 200000\nrefill_count = 1000000\n' "$s"
  done
  printf '[limits]\nindex_capacity_orders = 8000000\n'
  [ -n "${TICKS:-}" ] && echo "ticks_in_flight = $TICKS"
  [ -n "${SYNC:-}" ] && echo "journal_sync = \"$SYNC\""
} > "$D/cfg.toml"
"$B/appliance" serve --config "$D/cfg.toml" > "$D/serve.out" 2> "$D/serve.err" &
SRV=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$CONTROL/status" >/dev/null && break; sleep 0.2; done
sleep 1
[ -n "${PERF:-}" ] && (sleep 4; perf record --call-graph dwarf,16384 -F 1000 -o "$W/serve.perf" -p $SRV -- sleep 5 >/dev/null 2>&1) &
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
e0=$(cpu $EMU); s0=$(cpu $SRV)
/usr/bin/time -f 'loadgen cpu user %U sys %S' ${LG_CPUS:+taskset -c $LG_CPUS} "$B/loadgen" run --server "127.0.0.1:$PORT" \
  --server-name localhost --ca "$P/ca.pem" --cert "$P/client-demo.pem" --key "$P/client-demo.key" \
  --rate "$RATE" --invoices-per-request "$IPR" --duration "$DUR" --warmup 2 --sellers 4 \
  --out "$D/lg" "$@" > "$D/lg.out" 2> "$D/lg.err"
e1=$(cpu $EMU); s1=$(cpu $SRV)
cat "$D/lg.out"
M=$(curl -s "http://127.0.0.1:$CONTROL/metrics")
N=$(echo "$M" | grep -E '^einvoice_issued_invoices_total' | awk '{s+=$2} END {print s}')
LG=$(grep -o 'user [0-9.]* sys [0-9.]*' "$D/lg.err" | awk '{print $2+$4}')
T=$(getconf CLK_TCK)
echo "issued $N; CPU us/invoice: emulator $(echo "scale=2; ($e1-$e0)*1000000/$T/$N" | bc) appliance $(echo "scale=2; ($s1-$s0)*1000000/$T/$N" | bc) loadgen $(echo "scale=2; $LG*1000000/$N" | bc)"
echo "$M" | grep -E '^einvoice_ticks_total|quantile="0.(5|99)"'
kill -INT $SRV; wait $SRV; kill $EMU; wait $EMU 2>/dev/null; rm -f "$SHM"
