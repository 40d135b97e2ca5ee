#!/usr/bin/env bash
# Remove the tvm-upload service installed by install.sh.
#
# Stops and disables the unit through systemctl, then removes the unit file
# and /opt/tvm-upload. The configuration (/etc/tvm-upload), the state store
# (/var/lib/tvm-upload) and the local drop-ins are kept unless --purge is
# given. The system user is always kept, because files may still belong to it.
# Safe to run again: whatever is already gone is skipped.
set -euo pipefail

readonly SERVICE_USER=tvm-upload
readonly UNIT_NAME=tvm-upload.service
readonly UNIT_FILE=/etc/systemd/system/tvm-upload.service
readonly UNIT_WANTS_LINK=/etc/systemd/system/multi-user.target.wants/tvm-upload.service
readonly DROP_IN_DIR=/etc/systemd/system/tvm-upload.service.d
readonly INSTALL_DIR=/opt/tvm-upload
readonly VENV_COMMAND=/opt/tvm-upload/venv/bin/tvm-upload
readonly COMMAND_LINK=/usr/local/bin/tvm-upload
readonly CONFIG_DIR=/etc/tvm-upload
readonly STATE_DIR=/var/lib/tvm-upload

usage() {
    cat <<'EOF'
Usage: uninstall.sh [OPTIONS]

Stop and disable tvm-upload, remove its unit file and /opt/tvm-upload.

Options:
  --root DIR   uninstall from DIR instead of / (for tests and image builds);
               skips systemctl
  --purge      also remove /etc/tvm-upload (config and credentials),
               /var/lib/tvm-upload (state store) and local drop-ins
  -h, --help   show this help
EOF
}

say() {
    printf 'uninstall.sh: %s\n' "$*"
}

fail() {
    printf 'uninstall.sh: error: %s\n' "$*" >&2
    exit 1
}

usage_error() {
    printf 'uninstall.sh: error: %s\n' "$*" >&2
    usage >&2
    exit 2
}

# Path of an installed file as seen from this host (prefixed with --root).
target() {
    printf '%s%s' "$ROOT_PREFIX" "$1"
}

parse_arguments() {
    ROOT=/
    PURGE=no

    while [[ $# -gt 0 ]]; do
        case "$1" in
            --root) [[ $# -ge 2 ]] || usage_error "--root needs a directory"; ROOT=$2; shift ;;
            --purge) PURGE=yes ;;
            -h | --help) usage; exit 0 ;;
            *) usage_error "unknown option: $1" ;;
        esac
        shift
    done
}

check_arguments() {
    [[ -d "$ROOT" ]] || fail "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd -P)
    ROOT_PREFIX=${ROOT%/}

    if [[ "$ROOT" == / && $EUID -ne 0 ]]; then
        fail "uninstalling from / needs root; run it with sudo, or use --root DIR"
    fi
}

systemd_is_running() {
    [[ "$ROOT" == / && -d /run/systemd/system ]] && command -v systemctl >/dev/null
}

# The service is stopped only through its unit, so systemd applies the
# graceful stop (SIGTERM, then TimeoutStopSec=) to exactly its processes.
stop_service() {
    if ! systemd_is_running; then
        say "systemd is not running here (or --root is set): not stopping the service"
        return
    fi

    if [[ -e "$UNIT_FILE" ]]; then
        systemctl disable --now "$UNIT_NAME"
        say "stopped and disabled $UNIT_NAME"
    elif systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl stop "$UNIT_NAME"
        say "stopped $UNIT_NAME"
    else
        say "$UNIT_NAME is not installed"
    fi
}

# remove PATH: delete an installed file or directory if it is there.
remove() {
    local path
    path=$(target "$1")
    if [[ -e "$path" || -L "$path" ]]; then
        rm -rf -- "$path"
        say "removed $1"
    fi
}

# The command link goes only if install.sh made it, so it points into the venv.
remove_command_link() {
    local link
    link=$(target "$COMMAND_LINK")
    if [[ -L "$link" && "$(readlink "$link")" == "$VENV_COMMAND" ]]; then
        rm -f -- "$link"
        say "removed $COMMAND_LINK"
    fi
}

remove_program() {
    remove_command_link
    remove "$UNIT_WANTS_LINK"
    remove "$UNIT_FILE"
    remove "$INSTALL_DIR"
}

remove_data() {
    if [[ "$PURGE" == no ]]; then
        say "kept $CONFIG_DIR and $STATE_DIR; --purge removes them"
        return
    fi

    remove "$DROP_IN_DIR"
    remove "$CONFIG_DIR"
    remove "$STATE_DIR"
}

reload_systemd() {
    if ! systemd_is_running; then
        return
    fi

    systemctl daemon-reload
    systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
}

main() {
    parse_arguments "$@"
    check_arguments
    stop_service
    remove_program
    remove_data
    reload_systemd
    if [[ "$ROOT" == / ]] && getent passwd "$SERVICE_USER" >/dev/null; then
        say "kept the $SERVICE_USER user; remove it with: userdel $SERVICE_USER"
    fi
    say "done"
}

main "$@"
