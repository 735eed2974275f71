#!/usr/bin/env bash
# The web console and the Setup UI in a real browser (tests/web/console.spec.mjs): forms
# generated from the schema, errors next to their fields, roles, conflicts, history, lists that
# follow the watch stream, the Setup UI's refusals. Starts a two-node cluster with the CLI (and a
# third node's `peerconf setup`) on loopback in a temporary folder, installs @playwright/test from
# the lockfile (node_modules cached in target/web-node-modules), uses Debian's chromium, and stops
# every process it started. PEERCONF_BIN names the binary (default: target/release/peerconf, built if missing).
# A screenshot of each page is written to PEERCONF_SCREENSHOTS (default: target/web-screenshots),
# which CI keeps as an artifact.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
(( major >= 20 )) || { echo "the browser tests need Node.js 20 or later (@playwright/test 1.65); found: $(node --version 2>/dev/null || echo none)"; exit 1; }
PC=${PEERCONF_BIN:-$root/target/release/peerconf}
[[ -x $PC ]] || cargo build --release -q
WORK=$(mktemp -d)
PIDS=()
# The tests restart a node themselves: every process whose data directory is in $WORK is stopped.
cleanup() {
  for p in "${PIDS[@]:-}"; do if [[ -n $p ]]; then kill -9 "$p" 2>/dev/null || true; fi; done
  pkill -9 -f -- "--data-dir $WORK/" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
export XDG_CONFIG_HOME=$WORK/config
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_up() { for _ in $(seq 200); do curl -s -o /dev/null -w '%{http_code}' "http://$1/v1/whoami" | grep -qE '401|200' && return 0; sleep 0.1; done; echo "node $1 did not start"; return 1; }

ADMIN_PW=Web-admin-pw-1
OPS_PW=Web-ops-pw-1
printf '%s' "$ADMIN_PW" >"$WORK/pw"
N1=127.0.0.1:$(freeport); N1_IPC=127.0.0.1:$(freeport); N2=127.0.0.1:$(freeport); N2_IPC=127.0.0.1:$(freeport)
"$PC" init --data-dir "$WORK/n1" --name n1 --api-listen "$N1" --ipc-listen "$N1_IPC" --admin admin --admin-password-file "$WORK/pw" >/dev/null 2>"$WORK/n1.log"
run() { "$PC" run --data-dir "$WORK/$1" >>"$WORK/$1.log" 2>&1 & PIDS+=($!); eval "PID_$1=$!"; disown $!; }
run n1; wait_up "$N1"
printf '%s' "$ADMIN_PW" | "$PC" --api "http://$N1" login --user admin 2>/dev/null
export PEERCONF_TOKEN=$("$PC" --api "http://$N1" api-token create --ttl 2h 2>/dev/null | tail -1)
pc() { local at=$1; shift; "$PC" --api "http://$at" "$@"; }
pc "$N1" patch settings global --json '{"heartbeat_interval_ms":200,"offline_timeout_ms":1500}' >/dev/null
token=$(pc "$N1" token create 2>/dev/null | tail -1)
"$PC" join --data-dir "$WORK/n2" --name n2 --peer "$N1_IPC" --token "$token" --api-listen "$N2" --ipc-listen "$N2_IPC" >/dev/null 2>>"$WORK/n2.log"
run n2; wait_up "$N2"
pc "$N1" put admin ops --json "{\"role\":\"admin\",\"password\":\"$OPS_PW\"}" >/dev/null
pc "$N1" put site main --json '{"protocols":["sftp"],"bindings":["0.0.0.0:2222"],"root_dir":"/srv"}' >/dev/null
pc "$N1" put group g --json '{"home_dir":"/srv/g"}' >/dev/null
for _ in $(seq 100); do pc "$N2" get group g >/dev/null 2>&1 && break; sleep 0.1; done

# A conflict: n2 writes while n1 is stopped, then stops; n1 comes back and writes the same field
# while n2 is stopped; n2 comes back and the two concurrent values meet.
stop() { local v="PID_$1"; kill -TERM "${!v}"; for _ in $(seq 100); do kill -0 "${!v}" 2>/dev/null || return 0; sleep 0.1; done; echo "$1 ignored SIGTERM"; exit 1; }
stop n1
pc "$N2" patch group g --json '{"home_dir":"/srv/from-n2"}' >/dev/null
stop n2
run n1; wait_up "$N1"
pc "$N1" patch group g --json '{"home_dir":"/srv/from-n1"}' >/dev/null
run n2; wait_up "$N2"
for _ in $(seq 100); do pc "$N1" conflicts 2>/dev/null | grep -q home_dir && break; sleep 0.1; done
pc "$N1" conflicts 2>/dev/null | grep -q home_dir || { echo "no conflict was made"; exit 1; }

# A third node, set up from its Setup UI by the browser.
N3=127.0.0.1:$(freeport)
"$PC" setup --data-dir "$WORK/n3" --listen "$N3" >"$WORK/n3.log" 2>&1 & PIDS+=($!); disown $!
for _ in $(seq 100); do grep -qEo 'https?://[^ ]+' "$WORK/n3.log" && break; sleep 0.1; done
N3_SETUP=$(grep -Eo 'https?://[^ ]+' "$WORK/n3.log" | head -1)
N3_TOKEN=$(pc "$N1" token create 2>/dev/null | tail -1)

# The npm packages exactly as tests/web/package-lock.json names them (npm ci), installed again
# when the lockfile changes.
mods=$root/target/web-node-modules
if [[ ! -d $mods/node_modules/@playwright/test ]] || ! cmp -s tests/web/package-lock.json "$mods/package-lock.json"; then
  rm -rf "$mods"; mkdir -p "$mods"; cp tests/web/package.json tests/web/package-lock.json "$mods/"
  (cd "$mods" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
cp tests/web/playwright.config.mjs tests/web/console.spec.mjs "$WORK/"
ln -s "$mods/node_modules" "$WORK/node_modules"
# A certificate and its key for the Certificates form.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=ui.example \
  -keyout "$WORK/ui-key.pem" -out "$WORK/ui-cert.pem" 2>/dev/null
SHOTS=${PEERCONF_SCREENSHOTS:-$root/target/web-screenshots}
rm -rf "$SHOTS"; mkdir -p "$SHOTS"
export PEERCONF_BIN=$PC N1 N2 N1_IPC N3_SETUP N3_TOKEN ADMIN_PW OPS_PW N3_IPC=127.0.0.1:$(freeport) UNREACHABLE=127.0.0.1:$(freeport)
export WORK SHOTS N2_PID=$PID_n2 CERT_PEM=$WORK/ui-cert.pem KEY_PEM=$WORK/ui-key.pem
(cd "$WORK" && npx playwright test --config playwright.config.mjs console.spec.mjs) || {
  echo "browser tests failed; node logs:"; tail -n 5 "$WORK"/n*.log; exit 1; }
echo "screenshots of every page: $SHOTS" 
