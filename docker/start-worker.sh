#!/bin/sh
# Start a Prefect process worker for dapt: it polls DAPT_WORK_POOL (default gpu; created as a process pool if missing)
# and runs each flow run as a subprocess with the installed dapt package. Extra arguments go to `prefect worker start`.
set -eu
: "${PREFECT_API_URL:?set PREFECT_API_URL to your Prefect server, e.g. http://HOST:4200/api (see docker/README.md)}"
exec prefect worker start --pool "${DAPT_WORK_POOL:-gpu}" --type process --limit "${DAPT_WORKER_LIMIT:-1}" "$@"
