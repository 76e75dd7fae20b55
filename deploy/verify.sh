#!/usr/bin/env bash
# Post-deploy check of a running wacored, against its own listener (not the TLS proxy, which only
# exposes /webhook). Prints PASS, WARN or FAIL for each check and a summary; exits 1 if any check
# failed. FAIL is wacored itself broken (no answer, /health unhealthy, a secret refused, a message not
# accepted); WARN is wacored working while something it depends on is not (/health degraded: a
# service's breaker open, a forwarder stopped, commits failing for now), named on the line.
#
# Usage: deploy/verify.sh [--env-file FILE] [--from NUMBER] [--text TEXT] [URL]
#   URL             wacored's listener (default http://127.0.0.1:8080)
#   --env-file FILE KEY=VALUE file that fills in unset variables, e.g. /etc/wacored/wacored.env
#   --from NUMBER   sender of the signed test message (default $WACORED_VERIFY_SENDER, else 15550000000)
#   --text TEXT     its text (default "menu"): the route it takes is printed
# The test message is a probe (its wamid starts wamid.WACORED_PROBE.): wacored routes and stores it
# like any message but never forwards it, so no service, no phone and no dead letter ever sees it.
# Secrets: WACORED_VERIFY_TOKEN (the handshake) and WACORED_APP_SECRET (signing the test message),
# from the environment or --env-file.
#
# Checks: health (status healthy; degraded is a WARN), database (reachable, schema version), actors
# (every one running; a forwarder, the DLQ retrier or the reaper stopped is a WARN), metrics (/metrics
# exposes wacored_*), handshake (the challenge is echoed), message (a signed probe is accepted and
# routed; a wacored too old to know probes is a WARN: it forwards the message).
set -euo pipefail

url="http://127.0.0.1:8080"
env_file=""
sender="${WACORED_VERIFY_SENDER:-15550000000}"
text="menu"

usage() {
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --env-file) env_file="${2:?--env-file needs a file}"; shift 2 ;;
        --from) sender="${2:?--from needs a number}"; shift 2 ;;
        --text) text="${2:?--text needs a text}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "verify.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) url="$1"; shift ;;
    esac
done
url="${url%/}"

