#!/usr/bin/env bash
# Run Lora Lens through its Prefect deployments by hand, the way tests/deploy/test_deployments.py does:
#   1. a local Prefect server on 127.0.0.1 (its own database and PREFECT_HOME under $DEMO_DIR),
#   2. the process work pool `loralens`,
#   3. every deployment of prefect.yaml (`prefect --no-prompt deploy --all`, from the repository root),
#   4. a worker polling the pool,
#   5. one run of a deployment (default: the whole pipeline) on YOUR config file, watched to its end.
#
# Usage:  scripts/deploy_demo.sh CONFIG.yaml [DEPLOYMENT]
#   DEPLOYMENT   loralens-pipeline/nightly (default), cache-activations/cache, train-lenses/train,
#                decode-heads/decode, attribute-heads/attribute or intervene-heads/intervene
# Environment:
#   PREFECT_API_URL   use this running server instead of starting one (its pool and deployments are updated)
#   PREFECT_PORT      port of the local server (default 4200)
#   DEMO_DIR          server database, PREFECT_HOME and logs (default ${TMPDIR:-/tmp}/loralens-prefect-demo)
#   KEEP=1            leave the server and worker running at the end (to retry a run, see below)
#   PREFECT           the prefect command (default .venv/bin/prefect, else the one on PATH)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
[[ -f "$1" ]] || { echo "deploy_demo: no config file $1" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"   # absolute: the worker runs in the repository
DEPLOYMENT="${2:-loralens-pipeline/nightly}"

cd "$(dirname "$0")/.."   # prefect.yaml's `{{ $PWD }}` (the worker's working directory) is the repository root
REPO="$PWD"
PREFECT="${PREFECT:-$([[ -x .venv/bin/prefect ]] && echo "$REPO/.venv/bin/prefect" || command -v prefect || true)}"
[[ -n "$PREFECT" && -x "$PREFECT" ]] || { echo "deploy_demo: no prefect command (run scripts/install.sh)" >&2; exit 2; }
PYTHON="$(dirname "$PREFECT")/python"
DEMO_DIR="${DEMO_DIR:-${TMPDIR:-/tmp}/loralens-prefect-demo}"
mkdir -p "$DEMO_DIR" && DEMO_DIR="$(cd "$DEMO_DIR" && pwd)"

# Never phone home (see loralens/prefect_env.py).
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"

PIDS=()
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "server and worker left running; stop them with: kill ${PIDS[*]:-}; sleep 2; kill ${PIDS[*]:-}" \
             "(a Prefect worker needs a second signal)"
        return
    fi
    # The worker first, then the server it reports to. A Prefect 3.9 worker idles on after its first SIGINT;
    # the second one makes it kill itself (its own escalation), which is what Ctrl-C twice does.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        for attempt in 1 2; do
            kill -INT "${PIDS[$i]}" 2>/dev/null || break
            for _ in $(seq 10); do kill -0 "${PIDS[$i]}" 2>/dev/null || break 2; sleep 0.5; done
        done
        kill -KILL "${PIDS[$i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT

if [[ -z "${PREFECT_API_URL:-}" ]]; then
    PORT="${PREFECT_PORT:-4200}"
    export PREFECT_HOME="$DEMO_DIR/prefect-home"
    export PREFECT_SERVER_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$DEMO_DIR/prefect.db"
    export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
    echo "== 1. prefect server start --host 127.0.0.1 --port $PORT   (log: $DEMO_DIR/server.log)"
    # --no-scheduler: the nightly cron is registered but creates no runs while this demo is up.
    "$PREFECT" server start --host 127.0.0.1 --port "$PORT" --no-scheduler --no-ui >"$DEMO_DIR/server.log" 2>&1 &
    PIDS+=($!) && disown
    for _ in $(seq 180); do
        "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" \
            2>/dev/null && break
        kill -0 "${PIDS[0]}" 2>/dev/null || { echo "deploy_demo: the server exited:" >&2; tail -20 "$DEMO_DIR/server.log" >&2; exit 1; }
        sleep 0.5
    done
else
    echo "== 1. using the server at $PREFECT_API_URL"
fi

echo "== 2. prefect work-pool create loralens --type process"
"$PREFECT" --no-prompt work-pool create loralens --type process --overwrite >/dev/null

echo "== 3. prefect --no-prompt deploy --all   (from $REPO)"
"$PREFECT" --no-prompt deploy --all >"$DEMO_DIR/deploy.log" 2>&1 || { tail -30 "$DEMO_DIR/deploy.log" >&2; exit 1; }
"$PREFECT" deployment ls

echo "== 4. prefect worker start --pool loralens   (log: $DEMO_DIR/worker.log)"
"$PREFECT" worker start --pool loralens >"$DEMO_DIR/worker.log" 2>&1 &
PIDS+=($!) && disown   # no "Killed" job notice when it is stopped

echo "== 5. prefect deployment run '$DEPLOYMENT' -p config_path=$CONFIG"
OUT="$("$PREFECT" deployment run "$DEPLOYMENT" -p "config_path=\"$CONFIG\"")"
echo "$OUT"
FLOW_RUN_ID="$(grep -oE 'UUID: [0-9a-f-]{36}' <<<"$OUT" | head -1 | cut -d' ' -f2)"
"$PYTHON" - "$FLOW_RUN_ID" <<'EOF'
import sys, time
from uuid import UUID
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

flow_run_id = UUID(sys.argv[1])
with get_client(sync_client=True) as client:
    last = None
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state and state.name != last:
            print(f"   flow run {sys.argv[1]}: {state.name}", flush=True)
            last = state.name
        if state and state.is_final():
            break
        time.sleep(2)
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    for tr in sorted(runs, key=lambda t: (t.flow_run_run_count, t.expected_start_time)):
        print(f"   attempt {tr.flow_run_run_count}: task {tr.name:<16} {tr.state.name}")
    if state.is_failed():
        print(f"   {state.message}")
EOF

cat <<EOF

Logs: $DEMO_DIR/worker.log. Re-run after a failure (keep the server and worker up with KEEP=1):
  PREFECT_API_URL=$PREFECT_API_URL $PREFECT flow-run retry $FLOW_RUN_ID
      # the same flow run again: complete upstream stages are cache hits ("Cached"), only the failed stage runs
  PREFECT_API_URL=$PREFECT_API_URL $PREFECT deployment run intervene-heads/intervene -p config_path='"$CONFIG"'
      # one stage's deployment (add -p force=true to redo it)
  loralens run --config $CONFIG --only intervene      # the same without a server
EOF
