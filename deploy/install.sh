#!/usr/bin/env bash
# Install wacored as a systemd service on this host (Debian/Ubuntu, as root):
#   - a `wacored` system user (no login, home /var/lib/wacored);
#   - a virtualenv at /opt/wacored/venv with wacored installed from this source tree;
#   - /etc/wacored/wacored.toml (the documented default, store at /var/lib/wacored/wacored.db), kept if present;
#   - /etc/wacored/wacored.env (mode 0600) with empty secrets to fill in, kept if present;
#   - /etc/systemd/system/wacored.service, enabled (started once the secrets are filled in);
#   - /usr/local/bin/wacored, a link to the virtualenv's wacored, so `wacored status` works in any shell;
#   - /opt/wacored/docs (the runbooks among them) and /etc/wacored/prometheus/wacored.rules.yml, the alert
#     rules with their runbook_url made absolute.
#
# Usage: deploy/install.sh [--prefix DIR] [--source DIR] [--python PYTHON] [--runbooks-url URL]
#   --prefix DIR   dry install: write everything under DIR (DIR/opt/..., DIR/etc/..., DIR/usr/local/bin/...), create no user,
#                  call no systemctl, and print what a real install would also do.
#   --source DIR   the wacored source tree to install (default: this script's repository)
#   --python PY    the interpreter for the virtualenv (default: python3, >= 3.11)
#   --runbooks-url URL  where operators read docs/runbooks.md, for the alerts' runbook_url
#                  (default: file:///opt/wacored/docs/runbooks.md, the installed copy)
set -euo pipefail

prefix=""
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
runbooks_url="file:///opt/wacored/docs/runbooks.md"

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --source) source_dir="${2:?--source needs a directory}"; shift 2 ;;
        --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
        --runbooks-url) runbooks_url="${2:?--runbooks-url needs a URL}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ -n "$prefix" ]]; then
    mkdir -p "$prefix"
    prefix="$(cd "$prefix" && pwd)"
elif [[ "$(id -u)" -ne 0 ]]; then
    echo "install.sh: run as root (or use --prefix DIR for a dry install)" >&2
    exit 1
fi

opt_dir="$prefix/opt/wacored"
etc_dir="$prefix/etc/wacored"
unit_dir="$prefix/etc/systemd/system"
bin_dir="$prefix/usr/local/bin"
config="$etc_dir/wacored.toml"
env_file="$etc_dir/wacored.env"
store_path="/var/lib/wacored/wacored.db"

step() { printf '==> %s\n' "$*"; }

# Runs a command that changes the system outside DIR; with --prefix only says it would.
system() {
    if [[ -n "$prefix" ]]; then
        printf '    would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

for file in wacored.toml pyproject.toml deploy/systemd/wacored.service; do
    [[ -f "$source_dir/$file" ]] || { echo "install.sh: $source_dir is not a wacored source tree (no $file)" >&2; exit 1; }
done

step "system user wacored"
if [[ -z "$prefix" ]] && id -u wacored >/dev/null 2>&1; then
    echo "    exists"
else
    system useradd --system --user-group --home-dir /var/lib/wacored --no-create-home \
        --shell /usr/sbin/nologin --comment "wacored WhatsApp webhook router" wacored
fi

step "virtualenv $opt_dir/venv"
mkdir -p "$opt_dir"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "install.sh: $python is older than Python 3.11" >&2; exit 1; }
"$python" -m venv "$opt_dir/venv"
# Build from a copy: pip builds in the tree it is given and would leave build/ in the checkout.
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
cp -r "$source_dir/pyproject.toml" "$source_dir/README.md" "$source_dir/wacored" "$build_dir/"
"$opt_dir/venv/bin/pip" install --quiet --disable-pip-version-check "$build_dir"
install -m 0644 "$source_dir/README.md" "$opt_dir/README.md"
echo "    $("$opt_dir/venv/bin/python" -c 'import wacored.runtime as r; print("wacored", r.VERSION)')"