# Fill in unset variables from the env file, without executing it (it is data, not a script).
if [[ -n "$env_file" ]]; then
    [[ -r "$env_file" ]] || { echo "verify.sh: cannot read $env_file" >&2; exit 2; }
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#export }"
        [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key="${BASH_REMATCH[1]}"
        value="${BASH_REMATCH[2]}"
        value="${value#[\"\']}"
        value="${value%[\"\']}"
        if [[ -z "${!key:-}" ]]; then export "$key=$value"; fi
    done <"$env_file"
fi
verify_token="${WACORED_VERIFY_TOKEN:-${WA_VERIFY_TOKEN:-}}"
app_secret="${WACORED_APP_SECRET:-${WHATSAPP_APP_SECRET:-${WA_APP_SECRET:-}}}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

passed=0
warned=0
failed=0
pass() { printf 'PASS  %-10s %s\n' "$1" "$2"; passed=$((passed + 1)); }
warn() { printf 'WARN  %-10s %s\n' "$1" "$2"; warned=$((warned + 1)); }
fail() { printf 'FAIL  %-10s %s\n' "$1" "$2"; failed=$((failed + 1)); }

# fetch NAME CURL-ARGS...: the body goes to $tmp/NAME, the HTTP status to $status (000: no answer,
# curl's error in $tmp/NAME.err).
status=""
fetch() {
    local name="$1"
    shift
    status="$(curl --silent --show-error --noproxy '*' --max-time 10 --output "$tmp/$name" \
        --write-out '%{http_code}' "$@" 2>"$tmp/$name.err")" || true
    [[ -n "$status" ]] || status="000"
}
no_answer() { printf 'no answer from %s: %s' "$url" "$(head -c 200 "$tmp/$1.err")"; }

# health, database, actors: one GET /health. The Python reads the JSON and prints the detail; it
# exits 0 (PASS), 1 (FAIL: wacored itself is broken) or 3 (WARN: wacored works, something it depends
# on does not). `degraded` is a WARN: wacored still takes and stores every webhook, and what is wrong
# (a service down, a breaker open, a forwarder stopped, commits failing for now) is named.
fetch health "$url/health"
health_check() {
    python3 - "$1" "$tmp/health" <<'PY'
import json, sys
PASS, FAIL, WARN = 0, 1, 3
CORE = ("writer", "ingress")  # down: /health is unhealthy (README, the /health contract)
check, path = sys.argv[1], sys.argv[2]
try:
    body = json.load(open(path, encoding="utf-8"))
    checks, services = body.get("checks", {}), body.get("services", {})
    actors, writes = checks.get("actors", {}), checks.get("store_writes", {})
except (ValueError, AttributeError):
    print("/health did not answer a JSON object"); sys.exit(FAIL)

def stopped(name, actor):
    return f"{name} ({actor.get('error') or actor.get('status')})"

def degraded():
    """What makes /health degraded, each named."""
    why = [f"breaker of {name} {svc.get('breaker')}" for name, svc in sorted(services.items())
           if svc.get("breaker") != "closed"]
    why += ["actor " + stopped(name, a) for name, a in sorted(actors.items()) if a.get("status") != "running"]
    if writes.get("status") not in (None, "ok"):
        why.append(f"store commits {writes.get('status')} since {writes.get('failing_since')}"
                   f" ({writes.get('last_error')})")
    return why

def unhealthy():
    """What makes /health unhealthy, each named."""
    why = []
    db = checks.get("database", {})
    if db.get("status") != "ok":
        why.append(f"store not readable ({db.get('error')})")
    if writes.get("status") == "down":
        why.append(f"store commits failing since {writes.get('failing_since')} ({writes.get('last_error')})")
    why += ["actor " + stopped(name, actors[name]) for name in CORE
            if name in actors and actors[name].get("status") != "running"]
    return why

if check == "health":
    status = body.get("status")
    summary = f"status {status}, version {body.get('version')}, up {body.get('uptime_s')} s"
    if status == "healthy":
        print(summary); sys.exit(PASS)
    if status == "degraded":
        print(f"{summary}: " + "; ".join(degraded() or ["no reason given"])); sys.exit(WARN)
    print(f"{summary}: " + "; ".join(unhealthy() or ["no reason given"])); sys.exit(FAIL)
if check == "database":
    db = checks.get("database", {})
    if db.get("status") != "ok":
        print(f"store not readable: {db.get('error', db)}"); sys.exit(FAIL)
    print(f"schema version {db.get('schema_version')} at {db.get('path')}")
    sys.exit(FAIL if not isinstance(db.get("schema_version"), int) or db["schema_version"] < 1 else PASS)
if check == "actors":
    core = [f"{name} (missing)" for name in CORE if name not in actors]
    core += [stopped(name, actors[name]) for name in CORE if name in actors and actors[name].get("status") != "running"]
    if core:
        print("not running: " + ", ".join(core)); sys.exit(FAIL)
    down = [stopped(name, a) for name, a in sorted(actors.items()) if a.get("status") != "running"]
    if down:
        # A forwarder, the DLQ retrier or the reaper: messages wait on disk, nothing is lost.
        print("not running: " + ", ".join(down)); sys.exit(WARN)
    print(f"{len(actors)} running: " + ", ".join(sorted(actors)))
PY
}
for check in health database actors; do
    if [[ "$status" == "000" ]]; then
        fail "$check" "$(no_answer health)"
    elif detail="$(health_check "$check")"; then
        pass "$check" "$detail"
    elif [[ $? -eq 3 ]]; then
        warn "$check" "$detail"
    else
        fail "$check" "HTTP $status: $detail"
    fi
done

# metrics: the families the dashboard and the alerts rely on.
fetch metrics "$url/metrics"
if [[ "$status" == "000" ]]; then
    fail metrics "$(no_answer metrics)"
elif [[ "$status" != "200" ]]; then
    fail metrics "GET /metrics answered HTTP $status"
else
    missing=""
    for family in wacored_build_info wacored_webhook_requests_total wacored_ack_latency_seconds_bucket \
        wacored_actor_up wacored_breaker_state wacored_dead_letters wacored_queue_depth; do
        grep -q "^${family}[{ ]" "$tmp/metrics" || missing="$missing $family"
    done
    if [[ -n "$missing" ]]; then
        fail metrics "missing:$missing"
    else
        pass metrics "$(grep -c '^wacored_' "$tmp/metrics") wacored_* samples"
    fi
fi

# handshake: what Meta sends when the webhook is (re)configured.
if [[ -z "$verify_token" ]]; then
    fail handshake "WACORED_VERIFY_TOKEN is not set (environment or --env-file)"
else
    challenge="verify-$RANDOM$RANDOM"
    fetch handshake --get --data-urlencode "hub.mode=subscribe" --data-urlencode "hub.verify_token=$verify_token" \
        --data-urlencode "hub.challenge=$challenge" "$url/webhook"
    if [[ "$status" == "000" ]]; then
        fail handshake "$(no_answer handshake)"
    elif [[ "$status" == "200" && "$(cat "$tmp/handshake")" == "$challenge" ]]; then
        pass handshake "the challenge was echoed"
    else
        fail handshake "HTTP $status: $(head -c 200 "$tmp/handshake") (is WACORED_VERIFY_TOKEN the daemon's?)"
    fi
fi

# message: a signed WhatsApp webhook with one new message, the way Meta sends it, marked as a probe by
# its wamid (inside the signed body: see README, HTTP contract). The secret reaches Python through the
# environment, never a command line.
if [[ -z "$app_secret" ]]; then
    fail message "WACORED_APP_SECRET is not set (environment or --env-file)"
else
    signature="$(VERIFY_SECRET="$app_secret" VERIFY_FROM="$sender" VERIFY_TEXT="$text" python3 - "$tmp/message.json" <<'PY'
import hashlib, hmac, json, os, sys, time, uuid
sender, now = os.environ["VERIFY_FROM"], int(time.time())
message = {"from": sender, "id": f"wamid.WACORED_PROBE.verify-{uuid.uuid4().hex}", "timestamp": str(now), "type": "text",
           "text": {"body": os.environ["VERIFY_TEXT"]}}
value = {"messaging_product": "whatsapp",
         "metadata": {"display_phone_number": "15550000000", "phone_number_id": "VERIFY"},
         "contacts": [{"profile": {"name": "wacored verify.sh"}, "wa_id": sender}], "messages": [message]}
body = json.dumps({"object": "whatsapp_business_account",
                   "entry": [{"id": "VERIFY", "changes": [{"value": value, "field": "messages"}]}]}).encode()
open(sys.argv[1], "wb").write(body)
print("sha256=" + hmac.new(os.environ["VERIFY_SECRET"].encode(), body, hashlib.sha256).hexdigest())
PY
)"
    fetch message -X POST -H "Content-Type: application/json" -H "X-Hub-Signature-256: $signature" \
        -H "X-Request-ID: verify-$RANDOM$RANDOM" --data-binary "@$tmp/message.json" "$url/webhook"
    if [[ "$status" == "000" ]]; then
        fail message "$(no_answer message)"
    elif route="$(python3 - "$tmp/message" <<'PY'
import json, sys
try:
    body = json.load(open(sys.argv[1], encoding="utf-8"))
    route = body["routes"][0]
except (ValueError, KeyError, IndexError, TypeError):
    sys.exit(1)
if body.get("accepted") != 1:
    sys.exit(1)
print(f"routed to {route['service']} ({route['reason']}), message {route['message_id']}")
# A wacored from before probes routes the message and forwards it like any other.
sys.exit(0 if route.get("probe") is True else 3)
PY
)" && [[ "$status" == "200" ]]; then
        pass message "$route (a probe: not forwarded)"
    elif [[ $? -eq 3 && "$status" == "200" ]]; then
        warn message "$route, but not as a probe: this wacored forwards it (upgrade it)"
    else
        fail message "HTTP $status: $(head -c 200 "$tmp/message")"
    fi
fi

printf '%d passed, %d warned, %d failed\n' "$passed" "$warned" "$failed"
[[ "$failed" -eq 0 ]]