step "command $bin_dir/wacored"
# A link, not a copy: an upgrade (a new virtualenv in the same place) needs nothing more here. A file
# that is not a link is someone else's (a pip install --user, a hand-made wrapper): never replaced.
link="$bin_dir/wacored"
wacored_bin="$opt_dir/venv/bin/wacored"
install -d -m 0755 "$bin_dir"
if [[ -L "$link" && "$(readlink "$link")" == "$wacored_bin" ]]; then
    echo "    exists: $link -> $wacored_bin"
elif [[ -e "$link" && ! -L "$link" ]]; then
    echo "    $link exists and is not a link: kept; run $wacored_bin instead" >&2
else
    ln -sfn "$wacored_bin" "$link"
    echo "    linked $link -> $wacored_bin"
fi

step "docs $opt_dir/docs and alert rules $etc_dir/prometheus/wacored.rules.yml"
install -d -m 0755 "$opt_dir/docs" "$etc_dir/prometheus"
install -m 0644 "$source_dir"/docs/*.md "$opt_dir/docs/"
case "$runbooks_url" in
    *'#'* | *'"'* | *' '*) echo "install.sh: --runbooks-url must not hold '#', '\"' or spaces" >&2; exit 2 ;;
esac
# Rewritten on every run: the rules follow the installed version, with runbook_url absolute.
sed "s#RUNBOOKS_URL#$runbooks_url#" "$source_dir/deploy/prometheus/wacored.rules.yml" \
    >"$etc_dir/prometheus/wacored.rules.yml"
echo "    runbook_url: $runbooks_url#<alert>"

step "config $config"
install -d -m 0755 "$etc_dir"
if [[ -e "$config" ]]; then
    echo "    exists: kept as it is"
else
    sed "s#^path = \"var/wacored.db\"#path = \"$store_path\"#" "$source_dir/wacored.toml" >"$config.new"
    grep -q "^path = \"$store_path\"" "$config.new" ||
        { echo "install.sh: could not set store.path in $config" >&2; rm -f "$config.new"; exit 1; }
    chmod 0640 "$config.new"
    mv "$config.new" "$config"
    system chown root:wacored "$config"
fi
# The secrets are not set yet: give check-config a stand-in so it checks everything else.
WACORED_APP_SECRET=install-check "$opt_dir/venv/bin/wacored" check-config -c "$config" --env-file /dev/null |
    sed 's/^/    /'

step "secrets $env_file (mode 0600)"
if [[ -e "$env_file" ]]; then
    echo "    exists: kept as it is"
else
    (
        umask 077
        cat >"$env_file" <<'EOF'
# wacored's secrets, read by systemd (EnvironmentFile=) before it drops privileges. Mode 0600, root.
# wacored refuses to start until WACORED_APP_SECRET is set. One KEY=VALUE a line: systemd takes
# everything after "=" as the value, so never put a comment on the same line.
#
# Meta app -> App settings -> Basic -> App secret
WACORED_APP_SECRET=
# Any long random string; the same in Meta's webhook configuration
WACORED_VERIFY_TOKEN=
# A system user's token with whatsapp_business_messaging (the home menu is sent with it)
WACORED_ACCESS_TOKEN=
# WhatsApp -> API setup -> Phone number ID
WACORED_PHONE_NUMBER_ID=
# Enables the /admin/ API
#WACORED_ADMIN_TOKEN=
EOF
    )
    chmod 0600 "$env_file"
fi
system chown root:root "$env_file"

step "systemd unit $unit_dir/wacored.service"
install -d -m 0755 "$unit_dir"
install -m 0644 "$source_dir/deploy/systemd/wacored.service" "$unit_dir/wacored.service"
echo "    the store directory /var/lib/wacored is created by systemd (StateDirectory=wacored)"
system systemctl daemon-reload
system systemctl enable wacored.service
# An upgrade: a running daemon picks up the new code (it drains first); a stopped one stays stopped.
system systemctl try-restart wacored.service

step "done"
cat <<EOF
    wacored is on the PATH: $bin_dir/wacored
    next: fill in $env_file (see $opt_dir/docs/deploying.md), then
        systemctl start wacored
        $source_dir/deploy/verify.sh --env-file /etc/wacored/wacored.env http://127.0.0.1:8080
EOF
